"""An asyncio face for LLMEngine: `generate(...)` yields a RequestOutput per step with the deltas.

One background task drives `LLMEngine.step` in a worker thread (the forward pass must not block the
event loop) while there is work, and routes each output to its request's queue. Every engine call
goes through one lock, so requests can be added and aborted from the loop while a step runs.
Cancelling the consumer of `generate` (a client hanging up) aborts the request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop_task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    async def add_request(self, prompt, params: SamplingParams | None = None, adapter=None,
                          request_id: str | None = None) -> str:
        rid = await asyncio.to_thread(self._locked, self.engine.add_request, prompt, params, adapter, request_id)
        self._queues[rid] = asyncio.Queue()
        self._ensure_loop()
        return rid

    async def abort(self, request_id: str) -> bool:
        q = self._queues.pop(request_id, None)
        aborted = await asyncio.to_thread(self._locked, self.engine.abort, request_id)
        if q is not None:
            q.put_nowait(None)
        return aborted

    async def generate(self, prompt, params: SamplingParams | None = None, adapter=None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        rid = await self.add_request(prompt, params, adapter, request_id)
        q = self._queues[rid]
        finished = False
        try:
            while True:
                item = await q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._queues.pop(rid, None)
            if not finished:
                await asyncio.shield(asyncio.to_thread(self._locked, self.engine.abort, rid))

    def _ensure_loop(self) -> None:
        if self._wake is None:
            self._wake = asyncio.Event()
        self._wake.set()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            busy = await asyncio.to_thread(self._locked, self.engine.has_unfinished)
            if not busy:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outputs = await asyncio.to_thread(self._locked, self.engine.step)
            except Exception as exc:  # a failed step ends every request in flight with the error
                for rid, q in list(self._queues.items()):
                    q.put_nowait(exc)
                    await asyncio.to_thread(self._locked, self.engine.abort, rid)
                continue
            if not outputs and not self.engine.step_in_flight:
                await asyncio.sleep(0.001)  # only adapters loading: let them finish
            for out in outputs:
                q = self._queues.get(out.request_id)
                if q is not None:
                    q.put_nowait(out)

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
            self._loop_task = None
