"""The serving layer's parts that are not HTTP: the node's state, the engine bridge, the dev accountant.

    NodeState      what the lifespan builds and routes read (settings, metrics, engine, accountant, ready)
    EngineBridge   the loaded LLMEngine, driven by engine.async_engine.AsyncLLMEngine; `submit` returns
                   a RequestStream once the engine has accepted the request and produced its first output
    DevAccountant  dev mode: authorizes everything, books nothing, receipt id "dev-<request id>"; no
                   ledger row, no signature, nothing to settle
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import AdapterError
from node.config import Settings
from node.metrics import Metrics
from node.serving_types import MaxCostInput, Usage

log = logging.getLogger("openlora.serving")


# ---------------------------------------------------------------------------------------------- state

@dataclass
class NodeState:
    settings: Settings
    metrics: Metrics
    model_id: str = ""
    engine: EngineBridge | None = None
    accountant: Any = None
    ready: bool = False
    load_error: str | None = None
    startup_error: BaseException | None = None  # services failed to start (uvicorn exits)
    # optional services the payments side adds (registry sync's resolve_unknown lives in app.state)
    extras: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- dev

@dataclass
class DevTicket:
    request_id: str
    receipt_id: str  # known up front, so a stream can send it in its headers


class DevAccountant:
    """Dev mode's accountant: everything is allowed and free; no ledger row, no signature.
    Its receipt ids ("dev-<request id>") refer to nothing that can be fetched or settled."""

    def __init__(self) -> None:
        self.completed: list[Usage] = []  # the last few usages, so dev users (and tests) can see them
        self.authorized = 0
        self.booked = 0
        self.cancelled = 0

    async def authorize(self, request, *, model: str, adapters: list[str], max_cost_hint: MaxCostInput) -> DevTicket:
        rid = getattr(request.state, "request_id", None) or "unknown"
        self.authorized += 1
        return DevTicket(rid, f"dev-{rid}")

    async def complete(self, ticket: DevTicket, usage: Usage) -> str:
        self.completed = [*self.completed[-99:], usage]
        self.booked += 1
        return ticket.receipt_id

    async def cancel(self, ticket: DevTicket) -> None:
        self.cancelled += 1


# ---------------------------------------------------------------------------------------------- engine

@dataclass
class Timed:
    """One RequestOutput, stamped when the serving side received it (for TTFT and inter-token latency)."""

    output: Any  # engine.llm_engine.RequestOutput
    at: float


class RequestStream:
    """One accepted request's outputs in order, until the finished one. `aclose()` before the end aborts
    the request in the engine (AsyncLLMEngine.generate aborts when its consumer stops early), which frees
    its KV blocks and adapter slot; after the end it only releases the request's place in the queue."""

    def __init__(self, bridge: EngineBridge, agen, first: Timed) -> None:
        self.bridge, self._agen, self._first = bridge, agen, first
        self.finished = first.output.finished
        self.closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Timed:
        if self._first is not None:
            item, self._first = self._first, None
            return item
        if self.finished or self.closed:
            raise StopAsyncIteration
        out = await self._agen.__anext__()  # StopAsyncIteration: aborted from elsewhere
        self.finished = out.finished
        return Timed(out, time.monotonic())

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.bridge.in_flight -= 1
        await self._agen.aclose()


class EngineBridge:
    """The node's handle on the engine: LLMEngine for state (tokenizer, adapters, scheduler), driven by
    engine.async_engine.AsyncLLMEngine. Counts the requests it has accepted, for the 429 check."""

    def __init__(self, engine, model_id: str, store=None) -> None:
        from engine.async_engine import AsyncLLMEngine

        self.engine = engine
        self.async_engine = AsyncLLMEngine(engine)
        self.model_id = model_id
        self.store = store  # engine.adapters.AdapterStore of the adapter directory, when there is one
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.model_config.vocab_size
        self.in_flight = 0  # accepted and not yet finished or closed (read by the 429 check)
        # admitted by the 429 check and not yet submitted (authorizing, pulling an adapter): counted with
        # in_flight so that concurrent requests cannot all pass the check before any of them is submitted
        self.admitting = 0

    def admit(self, limit: int) -> bool:
        """Take a place in the queue now (no await between check and count), or False when it is full.
        Every True must be paired with one `release_admission()` once the request is submitted or refused."""
        if self.in_flight + self.admitting >= limit:
            return False
        self.admitting += 1
        return True

    def release_admission(self) -> None:
        self.admitting -= 1

    @classmethod
    def build(cls, settings: Settings, model_dir: Path, model_id: str, adapter_dir: Path | None) -> EngineBridge:
        """Load the model (seconds to minutes) and register the adapters of `adapter_dir`."""
        from engine.adapters import AdapterStore
        from engine.config import EngineConfig
        from engine.llm_engine import LLMEngine

        device = settings.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        cfg = EngineConfig(device=device, max_num_seqs=settings.engine_max_num_seqs,
                           num_lora_slots=settings.engine_num_lora_slots,
                           max_lora_rank=settings.engine_max_lora_rank,
                           quantization=None if settings.engine_quantization == "none"
                           else settings.engine_quantization,
                           quant_group_size=settings.engine_quant_group_size,
                           cpu_native_kernels=settings.engine_cpu_native_kernels,
                           adapter_admit_wait_ms=settings.engine_adapter_admit_wait_ms,
                           async_steps={"auto": None, "on": True, "off": False}[settings.engine_async_steps])
        engine = LLMEngine(model_dir, cfg)
        store = None
        if adapter_dir is not None and adapter_dir.is_dir():
            store = AdapterStore(adapter_dir)
            for name, exc in store.register_all(engine.adapters).items():
                log.warning("adapter %s refused: %s", name, exc)
        return cls(engine, model_id, store)

    async def stop(self) -> None:
        await self.async_engine.close()
        close = getattr(self.engine.adapters, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    async def submit(self, request_id: str, prompt_ids: list[int], params, adapter) -> RequestStream:
        """Start a request and wait for its first output, so that a refusal (RequestError,
        AdapterNotFound, CapacityError, ...) is raised here, before any response has started."""
        agen = self.async_engine.generate(prompt_ids, params, adapter, request_id)
        self.in_flight += 1
        try:
            first = await agen.__anext__()
        except BaseException:
            self.in_flight -= 1
            with contextlib.suppress(BaseException):
                await agen.aclose()
            raise
        return RequestStream(self, agen, Timed(first, time.monotonic()))

    # --- state read by routes and metrics ---

    def queue_depth(self) -> dict[str, int]:
        s = self.engine.scheduler
        return {"waiting": len(s.waiting), "running": len(s.running), "requests": max(self.in_flight, 0)}

    # --- adapters ---

    @property
    def adapters(self):
        return self.engine.adapters

    def has_adapter(self, name: str) -> bool:
        try:
            self.engine.adapters.spec(name)
        except AdapterError:
            return False
        return True

    def adapter_names(self) -> list[str]:
        return [spec.name for spec, *_ in self.engine.adapters.list() if spec.path is not None]

    def register_adapter(self, name: str, path: Path):
        return self.engine.adapters.register(name, path)


__all__ = ["DevAccountant", "EngineBridge", "NodeState", "RequestStream", "Timed"]
