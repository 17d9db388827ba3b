"""Linear projections that add each token's own LoRA delta (Punica-style segmented gather).

A projection may fuse several HF projections along its output (q/k/v, gate/up): one base matmul,
one LoRA shrink over all slices and one expand into the concatenated output. Which adapter a token
uses comes from the step's context (its slot in the pool), never from a Python loop over adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.context import get_context
from engine.layers.quant import base_linear
from engine.lora_workspace import add_influence_ratio
from kernels import dispatch
from kernels import lora as lora_kernels
from kernels import native_cpu

# the batch size oneDNN packs base weights for (any size runs; decode batches are a few to a few dozen)
PACK_HINT_TOKENS = 8


@dataclass
class CpuDecodeLayouts:
    """How a base weight is multiplied on CPU, where one thread's fp32 speed depends on the BLAS call far more
    than on the flops. Measured on SmolLM2's shapes (AMD EPYC, torch 2.13's MKL and oneDNN, 30 layers, cold
    weights; ms per step at 1 / 8 tokens): gate_up F.linear 18.4 / 29.1, column-major weight 10.5 / 33.4,
    oneDNN-packed 14.9 / 16.0; lm_head 10.2 / 19.0, 5.0 / 21.1, 7.5 / 7.8; down 7.0 / 12.1, 8.4 / 13.5,
    8.2 / 7.7 (oneDNN also wins at 3, 16 and 64 tokens). So one-token steps read a column-major weight where
    that wins, and larger steps the oneDNN-packed one."""

    single: torch.Tensor | None = None  # weight for one-token steps (column-major); None: the weight itself
    packed: torch.Tensor | None = None  # oneDNN-packed weight for 2+ tokens (inference only); None: F.linear
    # panel-packed weight for the native kernel (kernels/native_cpu.py), which beats both above up to
    # native_cpu.MAX_GEMM_TOKENS tokens (8 tokens: ~28 vs ~40-50 ms per SmolLM2 step); None where it is off
    native: native_cpu.PackedWeight | None = None


def cpu_decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      layouts: CpuDecodeLayouts | None) -> torch.Tensor | None:
    """x @ weight.T + bias through the layout chosen for this step's size, or None where none applies."""
    if layouts is None or x.is_cuda or x.dim() != 2:
        return None
    if layouts.native is not None and x.shape[0] <= native_cpu.MAX_GEMM_TOKENS and not torch.is_grad_enabled():
        return native_cpu.gemm(x, layouts.native, bias)
    if x.shape[0] == 1:
        return None if layouts.single is None else F.linear(x, layouts.single, bias)
    if layouts.packed is not None and not torch.is_grad_enabled():  # the oneDNN op has no autograd
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), layouts.packed, bias, "none", [], "")
    return None


def column_major(w: torch.Tensor) -> torch.Tensor:
    """A copy of w [out, in] stored column-major (same shape, strides (1, out))."""
    return w.detach().t().contiguous().t()


def onednn_packed(w: torch.Tensor) -> torch.Tensor | None:
    """w [out, in] packed for oneDNN's fp32 matmul (a private torch op), or None where this build lacks it."""
    if w.is_cuda or w.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), PACK_HINT_TOKENS)
    except (AttributeError, RuntimeError):
        return None


# CPU steps up to this many tokens (decode) apply LoRA through the pool's live rows (kernels.lora.LiveRows):
# every token meets every loaded adapter's rows, so larger steps (prefill) take the per-slot references
LIVE_ROWS_MAX_TOKENS = 64


