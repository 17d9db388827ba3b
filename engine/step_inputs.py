"""A SchedulerOutput laid out as flat per-token and per-sequence lists: the one place that decides, for a
step, which token ids run at which positions, where their K/V go and which adapter slot each uses. The eager
runner (engine/model_runner.py) and the CUDA-graph path (engine/cuda_graph.py) both copy these to the device."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepInputs:
    input_ids: list[int] = field(default_factory=list)  # per token, in batch order
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)  # block * block_size + offset of the token's K/V
    token_slots: list[int] = field(default_factory=list)  # adapter slot of the token's sequence, -1 for none
    seq_lens: list[int] = field(default_factory=list)  # per sequence: context length including this step
    qsl: list[int] = field(default_factory=lambda: [0])  # query start offsets, B + 1
    logits_rows: list[int] = field(default_factory=list)  # token rows whose next token is sampled

    @classmethod
    def of(cls, out, block_size: int) -> StepInputs:
        x = cls()
        for s in out.scheduled:
            seq, n = s.seq, s.num_new_tokens
            start = seq.num_computed_tokens
            x.input_ids.extend(seq.token_ids[start:start + n])
            span = range(start, start + n)
            x.positions.extend(span)
            table = seq.block_table
            x.slot_mapping.extend(table[p // block_size] * block_size + p % block_size for p in span)
            x.token_slots.extend([seq.lora_slot] * n)
            x.seq_lens.append(start + n)
            x.qsl.append(x.qsl[-1] + n)
            if s.sample:
                x.logits_rows.append(x.qsl[-1] - 1)
        return x

    @property
    def uses_lora(self) -> bool:
        return any(s >= 0 for s in self.token_slots)
