"""The small per-layer steps of a Llama layer fused into one Triton kernel each, next to their references.

A bf16 decode step spends most of its launches on tiny elementwise ops: RMSNorm is about nine torch ops,
rotary four, `silu(gate) * up` two, then the KV write. Under CUDA graphs each still costs ~2 us, so three
kernels replace them:

    add_rmsnorm(x, residual, weight, eps)   (x + residual) normalised, and x + residual itself
    silu_mul(gate_up)                       silu(gate) * up from the fused gate/up projection
    rope_write_kv(qkv, cos, sin, ...)       q rotated; k rotated and v written into the paged caches

Each reproduces the torch code it replaces (engine/layers/rmsnorm.py, engine/layers/rotary.py,
LlamaMLP, kernels/attention.write_kv_ref) rounding for rounding: every intermediate the torch code
materialises in the activation dtype is rounded to that dtype here too, and the math between those points
is float32, as torch's opmath is. Rounding to bf16 goes through the bits (round to nearest even): Triton's
interpreter truncates on a float32 -> bf16 cast, the GPU rounds, and the bit form is exact on both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.attention import _check_cache, _require_triton, write_kv_ref

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - the CPU engine runs without Triton
    HAVE_TRITON = False

__all__ = [
    "add_rmsnorm_ref",
    "silu_mul_ref",
    "rope_write_kv_ref",
    "rotate_ref",
    "add_rmsnorm_triton",
    "silu_mul_triton",
    "rope_write_kv_triton",
]


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _check_norm(x, residual, weight) -> None:
    if x.dim() != 2 or weight.shape != (x.shape[1],):
        raise ValueError(f"add_rmsnorm: x must be [T, N] and weight [N], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"add_rmsnorm: residual must match x ({tuple(x.shape)}, {x.dtype}), "
                         f"got {tuple(residual.shape)}, {residual.dtype}")
    for name, t in (("residual", residual), ("weight", weight)):
        if t is not None and t.device != x.device:
            raise ValueError(f"add_rmsnorm: {name} is on {t.device} but x is on {x.device}")


def _check_silu_mul(gate_up) -> None:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul: gate_up must be [T, 2I], got {tuple(gate_up.shape)}")


def _check_rope(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim) -> None:
    _check_cache(k_cache, v_cache, "rope_write_kv")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(f"rope_write_kv: qkv must be [T, {width}], got {tuple(qkv.shape)}")
    if head_dim % 2:
        raise ValueError(f"rope_write_kv: head_dim must be even, got {head_dim}")
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or k_cache.dtype != qkv.dtype:
        raise ValueError(f"rope_write_kv: caches [.., .., {num_kv_heads}, {head_dim}] of {qkv.dtype} expected, "
                         f"got {tuple(k_cache.shape)} of {k_cache.dtype}")
    t = qkv.shape[0]
    for name, tab in (("cos", cos), ("sin", sin)):
        if tab.numel() != t * head_dim or tab.shape[0] != t or tab.shape[-1] != head_dim:
            raise ValueError(f"rope_write_kv: {name} must be [T, 1, {head_dim}] or [T, {head_dim}], "
                             f"got {tuple(tab.shape)}")
        if tab.dtype != qkv.dtype:  # a float32 table would turn the torch math float32 (RotaryEmbedding.tables)
            raise ValueError(f"rope_write_kv: {name} must be in qkv's dtype {qkv.dtype}, got {tab.dtype}")
    if slot_mapping.shape != (t,) or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rope_write_kv: slot_mapping must be [{t}] integers, got {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
    for name, x in (("qkv", qkv), ("cos", cos), ("sin", sin), ("slot_mapping", slot_mapping)):
        if x.device != k_cache.device:
            raise ValueError(f"rope_write_kv: {name} is on {x.device} but the cache is on {k_cache.device}")


# --------------------------------------------------------------------------------------------------
# Plain-PyTorch references (the torch code the kernels replace, op for op)
# --------------------------------------------------------------------------------------------------


def add_rmsnorm_ref(
    x: torch.Tensor,  # shape [T, N]
    residual: torch.Tensor | None,  # shape [T, N]
    weight: torch.Tensor,  # shape [N]
    eps: float,
):  # out [T, N], or (out, x + residual)
    """engine/layers/rmsnorm.RMSNorm.forward: float32 statistics, the weight applied in the input dtype."""
    _check_norm(x, residual, weight)
    if residual is not None:
        x = x + residual
        residual = x
    dtype = x.dtype
    if dtype == torch.float32:
        out = F.rms_norm(x, weight.shape, weight, eps)
        return out if residual is None else (out, residual)
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if residual is None else (out, residual)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:  # shape [T, 2I] (gate | up) -> [T, I]
    _check_silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """engine/layers/rotary.apply_rotary: x [T, heads, D], cos/sin [T, 1, D] -> rotated x (rotate-half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, rotated, sin)


