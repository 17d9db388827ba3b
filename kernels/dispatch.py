"""The engine's single entry point to the kernels: Triton on CUDA tensors, the PyTorch reference elsewhere.

`OPENLORA_KERNELS` (read on every call) overrides the choice:
    auto (default)  Triton when the data tensor is on CUDA and Triton imports, else the reference
    torch           always the reference
    triton          always Triton (on CPU this needs TRITON_INTERPRET=1 set before triton is imported)
"""

from __future__ import annotations

import os

import torch

from kernels import attention as _attn
from kernels import elementwise as _elt
from kernels import lora as _lora
from kernels.lora import LoRABatchMeta, make_lora_meta

__all__ = [
    "LoRABatchMeta",
    "make_lora_meta",
    "lora_shrink",
    "lora_expand",
    "write_kv",
    "paged_attention",
    "add_rmsnorm",
    "silu_mul",
    "rope_write_kv",
    "use_triton",
]

_CHOICES = ("auto", "torch", "triton")


def use_triton(t: torch.Tensor) -> bool:
    """Whether a call on tensor `t` goes to the Triton kernel."""
    mode = os.environ.get("OPENLORA_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _CHOICES:
        raise ValueError(f"OPENLORA_KERNELS must be one of {_CHOICES}, got {mode!r}")
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return t.is_cuda and _lora.HAVE_TRITON


def lora_shrink(
    x: torch.Tensor,  # shape [T, in]
    lora_a: list[torch.Tensor],  # each shape [num_slots, max_rank, in]
    rank: torch.Tensor,  # shape [num_slots] int32
    meta: LoRABatchMeta,
) -> torch.Tensor:  # shape [n_slices, T, max_rank] float32
    if use_triton(x):
        return _lora.lora_shrink_triton(x, lora_a, rank, meta)
    return _lora.lora_shrink_ref(x, lora_a, rank, meta)


def lora_expand(
    y: torch.Tensor,  # shape [T, sum(out_i)], updated in place and returned
    h: torch.Tensor,  # shape [n_slices, T, max_rank]
    lora_b: list[torch.Tensor],  # each shape [num_slots, out_i, max_rank]
    rank: torch.Tensor,  # shape [num_slots] int32
    scale: torch.Tensor,  # shape [num_slots] float32
    meta: LoRABatchMeta,
) -> torch.Tensor:
    if use_triton(y):
        return _lora.lora_expand_triton(y, h, lora_b, rank, scale, meta)
    return _lora.lora_expand_ref(y, h, lora_b, rank, scale, meta)


def write_kv(
    k: torch.Tensor,  # shape [T, Hkv, D]
    v: torch.Tensor,  # shape [T, Hkv, D]
    k_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # shape [T] int64, block * block_size + offset (< 0: skipped)
) -> None:
    if use_triton(k_cache):
        return _attn.write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    return _attn.write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(
    q: torch.Tensor,  # shape [T, H, D]
    k_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # shape [B, max_blocks] int32, -1 padded
    seq_lens: torch.Tensor,  # shape [B] int32, context length including this step's tokens
    query_start_loc: torch.Tensor,  # shape [B+1] int32
    scale: float,
) -> torch.Tensor:  # shape [T, H, D]
    if use_triton(q):
        return _attn.paged_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
    return _attn.paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)


def add_rmsnorm(
    x: torch.Tensor,  # shape [T, N]
    residual: torch.Tensor | None,  # shape [T, N]
    weight: torch.Tensor,  # shape [N]
    eps: float,
):  # out [T, N]; (out, x + residual) when a residual is given
    if use_triton(x):
        return _elt.add_rmsnorm_triton(x, residual, weight, eps)
    return _elt.add_rmsnorm_ref(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:  # shape [T, 2I] (gate | up) -> [T, I]
    if use_triton(gate_up):
        return _elt.silu_mul_triton(gate_up)
    return _elt.silu_mul_ref(gate_up)


def rope_write_kv(
    qkv: torch.Tensor,  # shape [T, (H + 2*Hkv) * D]
    cos: torch.Tensor,  # shape [T, 1, D] or [T, D]
    sin: torch.Tensor,  # shape [T, 1, D] or [T, D]
    k_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # shape [T], block * block_size + offset (< 0: not written)
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:  # q, shape [T, H, D], rotated
    if use_triton(qkv):
        return _elt.rope_write_kv_triton(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads,
                                         head_dim)
    return _elt.rope_write_kv_ref(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