@dataclass
class _LiveRowsCache:
    """kernels.lora.LiveRows of one projection, gathered again only when a pool tensor it was read from is
    written (an adapter loaded or cleared moves the version counter of the pool's stacked tensors)."""

    sources: list[tuple[torch.Tensor, int]]  # (pool tensor, its version when read): A and B of each slice, rank
    rows: lora_kernels.LiveRows
    native: native_cpu.NativeRows | None = None  # the same rows laid out for the native kernel, made on first use

    def fresh(self, tensors: list[torch.Tensor]) -> bool:
        return len(tensors) == len(self.sources) and all(t is src and t._version == v
                                                         for t, (src, v) in zip(tensors, self.sources))


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
        self._live: _LiveRowsCache | None = None
        self.cpu_decode: CpuDecodeLayouts | None = None  # set by prepare_cpu_decode (CPU engines only)

    def prepare_cpu_decode(self, column_major_weight: bool, native: bool = False) -> None:
        """Pick this projection's CPU layouts (CpuDecodeLayouts), once its weight is loaded. A column-major
        weight replaces the row-major one (same values; no second copy); the oneDNN-packed one is a second
        copy. With `native` (and a compiler to build kernels/native_cpu.py) decode-sized steps read a third,
        panel-packed copy, and LoRA on such steps runs natively too; one-token steps then no longer need the
        column-major weight. A quantized weight keeps its own path."""
        if self.weight is None or self.weight.is_cuda:
            return
        packed = onednn_packed(self.weight)
        use_native = native and self.weight.dtype == torch.float32 and native_cpu.available()
        pw = native_cpu.pack(self.weight) if use_native else None
        if column_major_weight and pw is None:
            self.weight.data = column_major(self.weight.data)
        self.cpu_decode = CpuDecodeLayouts(None, packed, pw)

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

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if self.cpu_decode is not None and self.weight is not None:
            y = cpu_decode_linear(x, self.weight, self.bias, self.cpu_decode)
        if y is None:
            y = base_linear(self, x)  # F.linear, or the 4-bit matmul of a quantized weight (layers/quant.py)
        return y

    def forward_silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of this gate/up projection, each token's LoRA delta included. On the Triton path with
        adapters the expand and the activation are one kernel (kernels.lora.lora_expand_silu_mul_triton): the
        [T, 2I] output is read once instead of read, written and read again."""
        ctx = get_context()
        pool = ctx.lora_pool
        mods = self._slices(pool)[0] if ctx.lora_meta is not None else []
        if len(self.modules_) != 2 or len(mods) != 2 or not dispatch.use_triton(x):
            return dispatch.silu_mul(self(x))
        return self._expand_triton(self._base(x), x, mods, pool, ctx, silu_mul=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base(x)
        ctx = get_context()
        if ctx.lora_meta is None:
            return y
        pool = ctx.lora_pool
        mods, spans = self._slices(pool)
        if not mods:
            return y
        if (self.cpu_decode is not None and self.cpu_decode.native is not None and self._live_rows_apply(x)
                and y.is_contiguous() and ctx.lora_meta.token_slots.dtype == torch.int32):
            rows = self._native_rows(mods, spans, pool)
            if rows is not None:
                # the delta of each token's adapter and, when collected, its influence ratio in one C call
                native_cpu.lora(x, y, rows, ctx.lora_meta.token_slots, pool.scale, ctx.influence_sum)
                ctx.influence_count += ctx.influence_sum is not None
                return y
        whole = len(mods) == len(self.modules_)
        if whole and ctx.influence_sum is None:
            self._add_delta(y, x, mods, [w for _, _, w in spans], pool, ctx)
            return y
        if whole and dispatch.use_triton(y):
            return self._expand_triton(y, x, mods, pool, ctx)
        delta = y.new_zeros(y.shape[0], sum(w for _, _, w in spans))
        self._add_delta(delta, x, mods, [w for _, _, w in spans], pool, ctx)
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

    def _expand_triton(self, y: torch.Tensor, x: torch.Tensor, mods: list[str], pool, ctx,
                       silu_mul: bool = False) -> torch.Tensor:
        """Triton: the expand adds the delta into y (or, with `silu_mul`, returns the MLP activation of y plus
        the delta, y untouched) and, with influence on, sums |delta|^2 and |base y|^2 per token as it goes (no
        delta buffer, no row norms over [T, out]); then one ratio per token joins the influence sum."""
        b = [pool.lora_b[m][self.layer_idx] for m in mods]
        h = self._shrink(x, [pool.lora_a[m][self.layer_idx] for m in mods], pool, ctx)
        sums = own = None
        if ctx.influence_sum is not None:
            ws = ctx.lora_workspace
            # the step's workspace takes the ratio once for all projections (LoRAWorkspace.finish); without one
            # (or with no room) the projection takes its own
            sums = ws.take_sums(y.shape[0]) if ws is not None else None
            if sums is None:
                sums = own = torch.zeros(2, y.shape[0], dtype=torch.float32, device=y.device)
        if silu_mul:
            y = lora_kernels.lora_expand_silu_mul_triton(y, h, b, pool.rank, pool.scale, ctx.lora_meta,
                                                         influence=sums)
        else:
            lora_kernels.lora_expand_triton(y, h, b, pool.rank, pool.scale, ctx.lora_meta, influence=sums)
        if own is not None:
            add_influence_ratio(ctx.influence_sum, own)
        ctx.influence_count += sums is not None
        return y

    def _add_delta(self, out: torch.Tensor, x: torch.Tensor, mods: list[str], widths: list[int], pool, ctx) -> None:
        """out [T, sum(widths)] += each token's LoRA delta over the slices `mods`."""
        a = [pool.lora_a[m][self.layer_idx] for m in mods]
        b = [pool.lora_b[m][self.layer_idx] for m in mods]
        if self._live_rows_apply(x):
            rows = self._live_rows(a, b, pool.rank)
            if rows is not None:
                outs = out.split_with_sizes(widths, dim=1) if len(widths) > 1 else (out,)
                lora_kernels.lora_live_rows(x, outs, rows, pool.scale, ctx.lora_meta)
                return
        h = self._shrink(x, a, pool, ctx)
        dispatch.lora_expand(out, h, b, pool.rank, pool.scale, ctx.lora_meta)

    @staticmethod
    def _shrink(x: torch.Tensor, a: list[torch.Tensor], pool, ctx) -> torch.Tensor:
        """h for these slices; in the step's zeroed workspace when there is one (Triton path) and it has room."""
        ws = ctx.lora_workspace
        out = ws.take_h(len(a), x.shape[0], a[0].shape[1]) if ws is not None else None
        if out is not None:
            return lora_kernels.lora_shrink_triton(x, a, pool.rank, ctx.lora_meta, out=out)
        return dispatch.lora_shrink(x, a, pool.rank, ctx.lora_meta)

    @staticmethod
    def _live_rows_apply(x: torch.Tensor) -> bool:
        # inference only (training backpropagates through the references into the pool), float32 as the
        # references compute, and never where the dispatcher would pick Triton
        return (x.shape[0] <= LIVE_ROWS_MAX_TOKENS and x.dtype == torch.float32 and not x.is_cuda
                and not torch.is_grad_enabled() and not dispatch.use_triton(x))

    def _native_rows(self, mods: list[str], spans, pool) -> native_cpu.NativeRows | None:
        a = [pool.lora_a[m][self.layer_idx] for m in mods]
        b = [pool.lora_b[m][self.layer_idx] for m in mods]
        if self._live_rows(a, b, pool.rank) is None:
            return None
        live = self._live
        if live.native is None:
            live.native = native_cpu.native_rows(live.rows, [col for col, _, _ in spans])
        return live.native

    def _live_rows(self, a: list[torch.Tensor], b: list[torch.Tensor], rank: torch.Tensor):
        """This projection's LiveRows, gathered again when the pool changed; None where versions are not
        tracked (tensors made under inference_mode), which leaves the step to the references."""
        tensors = [*a, *b, rank]
        if self._live is not None and self._live.fresh(tensors):
            return self._live.rows
        try:
            sources = [(t, t._version) for t in tensors]
        except RuntimeError:
            return None
        # versions read before the gather: a load racing with it moves them, so the next step gathers again
        self._live = _LiveRowsCache(sources, lora_kernels.live_rows(a, b, rank))
        return self._live.rows