def rope_write_kv_ref(
    qkv: torch.Tensor,  # shape [T, (H + 2*Hkv) * D], q | k | v
    cos: torch.Tensor,  # shape [T, 1, D] (or [T, D]), activation dtype
    sin: torch.Tensor,  # shape [T, 1, D] (or [T, D])
    k_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # shape [T], block * block_size + offset; < 0 = padding, not written
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:  # q, shape [T, H, D] contiguous, rotated
    """LlamaAttention's torch path: q and k rotated as one [T, H + Hkv, D] view, then write_kv_ref."""
    _check_rope(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
    t = qkv.shape[0]
    qk_size = (num_heads + num_kv_heads) * head_dim
    cos, sin = cos.reshape(t, 1, head_dim), sin.reshape(t, 1, head_dim)
    qk = rotate_ref(qkv[:, :qk_size].view(t, num_heads + num_kv_heads, head_dim), cos, sin)
    q, k = qk.split([num_heads, num_kv_heads], dim=1)
    v = qkv[:, qk_size:].view(t, num_kv_heads, head_dim)
    write_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q.contiguous()


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _round_to(x, DTYPE: tl.constexpr):
        """float32 x rounded to DTYPE (nearest even) and held in float32: a value torch stores in DTYPE."""
        y = x
        if DTYPE == tl.bfloat16:
            # bf16 is the top half of a float32: add half an ulp (ties to even) and drop the low 16 bits.
            # Not `x.to(bf16)`: Triton's interpreter truncates there (the GPU rounds); this is exact on both.
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN stays NaN
        elif DTYPE == tl.float16:
            y = x.to(tl.float16).to(tl.float32)
        return y

    @triton.jit
    def _add_rmsnorm_kernel(
        # pointers
        x_ptr,  # shape [T, N], unit column stride
        res_ptr,  # shape [T, N], unit column stride (read when HAS_RESIDUAL)
        w_ptr,  # shape [N]
        out_ptr,  # shape [T, N] contiguous
        new_res_ptr,  # shape [T, N] contiguous, x + residual (written when HAS_RESIDUAL)
        # strides
        stride_x,
        stride_r,
        # dimensions
        eps,
        N: tl.constexpr,
        # meta-parameters
        HAS_RESIDUAL: tl.constexpr,
        BLOCK: tl.constexpr,  # N rounded up to a power of two
    ):
        # One program per row: the whole row sits in registers, so the statistics and the scaling
        # read x (and the residual) once.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        dtype = x_ptr.dtype.element_ty
        h = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + offs, mask=m, other=0.0).to(tl.float32)
            h = _round_to(h + r, dtype)  # torch's add rounds the sum to the activation dtype
            tl.store(new_res_ptr + row * N + offs, h.to(dtype), mask=m)
        # mean of squares (masked lanes are 0), then 1 / sqrt as torch.rsqrt on CPU: IEEE sqrt and division
        ms = tl.math.div_rn(tl.sum(h * h, axis=0), N)
        rstd = tl.math.div_rn(1.0, tl.math.sqrt_rn(ms + eps))
        y = _round_to(h * rstd, dtype)  # h.to(dtype)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + row * N + offs, _round_to(w * y, out_ty).to(out_ty), mask=m)

    @triton.jit
    def _silu_mul_kernel(
        gate_up_ptr,  # shape [T, 2I], unit column stride: gate columns [0, I), up columns [I, 2I)
        out_ptr,  # shape [T, I] contiguous
        stride_gu,
        inter,  # I
        BLOCK: tl.constexpr,
    ):
        # Program (row, column block).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < inter
        src = gate_up_ptr + row * stride_gu
        g = tl.load(src + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(src + inter + cols, mask=m, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        # F.silu's formula, x / (1 + exp(-x)), in float32 with an IEEE division, stored in dtype; then the
        # product of the two dtype values, rounded once
        s = _round_to(tl.math.div_rn(g, 1.0 + tl.exp(-g)), dtype)
        tl.store(out_ptr + row * inter + cols, _round_to(s * u, dtype).to(dtype), mask=m)

    @triton.jit
    def _rope_write_kv_kernel(
        # pointers
        qkv_ptr,  # shape [T, (H + 2*Hkv) * D], unit column stride: q heads, k heads, v heads
        cos_ptr,  # shape [T, D], unit column stride
        sin_ptr,  # shape [T, D], unit column stride
        q_ptr,  # shape [T, H, D] contiguous, output
        k_cache_ptr,  # shape [num_blocks * block_size, Hkv * D] rows
        v_cache_ptr,  # shape [num_blocks * block_size, Hkv * D] rows
        slot_ptr,  # shape [T] int32/int64, < 0 = padding
        # strides
        stride_qkv,
        stride_cos,
        stride_sin,
        # dimensions
        H,
        HKV,
        D: tl.constexpr,
        # meta-parameters
        BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    ):
        # Program (token, head): heads [0, H) are q heads, [H, H + Hkv) k heads; a k head's program also
        # copies the v head of the same index. q and k heads sit side by side in qkv, so head j starts at j * D.
        t = tl.program_id(0).to(tl.int64)
        head = tl.program_id(1)
        HALF: tl.constexpr = D // 2
        offs = tl.arange(0, BLOCK_D)
        m = offs < D
        lower = offs < HALF
        partner = tl.where(lower, offs + HALF, offs - HALF)
        src = qkv_ptr + t * stride_qkv + head * D
        x = tl.load(src + offs, mask=m, other=0.0).to(tl.float32)
        xp = tl.load(src + partner, mask=m, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + t * stride_cos + offs, mask=m, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * stride_sin + offs, mask=m, other=0.0).to(tl.float32)
        rot = tl.where(lower, -xp, xp)  # cat(-x[half:], x[:half])
        dtype = q_ptr.dtype.element_ty
        # addcmul(x * cos, rot, sin): x * cos is stored in dtype, then one float32 multiply-add rounded once
        # (products of two bf16/fp16 values are exact in float32, so a fused multiply-add changes nothing)
        y = _round_to(_round_to(x * c, dtype) + rot * s, dtype).to(dtype)
        if head < H:
            tl.store(q_ptr + (t * H + head) * D + offs, y, mask=m)
        else:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            if slot >= 0:  # padding tokens compute q but write nothing
                dst = slot * (HKV * D) + (head - H) * D + offs
                tl.store(k_cache_ptr + dst, y, mask=m)
                v = tl.load(src + HKV * D + offs, mask=m, other=0.0)
                tl.store(v_cache_ptr + dst, v, mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [T, N] rows with unit column stride (a row-strided view is kept as is)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def add_rmsnorm_triton(x, residual, weight, eps):
    _require_triton()
    _check_norm(x, residual, weight)
    T, N = x.shape
    # the float32 path (F.rms_norm) multiplies in float32; the others multiply weight by an x.dtype tensor
    out = torch.empty(T, N, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_res = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if T > 0:
        x = _rows(x)
        res = _rows(residual) if residual is not None else x
        block = triton.next_power_of_2(N)
        _add_rmsnorm_kernel[(T,)](
            x, res, weight.contiguous(), out, new_res if new_res is not None else out,
            x.stride(0), res.stride(0), eps, N,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)),
        )
    return out if residual is None else (out, new_res)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    _require_triton()
    _check_silu_mul(gate_up)
    T, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(T, inter, dtype=gate_up.dtype, device=gate_up.device)
    if T > 0 and inter > 0:
        gate_up = _rows(gate_up)
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(T, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), inter, BLOCK=block, num_warps=4 if block >= 512 else 1,
        )
    return out


def rope_write_kv_triton(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim):
    _require_triton()
    _check_rope(qkv, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, head_dim)
    T = qkv.shape[0]
    q = torch.empty(T, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if T == 0:
        return q
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rope_write_kv: the caches must be contiguous")
    qkv = _rows(qkv)
    cos, sin = _rows(cos.reshape(T, head_dim)), _rows(sin.reshape(T, head_dim))
    block_d = triton.next_power_of_2(head_dim)
    _rope_write_kv_kernel[(T, num_heads + num_kv_heads)](
        qkv, cos, sin, q, k_cache, v_cache, slot_mapping,
        qkv.stride(0), cos.stride(0), sin.stride(0),
        num_heads, num_kv_heads, head_dim,
        BLOCK_D=block_d, num_warps=1 if block_d <= 256 else 4,
    )
    return q
