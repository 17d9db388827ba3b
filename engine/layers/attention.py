"""Attention over the paged KV cache: write this step's K/V into their slots, then attend.

The same call serves decode, prefill, chunked prefill and prefill after a shared prefix; the step's
shape lives in the context (see docs/engine-kernels.md).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.context import get_context
from kernels import dispatch


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        # [num_blocks, block_size, num_kv_heads, head_dim], bound by the model runner
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
        ctx = get_context()
        dispatch.write_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        return dispatch.paged_attention(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.seq_lens,
                                        ctx.query_start_loc, self.scale)
