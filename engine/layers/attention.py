"""Attention over the paged KV cache: write this step's K/V into their slots, then attend.

The same call serves decode, prefill, chunked prefill and prefill after a shared prefix; the step's
shape lives in the context (see docs/engine-kernels.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.context import Context, get_context
from kernels import attention as attn_kernels
from kernels import dispatch
from kernels import native_cpu


@dataclass
class _CpuStepPlan:
    """What every layer of a CPU step needs beyond the context, derived once from it (first layer) instead
    of once per layer: on CPU a small model's decode step is made of small ops, so these add up."""

    ctx: Context | None = None  # the context this plan was made for (held, so its id is never reused)
    slots: torch.Tensor | None = None  # slot_mapping as int64; None when some are < 0 (padding to skip)
    decode: attn_kernels.DecodePlan | None = None  # None unless every sequence has one query token


_cpu_plan = _CpuStepPlan()


def _plan_for(ctx: Context, num_tokens: int, block_size: int) -> _CpuStepPlan:
    global _cpu_plan
    if _cpu_plan.ctx is not ctx:
        slots = ctx.slot_mapping.long()
        _cpu_plan = _CpuStepPlan(ctx, slots if bool((slots >= 0).all()) else None,
                                 attn_kernels.decode_plan(ctx.block_tables, ctx.seq_lens, num_tokens, block_size))
    return _cpu_plan


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        # [num_blocks, block_size, num_kv_heads, head_dim], bound by the model runner
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.native_decode = False  # CPU engines with the native kernels (LlamaForCausalLM.prepare_cpu_decode)

    def decode_from_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
        """A pure-decode CPU step's whole attention (RoPE, KV write, paged attention) in one native call, from
        the fused qkv output -> [T, H * D]; None where that path does not apply (the caller runs the others)."""
        ctx = get_context()
        if (not self.native_decode or qkv.is_cuda or torch.is_grad_enabled() or qkv.dtype != torch.float32
                or ctx.seq_lens is None or ctx.seq_lens.shape[0] != qkv.shape[0]):
            return None
        t = qkv.shape[0]
        return native_cpu.decode_attention(qkv, cos.reshape(t, -1), sin.reshape(t, -1), self.k_cache, self.v_cache,
                                           ctx.slot_mapping, ctx.block_tables, ctx.seq_lens, self.num_heads,
                                           self.scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H, D]."""
        ctx = get_context()
        if not q.is_cuda and not dispatch.use_triton(q) and not torch.is_grad_enabled():
            return self._forward_cpu(q, k, v, ctx)
        dispatch.write_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        return self.attend(q)

    def rope_write_kv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """From the fused qkv output [T, (H + 2*Hkv) * D]: rotate q and k, write k and v into this layer's
        caches (one kernel on the Triton path) -> rotated q [T, H, D], ready for `attend`."""
        return dispatch.rope_write_kv(qkv, cos, sin, self.k_cache, self.v_cache, get_context().slot_mapping,
                                      self.num_heads, self.num_kv_heads, self.head_dim)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """q [T, H, D] -> [T, H, D], attending over the caches, with this step's K/V already written."""
        ctx = get_context()
        return dispatch.paged_attention(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.seq_lens,
                                        ctx.query_start_loc, self.scale)

    def _forward_cpu(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The references, with the per-step work hoisted into one plan for all layers (same results)."""
        plan = _plan_for(ctx, q.shape[0], self.k_cache.shape[1])
        if plan.slots is None:
            attn_kernels.write_kv_ref(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        else:
            self.k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, plan.slots, k)
            self.v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, plan.slots, v)
        if plan.decode is not None:
            return attn_kernels.paged_decode_ref(q, self.k_cache, self.v_cache, plan.decode, self.scale)
        return attn_kernels.paged_attention_ref(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.seq_lens,
                                                ctx.query_start_loc, self.scale)
