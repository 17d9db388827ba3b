"""4-bit weight-only quantization (group-wise, asymmetric) and a matmul that dequantizes on the fly.

A linear weight w [N, K] is cut along K into groups of `group_size`; each (row, group) gets a scale and a
zero point so that w ~= (q - zero) * scale with q in 0..15 (scale = (max - min) / 15, zero = -min / scale). Two 4-bit codes share a byte:

    qweight: [N, K // 2] uint8    byte j of a row holds k = 2j (low nibble) and k = 2j + 1 (high nibble)
    scales:  [N, K // group_size]  in the weight's dtype
    zeros:   [N, K // group_size]  in the weight's dtype (float zero point = -min / scale)

`quant_matmul(x, qw)` computes x @ w.T. The Triton kernel tiles the output in BLOCK_M x BLOCK_N; for each
BLOCK_K slice of K (inside one group, so one scale/zero per row) it loads BLOCK_N x BLOCK_K/2 packed bytes,
splits the nibbles, dequantizes to x's dtype in registers and feeds the tensor cores: weights cross memory
at ~4.25 bits each instead of 16. The reference dequantizes the whole weight and calls torch.matmul.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

__all__ = ["QuantizedWeight", "quantize_linear_weight", "dequantize", "quant_matmul", "quant_matmul_ref",
           "quant_matmul_triton"]


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor  # shape [N, K // 2] uint8
    scales: torch.Tensor  # shape [N, K // group_size]
    zeros: torch.Tensor  # shape [N, K // group_size]
    group_size: int
    shape: tuple[int, int]  # (N, K) of the original weight

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def quantize_linear_weight(w: torch.Tensor, group_size: int = 128) -> QuantizedWeight:
    """Round-to-nearest asymmetric 4-bit quantization of w [N, K], one scale/zero per group_size along K."""
    if w.dim() != 2:
        raise ValueError(f"quantize_linear_weight: w must be [N, K], got {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"quantize_linear_weight: w must be floating point, got {w.dtype}")
    N, K = w.shape
    if group_size < 2 or group_size % 2 or K % group_size:
        raise ValueError(f"quantize_linear_weight: group_size {group_size} must be even and divide K={K}")
    g = w.float().view(N, K // group_size, group_size)
    lo = g.amin(dim=2)
    hi = g.amax(dim=2)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    # a float zero point puts the group's minimum exactly on code 0 (no rounding of the offset)
    zero = -lo / scale
    q = torch.clamp(torch.round(g / scale[..., None] + zero[..., None]), 0, 15).to(torch.uint8).view(N, K)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return QuantizedWeight(packed.contiguous(), scale.to(w.dtype), zero.to(w.dtype), group_size, (N, K))


def dequantize(qw: QuantizedWeight) -> torch.Tensor:  # shape [N, K] in the scales' dtype
    N, K = qw.shape
    q = torch.stack([qw.qweight & 0xF, qw.qweight >> 4], dim=2).view(N, K).float()
    g = q.view(N, K // qw.group_size, qw.group_size)
    w = (g - qw.zeros.float()[..., None]) * qw.scales.float()[..., None]
    return w.view(N, K).to(qw.scales.dtype)


def _check(x: torch.Tensor, qw: QuantizedWeight) -> None:
    if not isinstance(qw, QuantizedWeight):
        raise ValueError("quant_matmul: qw must be a QuantizedWeight from quantize_linear_weight")
    if x.shape[-1] != qw.shape[1]:
        raise ValueError(f"quant_matmul: x has {x.shape[-1]} features, the weight expects {qw.shape[1]}")
    if x.device != qw.qweight.device:
        raise ValueError(f"quant_matmul: x is on {x.device}, the weight on {qw.qweight.device}")
    if x.dtype != qw.scales.dtype:
        raise ValueError(f"quant_matmul: x is {x.dtype} but the weight's scales are {qw.scales.dtype}")


def quant_matmul_ref(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:  # shape [..., N]
    _check(x, qw)
    return torch.matmul(x, dequantize(qw).T)


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["M"])  # M is the step's token count (kernels/lora.py says why)
    def _quant_matmul_kernel(
        # pointers
        x_ptr,  # shape [M, K]
        qw_ptr,  # shape [N, K // 2] uint8
        s_ptr,  # shape [N, K // G]
        z_ptr,  # shape [N, K // G]
        out_ptr,  # shape [M, N]
        # dimensions
        M,
        N,
        K,
        G,
        # strides
        stride_xm,
        stride_qn,
        stride_sn,
        stride_om,
        # meta-parameters
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,  # divides G, so one scale/zero per row per K step
        PRECISION: tl.constexpr,
        SPLIT_K: tl.constexpr,  # > 1: axis 2 splits K, parts meet through float32 atomics in out
        K_PER_SPLIT,  # multiple of BLOCK_K
    ):
        # Program ids: axis 0 = BLOCK_M rows of x, axis 1 = BLOCK_N output features, axis 2 = K split
        # (decode has one row tile, so splitting K is what fills the GPU while streaming the 4-bit weights).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = offs_m < M
        n_ok = offs_n < N
        offs_kb = tl.arange(0, BLOCK_K // 2)  # packed bytes of one K step
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_lo = pid_k * K_PER_SPLIT
        for k0 in range(k_lo, tl.minimum(K, k_lo + K_PER_SPLIT), BLOCK_K):
            xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + (k0 + offs_k)[None, :],
                         mask=m_ok[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
            packed = tl.load(qw_ptr + offs_n[:, None].to(tl.int64) * stride_qn + (k0 // 2 + offs_kb)[None, :],
                             mask=n_ok[:, None], other=0)  # [BLOCK_N, BLOCK_K // 2] uint8
            # split the nibbles and put them back in k order: (low, high) of byte j are k = 2j, 2j + 1
            q = tl.join(packed & 0xF, packed >> 4).reshape(BLOCK_N, BLOCK_K)
            grp = k0 // G
            s = tl.load(s_ptr + offs_n.to(tl.int64) * stride_sn + grp, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs_n.to(tl.int64) * stride_sn + grp, mask=n_ok, other=0.0).to(tl.float32)
            w = ((q.to(tl.float32) - z[:, None]) * s[:, None]).to(xt.dtype)  # [BLOCK_N, BLOCK_K]
            acc += tl.dot(xt, tl.trans(w), input_precision=PRECISION)
        o_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        if SPLIT_K == 1:
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
        else:
            tl.atomic_add(o_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])


# target number of programs per launch; the K split is chosen to reach it (benchmarks sweep it)
TUNING = dict(programs=256)


def quant_matmul_triton(x: torch.Tensor, qw: QuantizedWeight, *, block_m: int | None = None,
                        block_n: int | None = None, block_k: int | None = None, split_k: int | None = None,
                        num_warps: int | None = None) -> torch.Tensor:
    if not HAVE_TRITON:
        raise RuntimeError("Triton is not installed; use quant_matmul_ref or quant_matmul")
    _check(x, qw)
    N, K = qw.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if M == 0:
        return torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    bk = block_k or next(b for b in (128, 64, 32, 16) if qw.group_size % b == 0 or b == 16)
    if qw.group_size % bk or bk < 16:
        raise ValueError(f"quant_matmul: block_k {bk} must be >= 16 and divide group_size {qw.group_size}")
    bm = block_m or (16 if M <= 16 else 32 if M <= 32 else 64 if M <= 64 else 128)
    bn = block_n or (64 if M <= 64 else 128)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    k_chunks = K // bk
    if split_k is None:
        split_k = max(1, min(k_chunks, TUNING["programs"] // tiles))
    k_per_split = triton.cdiv(k_chunks, split_k) * bk
    split_k = triton.cdiv(K, k_per_split)
    # split K: float32 partial sums meet in a zeroed buffer, cast at the end
    out = (torch.zeros(M, N, dtype=torch.float32, device=x.device) if split_k > 1
           else torch.empty(M, N, dtype=x.dtype, device=x.device))
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn), split_k)
    _quant_matmul_kernel[grid](
        x2, qw.qweight, qw.scales, qw.zeros, out,
        M, N, K, qw.group_size,
        x2.stride(0), qw.qweight.stride(0), qw.scales.stride(0), out.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        SPLIT_K=split_k, K_PER_SPLIT=k_per_split,
        num_warps=num_warps or (8 if bm * bn >= 128 * 128 else 4),
    )
    return out.to(x.dtype).view(*lead, N)


def quant_matmul(x: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """x [..., K] @ dequantized(qw).T -> [..., N]: Triton on CUDA, the reference elsewhere (see dispatch)."""
    from kernels import dispatch

    if dispatch.use_triton(x):
        return quant_matmul_triton(x, qw)
    return quant_matmul_ref(x, qw)
