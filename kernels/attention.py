"""Paged KV cache writes and attention over block tables (decode, prefill, chunked prefill, shared prefix).

Layout (one pair per layer, see docs/engine-kernels.md):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables:     [B, max_blocks] int32, -1 padded
    seq_lens:         [B] int32, context length including this step's tokens
    query_start_loc:  [B+1] int32, this step's tokens of sequence b are q[qsl[b]:qsl[b+1]]

New token j of sequence b sits at position seq_lens[b] - q_len_b + j and attends causally to every key at
or before that position, so a single function serves decode (q_len 1), prefill, chunked prefill and prefill
after a shared prefix (prior context already in the cache). Every sequence contributes at least one token.

Triton tiling: one program per (query tile of sequence b, kv head). The rows of the tile are
(token, q head of the GQA group) pairs, so each K/V block is read once for the whole group. Keys stream in
BLOCK_N chunks, looked up position by position through the block table, with an online softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

__all__ = [
    "write_kv",
    "paged_attention",
    "write_kv_ref",
    "paged_attention_ref",
    "DecodePlan",
    "decode_plan",
    "paged_decode_ref",
    "write_kv_triton",
    "paged_attention_triton",
]


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, what: str) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{what}: k_cache/v_cache must both be [num_blocks, block_size, Hkv, D], "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype or k_cache.device != v_cache.device:
        raise ValueError(f"{what}: k_cache and v_cache must share dtype and device")


def _check_write(k, v, k_cache, v_cache, slot_mapping) -> None:
    _check_cache(k_cache, v_cache, "write_kv")
    _, _, hkv, d = k_cache.shape
    if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != (hkv, d):
        raise ValueError(f"write_kv: k, v must be [T, {hkv}, {d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
        raise ValueError(f"write_kv: slot_mapping must be [{k.shape[0]}], got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"write_kv: slot_mapping must be an integer tensor, got {slot_mapping.dtype}")
    for name, t in (("k", k), ("v", v), ("slot_mapping", slot_mapping)):
        if t.device != k_cache.device:
            raise ValueError(f"write_kv: {name} is on {t.device} but the cache is on {k_cache.device}")
    if k.dtype != k_cache.dtype or v.dtype != k_cache.dtype:
        raise ValueError(f"write_kv: k/v dtype {k.dtype}/{v.dtype} differs from the cache's {k_cache.dtype}")


def _check_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc) -> None:
    _check_cache(k_cache, v_cache, "paged_attention")
    _, _, hkv, d = k_cache.shape
    if q.dim() != 3 or q.shape[2] != d:
        raise ValueError(f"paged_attention: q must be [T, H, {d}], got {tuple(q.shape)}")
    if q.shape[1] % hkv != 0:
        raise ValueError(f"paged_attention: {q.shape[1]} q heads is not a multiple of {hkv} kv heads")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"paged_attention: q is {q.dtype} but the cache is {k_cache.dtype}")
    if block_tables.dim() != 2 or seq_lens.dim() != 1 or block_tables.shape[0] != seq_lens.shape[0]:
        raise ValueError(
            f"paged_attention: block_tables [B, max_blocks] and seq_lens [B] disagree: "
            f"{tuple(block_tables.shape)} vs {tuple(seq_lens.shape)}"
        )
    if query_start_loc.shape != (seq_lens.shape[0] + 1,):
        raise ValueError(
            f"paged_attention: query_start_loc must be [{seq_lens.shape[0] + 1}], got {tuple(query_start_loc.shape)}"
        )
    for name, t in (("q", q), ("block_tables", block_tables), ("seq_lens", seq_lens),
                    ("query_start_loc", query_start_loc)):
        if t.device != k_cache.device:
            raise ValueError(f"paged_attention: {name} is on {t.device} but the cache is on {k_cache.device}")
        if name != "q" and t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"paged_attention: {name} must be an integer tensor, got {t.dtype}")


# --------------------------------------------------------------------------------------------------
# Plain-PyTorch references
# --------------------------------------------------------------------------------------------------


def write_kv_ref(
    k: torch.Tensor,  # shape [T, Hkv, D]
    v: torch.Tensor,  # shape [T, Hkv, D]
    k_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    slot_mapping: torch.Tensor,  # shape [T] int64, block * block_size + offset; < 0 = skip (padding)
) -> None:
    _check_write(k, v, k_cache, v_cache, slot_mapping)
    nb, bs, hkv, d = k_cache.shape
    slots = slot_mapping.long()
    keep = slots >= 0
    if not bool(keep.all()):
        slots, k, v = slots[keep], k[keep], v[keep]
    k_cache.view(nb * bs, hkv, d).index_copy_(0, slots, k)
    v_cache.view(nb * bs, hkv, d).index_copy_(0, slots, v)


def paged_attention_ref(
    q: torch.Tensor,  # shape [T, H, D]
    k_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor,  # shape [B, max_blocks] int32, -1 padded
    seq_lens: torch.Tensor,  # shape [B] int32
    query_start_loc: torch.Tensor,  # shape [B+1] int32
    scale: float,
) -> torch.Tensor:  # shape [T, H, D]
    """Gather every sequence's K/V from its blocks (padded to the longest) and run one batched
    scaled_dot_product_attention with a causal-offset mask (none when nothing is masked); GQA through
    enable_gqa, so the kv heads are not copied per q head."""
    _check_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    T, H, D = q.shape
    _, bs, hkv, _ = k_cache.shape
    B = seq_lens.shape[0]
    out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    dev = q.device
    qsl = query_start_loc.long()
    q_lens = qsl[1:] - qsl[:-1]  # [B]
    lens = seq_lens.long()
    q_max = int(q_lens.max())
    l_max = int(lens.max())
    n_blk = -(-l_max // bs)

    # K/V: [B, L, Hkv, D] gathered through the block tables (padding blocks read block 0, masked below)
    bt = block_tables[:, :n_blk].reshape(-1).long().clamp(min=0)
    kg = k_cache.index_select(0, bt).view(B, n_blk * bs, hkv, D)[:, :l_max]
    vg = v_cache.index_select(0, bt).view(B, n_blk * bs, hkv, D)[:, :l_max]

    # Queries padded to [B, q_max, H, D]
    j = torch.arange(q_max, device=dev)
    q_valid = j[None, :] < q_lens[:, None]  # [B, q_max]
    tok = (qsl[:-1, None] + j[None, :]).clamp(max=T - 1)
    qp = q[tok]

    # Causal offset mask: query j of b at position lens[b] - q_lens[b] + j sees keys at or before it.
    n = torch.arange(l_max, device=dev)
    pos = (lens - q_lens)[:, None] + j[None, :]  # [B, q_max]
    allowed = n[None, None, :] <= pos[:, :, None]
    # padded query rows look at key 0 only (never an all-masked row, which would give NaN)
    allowed = torch.where(q_valid[:, :, None], allowed, n[None, None, :] == 0)

    qh, kh, vh = qp.transpose(1, 2), kg.transpose(1, 2), vg.transpose(1, 2)
    # decode rows see every key of their sequence up to its length: a mask is needed only for padding
    mask = None if bool(allowed.all()) else allowed[:, None]
    o = _sdpa_gqa(qh, kh, vh, mask, scale)  # [B, H, q_max, D]
    o = o.transpose(1, 2)  # [B, q_max, H, D]
    out[tok[q_valid]] = o[q_valid]
    return out


@dataclass
class DecodePlan:
    """What paged_attention_ref derives from a pure-decode step's metadata (one query per sequence), derived
    once per step instead of once per layer: a CPU decode step of a small model is made of small ops."""

    blocks: torch.Tensor  # shape [B * n_blk] int64, every sequence's first n_blk blocks (padding -> block 0)
    n_blk: int
    l_max: int  # longest context
    mask: torch.Tensor | None  # shape [B, 1, 1, l_max] bool, key n < seq_lens[b]; None when no key is padding


def decode_plan(
    block_tables: torch.Tensor,  # shape [B, max_blocks] int32, -1 padded
    seq_lens: torch.Tensor,  # shape [B] int32
    num_tokens: int,  # T of the step
    block_size: int,
) -> DecodePlan | None:
    """The plan of a step whose every sequence has exactly one query token (T == B), else None (host syncs)."""
    B = seq_lens.shape[0]
    if num_tokens != B or B == 0:
        return None
    lens = seq_lens.long()
    l_max = int(lens.max())
    n_blk = -(-l_max // block_size)
    blocks = block_tables[:, :n_blk].reshape(-1).long().clamp(min=0)
    mask = None
    if int(lens.min()) != l_max:
        mask = (torch.arange(l_max, device=lens.device)[None, :] < lens[:, None])[:, None, None, :]
    return DecodePlan(blocks, n_blk, l_max, mask)


def paged_decode_ref(
    q: torch.Tensor,  # shape [B, H, D], one query per sequence
    k_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor,  # shape [num_blocks, block_size, Hkv, D]
    plan: DecodePlan,
    scale: float,
) -> torch.Tensor:  # shape [B, H, D]
    """paged_attention_ref for a pure-decode step: the same gather and softmax(q k^T) v, without the query
    padding and scatter (each sequence's query is already its own row). The q heads of a GQA group become
    that kv head's query rows ([B, Hkv, H / Hkv, D]): with one query per sequence no causal mask tells them
    apart, and CPU SDPA is faster on that shape than with enable_gqa."""
    B, H, D = q.shape
    _, bs, hkv, _ = k_cache.shape
    kg = k_cache.index_select(0, plan.blocks).view(B, plan.n_blk * bs, hkv, D)[:, :plan.l_max]
    vg = v_cache.index_select(0, plan.blocks).view(B, plan.n_blk * bs, hkv, D)[:, :plan.l_max]
    o = F.scaled_dot_product_attention(q.reshape(B, hkv, H // hkv, D), kg.transpose(1, 2), vg.transpose(1, 2),
                                       attn_mask=plan.mask, scale=scale)
    return o.reshape(B, H, D)


def _sdpa_gqa(q, k, v, mask, scale):
    """SDPA with fewer kv heads than q heads, without materialising repeated K/V where torch allows."""
    H, hkv = q.shape[1], k.shape[1]
    if H != hkv:
        try:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        except TypeError:  # torch < 2.5: repeat the kv heads
            k = k.repeat_interleave(H // hkv, dim=1)
            v = v.repeat_interleave(H // hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _write_kv_kernel(
        k_ptr,  # shape [T, Hkv*D] rows
        v_ptr,  # shape [T, Hkv*D] rows
        k_cache_ptr,  # shape [num_blocks * block_size, Hkv*D]
        v_cache_ptr,  # shape [num_blocks * block_size, Hkv*D]
        slot_ptr,  # shape [T] int64
        stride_kt,
        stride_vt,
        stride_cs,  # cache stride between slots (= Hkv*D)
        HD,
        BLOCK: tl.constexpr,
    ):
        # One program per token copies its Hkv*D row of K and V into its cache slot.
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot < 0:  # padding token
            return
        offs = tl.arange(0, BLOCK)
        m = offs < HD
        kr = tl.load(k_ptr + t.to(tl.int64) * stride_kt + offs, mask=m)
        vr = tl.load(v_ptr + t.to(tl.int64) * stride_vt + offs, mask=m)
        tl.store(k_cache_ptr + slot * stride_cs + offs, kr, mask=m)
        tl.store(v_cache_ptr + slot * stride_cs + offs, vr, mask=m)

    # T_total varies with the step: not specialised on, so an eager step of any token count reuses the
    # compiled kernel (kernels/lora.py says why)
    @triton.jit(do_not_specialize=["T_total"])
    def _paged_attention_kernel(
        # pointers
        q_ptr,  # shape [T, H, D]
        k_cache_ptr,  # shape [num_blocks, block_size, Hkv, D]
        v_cache_ptr,  # shape [num_blocks, block_size, Hkv, D]
        out_ptr,  # shape [T, H, D]
        block_tables_ptr,  # shape [B, max_blocks] int32
        seq_lens_ptr,  # shape [B] int32
        qsl_ptr,  # shape [B+1] int32
        # dimensions
        sm_scale_log2,  # softmax scale * log2(e)
        D,
        BLOCK_SIZE,  # tokens per KV-cache block
        # strides
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_cb,
        stride_cs,
        stride_ch,
        stride_bt,
        # meta-parameters
        GROUP: tl.constexpr,  # q heads per kv head
        GROUP_P: tl.constexpr,  # GROUP rounded up to a power of two
        BLOCK_Q: tl.constexpr,  # query tokens per tile
        BLOCK_N: tl.constexpr,  # keys per inner step
        BLOCK_D: tl.constexpr,  # head_dim rounded up to a power of two
        PRECISION: tl.constexpr,
        NUM_SPLITS: tl.constexpr,  # > 1: decode only, axis 0 splits the keys (flash-decoding)
        part_ptr,  # shape [NUM_SPLITS, T, H, D] float32, unnormalised partial outputs (NUM_SPLITS > 1)
        ml_ptr,  # shape [NUM_SPLITS, 2, T, H] float32, running max (log2 domain) and sum per split
        T_total,
        H_total,
    ):
        # Program ids: axis 0 = query tile within the sequence (or key split when NUM_SPLITS > 1),
        # axis 1 = sequence, axis 2 = kv head.
        # Rows of the tile are (token, head-in-group) pairs: row r = token r // GROUP_P, head r % GROUP_P.
        if NUM_SPLITS == 1:
            qt = tl.program_id(0)
            split = 0
        else:
            qt = 0
            split = tl.program_id(0)
        b = tl.program_id(1)
        kvh = tl.program_id(2)
        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
        if qt * BLOCK_Q >= q_len:  # the grid is sized for the longest possible query
            return
        seq_len = tl.load(seq_lens_ptr + b)
        ctx0 = seq_len - q_len  # position of the first new token

        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
        offs_m = tl.arange(0, BLOCK_M)
        tok = qt * BLOCK_Q + offs_m // GROUP_P
        g = offs_m % GROUP_P
        row_ok = (tok < q_len) & (g < GROUP)
        head = kvh * GROUP + g
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D

        q_rows = (q_start + tok).to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
        qv = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        pos = ctx0 + tok  # [BLOCK_M] absolute position of each row's token

        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

        # keys needed by this tile: up to the last valid token's position (inclusive)
        hi = ctx0 + tl.minimum(q_len, (qt + 1) * BLOCK_Q)
        lo = 0
        if NUM_SPLITS > 1:
            # each split takes a contiguous, BLOCK_N-aligned share of the keys (the last ones may be empty)
            chunk = tl.cdiv(tl.cdiv(hi, NUM_SPLITS), BLOCK_N) * BLOCK_N
            lo = split * chunk
            hi = tl.minimum(hi, lo + chunk)
        for n0 in range(lo, hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < hi
            blk = tl.load(block_tables_ptr + b.to(tl.int64) * stride_bt + offs_n // BLOCK_SIZE, mask=n_ok, other=0)
            kv_rows = blk.to(tl.int64) * stride_cb + (offs_n % BLOCK_SIZE).to(tl.int64) * stride_cs + kvh * stride_ch
            kv_mask = n_ok[:, None] & d_ok[None, :]
            kt = tl.load(k_cache_ptr + kv_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [N, D]
            s = tl.dot(qv, tl.trans(kt), input_precision=PRECISION) * sm_scale_log2  # [M, N], log2 domain
            causal = (offs_n[None, :] <= pos[:, None]) & n_ok[None, :]
            s = tl.where(causal, s, float("-inf"))
            # online softmax (key 0 is visible to every row, so m_new is finite from the first step)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(v_cache_ptr + kv_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
            m_i = m_new

        if NUM_SPLITS > 1:
            # partial results; a small torch reduction rescales and sums them (empty splits: l = 0)
            row = (q_start + tok).to(tl.int64) * H_total + head
            base = split.to(tl.int64) * T_total * H_total
            tl.store(part_ptr + (base + row)[:, None] * D + offs_d[None, :], acc,
                     mask=row_ok[:, None] & d_ok[None, :])
            tl.store(ml_ptr + 2 * base + row, m_i, mask=row_ok)
            tl.store(ml_ptr + 2 * base + T_total * H_total + row, l_i, mask=row_ok)
            return
        o = acc / l_i[:, None]
        o_rows = (q_start + tok).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
        tl.store(
            out_ptr + o_rows[:, None] + offs_d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & d_ok[None, :],
        )


def _require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError("Triton is not installed; use the *_ref functions or kernels.dispatch")


def write_kv_triton(k, v, k_cache, v_cache, slot_mapping) -> None:
    _require_triton()
    _check_write(k, v, k_cache, v_cache, slot_mapping)
    T = k.shape[0]
    if T == 0:
        return
    nb, bs, hkv, d = k_cache.shape
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("write_kv: the caches must be contiguous")
    k = k if k[0].is_contiguous() else k.contiguous()
    v = v if v[0].is_contiguous() else v.contiguous()
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), v.stride(0), hkv * d, hkv * d,
        BLOCK=triton.next_power_of_2(hkv * d),
    )


def paged_attention_triton(
    q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, *,
    max_query_len: int | None = None, block_q: int | None = None, block_n: int = 64,
    num_splits: int | None = None, num_warps: int = 4,
) -> torch.Tensor:
    """`max_query_len` (optional, host int) tightens the grid; without it the bound is T - B + 1,
    which holds because every sequence has at least one token this step (no host sync either way)."""
    _require_triton()
    _check_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    T, H, D = q.shape
    _, bs, hkv, _ = k_cache.shape
    B = seq_lens.shape[0]
    out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("paged_attention: q and caches need unit stride on head_dim and equal cache strides")
    group = H // hkv
    group_p = triton.next_power_of_2(group)
    qmax = max_query_len if max_query_len is not None else T - B + 1
    if block_q is None:
        # decode: one token per tile; prefill: enough tokens that the tile has >= 64 rows
        block_q = 1 if qmax == 1 else max(1, 64 // group_p)
    block_q = max(block_q, triton.cdiv(16, group_p))  # tl.dot needs >= 16 rows
    if num_splits is None:
        # decode with too few (sequence, kv head) programs to fill the GPU: split the keys
        num_splits = 1
        if qmax == 1 and q.is_cuda:
            num_splits = max(1, min(4, (2 * _sm_count(q.device)) // (B * hkv)))
    if qmax != 1:
        num_splits = 1
    grid = (num_splits if num_splits > 1 else triton.cdiv(qmax, block_q), B, hkv)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    if num_splits > 1:
        part = torch.empty(num_splits, T, H, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(num_splits, 2, T, H, dtype=torch.float32, device=q.device)
    else:
        part = ml = out  # unused
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc,
        scale * 1.4426950408889634, D, bs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_P=group_p, BLOCK_Q=block_q, BLOCK_N=block_n,
        BLOCK_D=max(16, triton.next_power_of_2(D)), PRECISION=precision,
        NUM_SPLITS=num_splits, part_ptr=part, ml_ptr=ml, T_total=T, H_total=H, num_warps=num_warps,
    )
    if num_splits > 1:
        m, lsum = ml[:, 0], ml[:, 1]  # [S, T, H]
        w = torch.exp2(m - m.amax(0, keepdim=True))  # empty splits: exp2(-inf) = 0
        out.copy_((w[..., None] * part).sum(0) / (w * lsum).sum(0)[..., None])
    return out


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    from kernels import dispatch

    return dispatch.write_kv(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale) -> torch.Tensor:
    from kernels import dispatch

    return dispatch.paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale)
