"""Linear projections that add each token's own LoRA delta (Punica-style segmented gather).

A projection may fuse several HF projections along its output (q/k/v, gate/up): one base matmul,
one LoRA shrink over all slices and one expand into the concatenated output. Which adapter a token
uses comes from the step's context (its slot in the pool), never from a Python loop over adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.context import get_context
from kernels import dispatch


class LoRALinear(nn.Module):
    def __init__(self, in_features: int, out_sizes: list[int], modules: list[str], layer_idx: int,
                 bias: bool = False):
        super().__init__()
        assert len(out_sizes) == len(modules)
        self.out_sizes = list(out_sizes)
        self.modules_ = list(modules)  # HF projection names, the slot pool's keys
        self.layer_idx = layer_idx
        self.weight = nn.Parameter(torch.empty(sum(out_sizes), in_features))
        self.bias = nn.Parameter(torch.zeros(sum(out_sizes))) if bias else None
        self._slice_key: tuple[str, ...] | None = None
        self._slice_cache: tuple = ([], [])

    def _slices(self, pool) -> tuple[list[str], list[tuple[int, int, int]]]:
        """Modules of this projection the pool holds, and (y column, delta column, width) of each.

        A pool built for a subset of target modules (say q and v only) leaves the other slices alone."""
        # keyed by the modules the pool holds (all the slices depend on), not by id(pool): a new pool
        # may reuse a freed pool's id while holding other modules
        key = tuple(pool.lora_a)
        if self._slice_key != key:
            mods, spans, col, dcol = [], [], 0, 0
            for m, out in zip(self.modules_, self.out_sizes):
                if m in pool.lora_a:
                    mods.append(m)
                    spans.append((col, dcol, out))
                    dcol += out
                col += out
            self._slice_key, self._slice_cache = key, (mods, spans)
        return self._slice_cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        ctx = get_context()
        if ctx.lora_meta is None:
            return y
        pool = ctx.lora_pool
        mods, spans = self._slices(pool)
        if not mods:
            return y
        a = [pool.lora_a[m][self.layer_idx] for m in mods]
        b = [pool.lora_b[m][self.layer_idx] for m in mods]
        h = dispatch.lora_shrink(x, a, pool.rank, ctx.lora_meta)
        whole = len(mods) == len(self.modules_)
        if whole and ctx.influence_sum is None:
            dispatch.lora_expand(y, h, b, pool.rank, pool.scale, ctx.lora_meta)
            return y
        delta = y.new_zeros(y.shape[0], sum(w for _, _, w in spans))
        dispatch.lora_expand(delta, h, b, pool.rank, pool.scale, ctx.lora_meta)
        if ctx.influence_sum is not None:
            # Influence: how large each token's LoRA delta is next to the base output. The norms
            # accumulate in float32 straight from the activations (no float copies) and one addcdiv_
            # adds the ratio: four small kernels per projection beyond the delta buffer.
            dn = torch.linalg.vector_norm(delta, dim=-1, dtype=torch.float32)
            yn = torch.linalg.vector_norm(y, dim=-1, dtype=torch.float32).clamp_min_(1e-6)
            ctx.influence_sum.addcdiv_(dn, yn)
            ctx.influence_count += 1
        if whole:
            return y.add_(delta)
        for col, dcol, w in spans:
            y[:, col:col + w] += delta[:, dcol:dcol + w]
        return y
