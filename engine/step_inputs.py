"""A SchedulerOutput laid out as flat per-token and per-sequence lists: the one place that decides, for a
step, which token ids run at which positions, where their K/V go and which adapter slot each uses. The eager
runner (engine/model_runner.py) and the CUDA-graph path (engine/cuda_graph.py) both copy these to the device."""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch

from engine.sequence import PENDING


@dataclass
class StepInputs:
    input_ids: list[int] = field(default_factory=list)  # per token, in batch order
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)  # block * block_size + offset of the token's K/V
    token_slots: list[int] = field(default_factory=list)  # adapter slot of the token's sequence, -1 for none
    seq_lens: list[int] = field(default_factory=list)  # per sequence: context length including this step
    qsl: list[int] = field(default_factory=lambda: [0])  # query start offsets, B + 1
    logits_rows: list[int] = field(default_factory=list)  # token rows whose next token is sampled
    # tokens still on the device (PENDING, EngineConfig.async_steps): their row here and their row among
    # the previous step's sampled ids, which the runner copies in on the device
    pending_dst: list[int] = field(default_factory=list)
    pending_src: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, out, block_size: int) -> StepInputs:
        x = cls()
        ids, pos, slots, lora, lens, qsl, rows = (x.input_ids, x.positions, x.slot_mapping, x.token_slots,
                                                  x.seq_lens, x.qsl, x.logits_rows)
        q = 0
        for s in out.scheduled:
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            table = seq.block_table
            if n == 1:
                # a decode row (most rows of most steps): no slices, ranges or generators; this loop runs
                # before every step while the GPU waits for its inputs
                tok = seq.token_ids[start]
                if tok == PENDING:
                    x.pending_dst.append(q)
                    x.pending_src.append(seq.pending_row)
                ids.append(tok)
                pos.append(start)
                slots.append(table[start // block_size] * block_size + start % block_size)
                lora.append(seq.lora_slot)
            else:
                ids.extend(seq.token_ids[start:start + n])
                if seq.has_pending and start + n == len(seq.token_ids):  # only the last token can be in flight
                    x.pending_dst.append(q + n - 1)
                    x.pending_src.append(seq.pending_row)
                span = range(start, start + n)
                pos.extend(span)
                slots.extend(table[p // block_size] * block_size + p % block_size for p in span)
                lora.extend([seq.lora_slot] * n)
            lens.append(start + n)
            q += n
            qsl.append(q)
            if s.sample:
                rows.append(q - 1)
        return x

    @property
    def uses_lora(self) -> bool:
        return any(s >= 0 for s in self.token_slots)


def padded_tables(scheduled, width: int, fill: int) -> list[int]:
    """Every scheduled sequence's block table padded with `fill` to `width` entries, flattened in batch order."""
    out: list[int] = []
    pad = [fill] * width
    for s in scheduled:
        table = s.seq.block_table
        out += table
        if len(table) < width:
            out += pad[:width - len(table)]
    return out


def copy_pending(input_ids: torch.Tensor, pending: torch.Tensor, prev_ids: torch.Tensor | None) -> None:
    """input_ids[dst] = prev_ids[src] on the device, `pending` holding dst then src (StepInputs.pending_*)."""
    n = pending.shape[0] // 2
    if not n:
        return
    if prev_ids is None:
        raise RuntimeError("a step reads tokens still in flight but was given no previous step's ids")
    input_ids.index_copy_(0, pending[:n], prev_ids.index_select(0, pending[n:]))


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait for the GPU: a plain .to(cuda) from pageable
    memory synchronises the stream, i.e. waits for the step already running (EngineConfig.async_steps)."""
    device = torch.device(device)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `t`, queued behind the work that makes it (CUDA: pinned memory, no wait; read it once the
    step's event has completed). On CPU a clone: the source may be a static buffer the next step overwrites."""
    if not t.is_cuda:
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return out.copy_(t, non_blocking=True)


def int64_tensor(values: list[int]) -> torch.Tensor:
    """A CPU int64 tensor of a list of ints, through array's C loop (torch.tensor on a list is ~4x slower: at
    batch 256 this is ~10k values before every step)."""
    return torch.frombuffer(array("q", values), dtype=torch.int64) if values else torch.zeros(0, dtype=torch.int64)
