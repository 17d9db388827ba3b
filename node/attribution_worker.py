"""Per-request Proof of Attribution: contributor shares for a request served by Datanet-trained adapters.

For every adapter of a request whose registry entry names a Datanet, the worker

1. takes the served request as a training example: the prompt's token ids followed by the generated
   ones, only the generated tokens labelled (engine.training.TokenizedExample);
2. computes the gradient of their mean log-likelihood with respect to the adapter's LoRA tensors
   (engine.training.example_gradients) at each training checkpoint the adapter's index carries (the
   last is the served adapter; node.cli.adapter.attribute_request);
3. sketches them with the adapter's own projection and scores them against the per-contributor index
   that was published inside the adapter (`attribution_index.safetensors`, TracIn over checkpoints),
   giving shares in basis points (positive influence only).

The shares go into the ledger with the request (FinishedRequest.contributor_shares): the contributors'
part of the adapter's revenue is split by them, and their digest is part of the signed receipt. Where
no share can be computed (no index in the adapter, no generated token, no positive score, an error),
the ledger's documented rule applies: the contributors' part goes to the adapter owner.

The gradients run in a separate process with its own copy of the base model: the engine's layers read
one module-level context (engine/context.py, single-threaded by design), so a backward pass must never
run on the serving model or in a thread next to it. The serving process only waits (off its event
loop) for the scores. A request served by a fused mix is scored against each member adapter separately
(the member's gradient at its own weights): an approximation of the mix, stated as such.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path

from attribution.shares import ContributorShare

log = logging.getLogger(__name__)

INDEX_FILE = "attribution_index.safetensors"

# -- the worker process ---------------------------------------------------------------------------

_STATE: dict = {}


def _init(model_dir: str, threads: int) -> None:
    import torch

    from engine.loader import load_model

    torch.set_num_threads(max(1, threads))
    model = load_model(model_dir)
    model.requires_grad_(False)
    _STATE.update(model=model, adapters={})


def _adapter(folder: str, max_rank: int):
    """(the adapters to take gradients at, one per index checkpoint; the AttributionIndex), cached by
    folder and file times."""
    from attribution.poa import AttributionIndex
    from engine.adapters.peft_format import parse_adapter, read_weights
    from engine.training import LoRAParams
    from node.cli.adapter import checkpoint_adapters

    path = Path(folder)
    stamp = tuple((path / f).stat().st_mtime_ns for f in ("adapter_model.safetensors", INDEX_FILE))
    cached = _STATE["adapters"].get(folder)
    if cached is not None and cached[0] == stamp:
        return cached[1], cached[2]
    model = _STATE["model"]
    parsed = parse_adapter(path.name, path, model.config, max_rank=max_rank, max_adapter_bytes=1 << 30)
    dtype = next(model.parameters()).dtype
    lora = LoRAParams.from_weights(model.config, read_weights(parsed, dtype), dtype=dtype)
    index = AttributionIndex.load(path / INDEX_FILE)
    checkpoints = checkpoint_adapters(model, index, lora)
    _STATE["adapters"][folder] = (stamp, checkpoints, index)
    return checkpoints, index


def _score(folder: str, prompt_ids: tuple[int, ...], output_ids: tuple[int, ...],
           max_rank: int) -> list[tuple[str, float, int]]:
    from engine.training import TokenizedExample
    from node.cli.adapter import attribute_request

    checkpoints, index = _adapter(folder, max_rank)
    example = TokenizedExample(tuple(prompt_ids) + tuple(output_ids), len(prompt_ids))
    # TracIn over the index's checkpoints: one backward pass per checkpoint (the last is the served adapter)
    shares = attribute_request(_STATE["model"], index, checkpoints[-1], example, checkpoints)
    return [(s.address, s.score, s.share_bps) for s in shares]


# -- the node's side --------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterToScore:
    adapter_id: int
    name: str


class AttributionWorker:
    """Scores finished requests in a child process; `shares` never raises (no shares on failure)."""

    def __init__(self, model_dir: str | Path, adapter_dir: str | Path, *, max_rank: int = 64,
                 threads: int | None = None, timeout_s: float = 120.0) -> None:
        self.model_dir, self.adapter_dir = str(model_dir), Path(adapter_dir)
        self.max_rank, self.timeout_s = max_rank, timeout_s
        self.threads = threads or (os.cpu_count() or 1)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self.scored = 0  # requests with at least one adapter scored (for tests and metrics)

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._pool is None:
            # spawn: a fresh interpreter, never a fork of the serving process's threads and locks
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                initargs=(self.model_dir, self.threads))
        return self._pool

    def has_index(self, name: str) -> bool:
        return (self.adapter_dir / name / INDEX_FILE).is_file()

    async def shares(self, adapters: list[AdapterToScore], prompt_ids, output_ids
                     ) -> dict[int, tuple[ContributorShare, ...]]:
        """adapter id -> shares, for the adapters whose index is present and that score positively."""
        out: dict[int, tuple[ContributorShare, ...]] = {}
        if not output_ids or not prompt_ids:
            return out
        loop = asyncio.get_running_loop()
        for a in adapters:
            if not self.has_index(a.name):
                log.info("adapter %s has no attribution index; its contributors' part goes to its owner", a.name)
                continue
            try:
                fut = loop.run_in_executor(self._executor(), _score, str(self.adapter_dir / a.name),
                                           tuple(prompt_ids), tuple(output_ids), self.max_rank)
                rows = await asyncio.wait_for(fut, self.timeout_s)
            except Exception:
                log.exception("attribution of adapter %s failed; its contributors' part goes to its owner", a.name)
                continue
            shares = tuple(ContributorShare(addr, score, bps) for addr, score, bps in rows if bps > 0)
            if shares:
                out[a.adapter_id] = shares
        if out:
            self.scored += 1
        return out

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


__all__ = ["AdapterToScore", "AttributionWorker"]
