"""Per-step batch metadata that every layer reads, set once by the runner before a forward pass.

Threading these through each forward signature would touch every layer for every new field; one
module-level context (nano-vllm's pattern) keeps layer code about math. Single-threaded by design:
one runner drives one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Context:
    # paged attention (docs/engine-kernels.md)
    slot_mapping: torch.Tensor | None = None  # [T] int64, block * block_size + offset
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32, -1 padded
    seq_lens: torch.Tensor | None = None  # [B] int32, context length including this step
    query_start_loc: torch.Tensor | None = None  # [B+1] int32
    # LoRA: None when no token of the step uses an adapter (the common base-model path pays nothing)
    lora_meta: Any = None  # kernels.lora.LoRABatchMeta
    lora_pool: Any = None  # object with lora_a, lora_b, rank, scale (engine/adapters slot pool)
    # influence: per token, sum over LoRA'd projections of |delta| / |base output|, and how many
    influence_sum: torch.Tensor | None = None  # [T] float32
    influence_count: int = 0
    # Triton path: h and influence sums of every LoRA'd projection, zeroed once (engine/lora_workspace.py)
    lora_workspace: Any = None


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(ctx: Context) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def reset_context() -> None:
    set_context(Context())
