"""Multi-LoRA shrink/expand over segments of tokens that share an adapter slot (Punica SGMV style).

Adapters sit in a slot pool of stacked, zero-padded tensors (see docs/engine-kernels.md):

    lora_a: [num_slots, max_rank, in_features]    rows >= rank[slot] are zero
    lora_b: [num_slots, out_features, max_rank]   columns >= rank[slot] are zero

Per step, `make_lora_meta(token_slots)` sorts the tokens by slot and cuts the sorted order into *tiles*
of at most `block_m` tokens that never straddle two slots. Every layer reuses that one meta:

    h = lora_shrink(x, [a_q, a_k, a_v], rank, meta)         # [n_slices, T, max_rank] float32
    lora_expand(y, h, [b_q, b_k, b_v], rank, scale, meta)   # y[:, slice cols] += scale[s] * h_i @ b_i[s].T

The Triton kernels run one program per (tile, rank or output block, slice). A tile of slot -1 is never
made (tokens without an adapter cost nothing); a program whose rank block starts past the slot's true rank
exits at once, so the work follows each adapter's real rank. All meta tensors have sizes that depend on
T only, and the launch grids are sized by T and max_rank, so both kernels can be captured in CUDA graphs.

The plain-PyTorch references loop over the distinct slots in the batch (never over tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # the CPU engine imports this module without needing Triton
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAVE_TRITON = False

__all__ = [
    "LoRABatchMeta",
    "make_lora_meta",
    "lora_shrink",
    "lora_expand",
    "lora_shrink_ref",
    "lora_expand_ref",
    "lora_shrink_triton",
    "lora_expand_triton",
]


# --------------------------------------------------------------------------------------------------
# Per-step metadata
# --------------------------------------------------------------------------------------------------


@dataclass
class LoRABatchMeta:
    """Tokens sorted by slot and cut into tiles; built once per step, reused by every layer.

    Every tensor's size depends on T (and block_m) only, so a CUDA-graph runner can keep static copies
    and refresh them with `copy_` before replay.
    """

    token_slots: torch.Tensor  # shape [T] int32, -1 = no adapter
    sorted_token_ids: torch.Tensor  # shape [T] int32, token indices ordered by slot (stable)
    tile_start: torch.Tensor  # shape [max_tiles] int32, first position in sorted_token_ids
    tile_end: torch.Tensor  # shape [max_tiles] int32, one past the last position (<= start + block_m)
    tile_slot: torch.Tensor  # shape [max_tiles] int32, slot of the tile, -1 for unused tiles
    block_m: int  # tokens per tile (a power of two >= 16, tl.dot's minimum)

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @property
    def max_tiles(self) -> int:
        return self.tile_slot.shape[0]

    def copy_(self, other: "LoRABatchMeta") -> "LoRABatchMeta":
        """Refresh this (graph-captured, static) meta in place from a new one built for the same T."""
        if other.num_tokens != self.num_tokens or other.block_m != self.block_m or other.max_tiles != self.max_tiles:
            raise ValueError(
                f"LoRABatchMeta.copy_: shapes differ (T {other.num_tokens} vs {self.num_tokens}, block_m "
                f"{other.block_m} vs {self.block_m}, tiles {other.max_tiles} vs {self.max_tiles}); build both "
                "with the same T, num_slots and block_m"
            )
        for name in ("token_slots", "sorted_token_ids", "tile_start", "tile_end", "tile_slot"):
            getattr(self, name).copy_(getattr(other, name))
        self.__dict__.pop("_slot_groups", None)  # the references' per-slot cache (see _slot_groups)
        return self


def _pick_block_m(num_tokens: int) -> int:
    # decode batches have one token per request: short segments, so small tiles; prefill has long
    # segments where a taller tile re-reads each adapter weight fewer times
    return 16 if num_tokens < 1024 else 64


def make_lora_meta(
    token_slots: torch.Tensor,  # shape [T] int32 (or int64), -1 = no adapter
    num_slots: int | None = None,
    block_m: int | None = None,
) -> LoRABatchMeta:
    """Sort tokens by slot and build the tile list, with tensor ops only (no host sync, no token loop).

    `num_slots` (the pool size) is optional: it tightens the bound on the number of tiles, and so the
    launch grid, for large T. `block_m` overrides the tile height (a power of two >= 16).
    """
    if not isinstance(token_slots, torch.Tensor) or token_slots.dim() != 1:
        raise ValueError(f"token_slots must be a 1-D tensor, got {getattr(token_slots, 'shape', type(token_slots))}")
    if token_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_slots must be int32 or int64, got {token_slots.dtype}")
    T = token_slots.shape[0]
    bm = block_m if block_m is not None else _pick_block_m(T)
    if bm < 16 or bm & (bm - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {bm}")
    dev = token_slots.device
    slots = token_slots.to(torch.int32)

    # Bound on tiles: every tile holds >= 1 token (<= T) and each segment adds at most one partial tile.
    max_segments = T if num_slots is None else min(T, num_slots + 1)
    max_tiles = min(T, -(-T // bm) + max_segments)

    sorted_slots, order = torch.sort(slots, stable=True)
    pos = torch.arange(T, device=dev, dtype=torch.int64)
    is_start = torch.ones(T, dtype=torch.bool, device=dev)
    if T > 1:
        is_start[1:] = sorted_slots[1:] != sorted_slots[:-1]
    seg_id = torch.cumsum(is_start.to(torch.int64), 0) - 1  # [T] segment of each sorted position
    # Segment bounds by scatter (segments beyond the real count keep start=T, end=0 -> length 0).
    seg_start = torch.full((T,), T, dtype=torch.int64, device=dev).scatter_reduce(0, seg_id, pos, "amin")
    seg_end = torch.zeros(T, dtype=torch.int64, device=dev).scatter_reduce(0, seg_id, pos + 1, "amax")
    seg_slot = torch.full((T,), -1, dtype=torch.int64, device=dev).scatter(0, seg_id, sorted_slots.to(torch.int64))
    seg_len = (seg_end - seg_start).clamp(min=0)
    # Segments of slot -1 get no tiles at all: their tokens cost nothing in the kernels.
    seg_tiles = torch.where(seg_slot >= 0, (seg_len + bm - 1) // bm, torch.zeros_like(seg_len))
    tiles_cum = torch.cumsum(seg_tiles, 0)  # inclusive

    t = torch.arange(max_tiles, device=dev, dtype=torch.int64)
    tile_seg = torch.searchsorted(tiles_cum, t, right=True)  # [max_tiles], == T for unused tiles
    valid = tile_seg < T
    seg_c = tile_seg.clamp(max=max(T - 1, 0))
    if T > 0:
        local = t - (tiles_cum[seg_c] - seg_tiles[seg_c])
        start = seg_start[seg_c] + local * bm
        end = torch.minimum(start + bm, seg_end[seg_c])
        tile_slot = torch.where(valid, seg_slot[seg_c], torch.full_like(t, -1))
        start = torch.where(valid, start, torch.zeros_like(start))
        end = torch.where(valid, end, torch.zeros_like(end))
    else:
        start = end = tile_slot = t
    return LoRABatchMeta(
        token_slots=slots,
        sorted_token_ids=order.to(torch.int32),
        tile_start=start.to(torch.int32),
        tile_end=end.to(torch.int32),
        tile_slot=tile_slot.to(torch.int32),
        block_m=bm,
    )


# --------------------------------------------------------------------------------------------------
# Input checks shared by both implementations
# --------------------------------------------------------------------------------------------------


def _check_common(x: torch.Tensor, rank: torch.Tensor, meta: LoRABatchMeta, what: str) -> None:
    # duck-typed (not isinstance) so that a test-time reload of this module keeps older metas valid
    if not all(hasattr(meta, f) for f in ("token_slots", "sorted_token_ids", "tile_slot", "block_m")):
        raise ValueError(f"{what}: meta must be a LoRABatchMeta from make_lora_meta, got {type(meta).__name__}")
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"{what}: {x.shape[0]} tokens but meta was built for {meta.num_tokens}")
    if rank.dim() != 1:
        raise ValueError(f"{what}: rank must be [num_slots], got {tuple(rank.shape)}")
    for name, t in (("rank", rank), ("meta.token_slots", meta.token_slots)):
        if t.device != x.device:
            raise ValueError(f"{what}: {name} is on {t.device} but x is on {x.device}")


def _check_shrink(x, lora_a, rank, meta) -> tuple[int, int]:
    if x.dim() != 2:
        raise ValueError(f"lora_shrink: x must be [T, in_features], got {tuple(x.shape)}")
    if not isinstance(lora_a, (list, tuple)) or len(lora_a) == 0:
        raise ValueError("lora_shrink: lora_a must be a non-empty list of [num_slots, max_rank, in] tensors")
    _check_common(x, rank, meta, "lora_shrink")
    num_slots, max_rank, _ = lora_a[0].shape
    for i, a in enumerate(lora_a):
        if a.dim() != 3 or a.shape != (num_slots, max_rank, x.shape[1]):
            raise ValueError(
                f"lora_shrink: lora_a[{i}] must be [{num_slots}, {max_rank}, {x.shape[1]}], got {tuple(a.shape)}"
            )
        if a.device != x.device or a.dtype != x.dtype:
            raise ValueError(f"lora_shrink: lora_a[{i}] is {a.dtype} on {a.device}, x is {x.dtype} on {x.device}")
    if rank.shape[0] != num_slots:
        raise ValueError(f"lora_shrink: rank has {rank.shape[0]} slots, lora_a has {num_slots}")
    return num_slots, max_rank


def _check_expand(y, h, lora_b, rank, scale, meta) -> tuple[int, int, list[int]]:
    if y.dim() != 2:
        raise ValueError(f"lora_expand: y must be [T, sum(out_i)], got {tuple(y.shape)}")
    if not isinstance(lora_b, (list, tuple)) or len(lora_b) == 0:
        raise ValueError("lora_expand: lora_b must be a non-empty list of [num_slots, out_i, max_rank] tensors")
    _check_common(y, rank, meta, "lora_expand")
    num_slots, _, max_rank = lora_b[0].shape
    outs = []
    for i, b in enumerate(lora_b):
        if b.dim() != 3 or b.shape[0] != num_slots or b.shape[2] != max_rank:
            raise ValueError(
                f"lora_expand: lora_b[{i}] must be [{num_slots}, out_{i}, {max_rank}], got {tuple(b.shape)}"
            )
        if b.device != y.device or b.dtype != y.dtype:
            raise ValueError(f"lora_expand: lora_b[{i}] is {b.dtype} on {b.device}, y is {y.dtype} on {y.device}")
        outs.append(b.shape[1])
    if sum(outs) != y.shape[1]:
        raise ValueError(f"lora_expand: y has {y.shape[1]} columns but the slices sum to {sum(outs)} ({outs})")
    if h.dim() != 3 or h.shape != (len(lora_b), y.shape[0], max_rank):
        raise ValueError(
            f"lora_expand: h must be [{len(lora_b)}, {y.shape[0]}, {max_rank}], got {tuple(h.shape)}"
        )
    if h.device != y.device:
        raise ValueError(f"lora_expand: h is on {h.device} but y is on {y.device}")
    if rank.shape[0] != num_slots or scale.shape != (num_slots,):
        raise ValueError(
            f"lora_expand: rank {tuple(rank.shape)} and scale {tuple(scale.shape)} must both be [{num_slots}]"
        )
    if scale.device != y.device:
        raise ValueError(f"lora_expand: scale is on {scale.device} but y is on {y.device}")
    return num_slots, max_rank, outs


# --------------------------------------------------------------------------------------------------
# Plain-PyTorch references (loop over distinct slots, never over tokens)
# --------------------------------------------------------------------------------------------------


def _slot_groups(meta: LoRABatchMeta) -> list[tuple[int, torch.Tensor]]:
    """(slot, token indices) for each distinct slot >= 0, computed once per meta (host sync: reference only).

    Cached on the meta object: every layer of a step reuses it, as the kernels reuse the tiles."""
    cached = meta.__dict__.get("_slot_groups")
    if cached is None:
        slots = meta.token_slots
        cached = [(s, (slots == s).nonzero(as_tuple=True)[0]) for s in torch.unique(slots).tolist() if s >= 0]
        meta.__dict__["_slot_groups"] = cached
    return cached


def lora_shrink_ref(
    x: torch.Tensor,  # shape [T, in]
    lora_a: list[torch.Tensor],  # each shape [num_slots, max_rank, in]
    rank: torch.Tensor,  # shape [num_slots] int32
    meta: LoRABatchMeta,
) -> torch.Tensor:  # shape [n_slices, T, max_rank] float32
    _, max_rank = _check_shrink(x, lora_a, rank, meta)
    T = x.shape[0]
    h = torch.zeros(len(lora_a), T, max_rank, dtype=torch.float32, device=x.device)
    ranks = rank.tolist()
    for s, idx in _slot_groups(meta):
        r = int(ranks[s])
        if r == 0:
            continue
        xs = x.index_select(0, idx).float()
        for i, a in enumerate(lora_a):
            h[i, idx, :r] = xs @ a[s, :r].float().T
    return h


def lora_expand_ref(
    y: torch.Tensor,  # shape [T, sum(out_i)], updated in place
    h: torch.Tensor,  # shape [n_slices, T, max_rank]
    lora_b: list[torch.Tensor],  # each shape [num_slots, out_i, max_rank]
    rank: torch.Tensor,  # shape [num_slots] int32
    scale: torch.Tensor,  # shape [num_slots] float32
    meta: LoRABatchMeta,
) -> torch.Tensor:
    _check_expand(y, h, lora_b, rank, scale, meta)
    ranks, scales = rank.tolist(), scale.tolist()
    for s, idx in _slot_groups(meta):
        r = int(ranks[s])
        if r == 0:
            continue
        parts = [h[i, idx, :r].float() @ b[s, :, :r].float().T for i, b in enumerate(lora_b)]
        delta = torch.cat(parts, dim=1) * scales[s]
        y[idx] = (y[idx].float() + delta).to(y.dtype)
    return y


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAVE_TRITON:

    @triton.jit
    def _lora_shrink_kernel(
        # pointers
        x_ptr,  # shape [T, K]
        a_ptrs,  # shape [n_slices] int64: data_ptr of each lora_a, each [num_slots, max_rank, K]
        h_ptr,  # shape [n_slices, T, max_rank] float32 (zeroed; split-K adds into it)
        rank_ptr,  # shape [num_slots] int32
        sorted_ids_ptr,  # shape [T] int32
        tile_start_ptr,  # shape [max_tiles] int32
        tile_end_ptr,  # shape [max_tiles] int32
        tile_slot_ptr,  # shape [max_tiles] int32
        # dimensions
        T,
        K,
        MAX_RANK,
        # strides
        stride_xt,
        stride_as,  # lora_a slot stride (= max_rank * K, same for all slices)
        stride_ar,  # lora_a row stride (= K)
        K_PER_SPLIT,  # columns of K per split (a multiple of BLOCK_K)
        # meta-parameters
        BLOCK_M: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
        SPLIT_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # Program ids: axis 0 = tile of same-slot tokens, axis 1 = block of BLOCK_R rank rows,
        # axis 2 = (slice, K split). Each program computes h[slice, tile tokens, rank block]
        # += x[tokens, K part] @ A[slot, rank block, K part].T over its contiguous K_PER_SPLIT columns;
        # splitting K keeps decode (few live tiles, long K) from running on a handful of SMs.
        tile = tl.program_id(0)
        pid_r = tl.program_id(1)
        pid_sk = tl.program_id(2)
        slice_id = pid_sk // SPLIT_K
        pid_k = pid_sk % SPLIT_K

        slot = tl.load(tile_slot_ptr + tile)
        if slot < 0:  # unused tile
            return
        rank = tl.load(rank_ptr + slot)
        r0 = pid_r * BLOCK_R
        if r0 >= rank:  # past this adapter's true rank: no work
            return
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(tile_end_ptr + tile)

        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        tok = tl.load(sorted_ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        r_mask = offs_r < rank

        a_base = tl.load(a_ptrs + slice_id).to(tl.pointer_type(x_ptr.dtype.element_ty))
        a_base = a_base + slot.to(tl.int64) * stride_as

        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        # Masked K loop over this program's share of K.
        k_lo = pid_k * K_PER_SPLIT
        k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(
                x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                mask=m_mask[:, None] & k_mask[None, :],
                other=0.0,
            )  # [BLOCK_M, BLOCK_K]
            at = tl.load(
                a_base + offs_k[:, None] + offs_r[None, :].to(tl.int64) * stride_ar,
                mask=k_mask[:, None] & r_mask[None, :],
                other=0.0,
            )  # [BLOCK_K, BLOCK_R]
            acc += tl.dot(xt, at, input_precision=PRECISION, out_dtype=tl.float32)

        h_off = (slice_id.to(tl.int64) * T + tok[:, None]) * MAX_RANK + offs_r[None, :]
        h_mask = m_mask[:, None] & r_mask[None, :]
        if SPLIT_K == 1:
            tl.store(h_ptr + h_off, acc, mask=h_mask)
        else:
            tl.atomic_add(h_ptr + h_off, acc, mask=h_mask)

    @triton.jit
    def _lora_expand_kernel(
        # pointers
        y_ptr,  # shape [T, N_total], updated in place
        h_ptr,  # shape [n_slices, T, max_rank] float32
        b_ptrs,  # shape [n_slices] int64: data_ptr of each lora_b, each [num_slots, out_i, max_rank]
        out_ptr,  # shape [n_slices] int32: out_i of each slice
        col_ptr,  # shape [n_slices] int32: first column of each slice in y
        rank_ptr,  # shape [num_slots] int32
        scale_ptr,  # shape [num_slots] float32
        sorted_ids_ptr,  # shape [T] int32
        tile_start_ptr,  # shape [max_tiles] int32
        tile_end_ptr,  # shape [max_tiles] int32
        tile_slot_ptr,  # shape [max_tiles] int32
        # dimensions
        T,
        MAX_RANK,
        # strides
        stride_yt,
        # meta-parameters
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_R: tl.constexpr,
        N_SPLIT: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        # Program ids: axis 0 = tile, axis 1 = one of N_SPLIT programs sharing the slice's columns
        # (it takes column blocks pid_n, pid_n + N_SPLIT, ...), axis 2 = slice. For each of its BLOCK_N
        # column blocks it adds scale * h[slice, tokens, :rank] @ B[slot, n block, :rank].T into y.
        # Looping over column blocks inside the program (instead of one grid axis per block) keeps the
        # grid, which is sized for the worst case of T distinct slots, small when few tiles are live.
        tile = tl.program_id(0)
        pid_n = tl.program_id(1)
        slice_id = tl.program_id(2)

        slot = tl.load(tile_slot_ptr + tile)
        if slot < 0:
            return
        rank = tl.load(rank_ptr + slot)
        n_out = tl.load(out_ptr + slice_id)
        if (rank == 0) | (pid_n * BLOCK_N >= n_out):  # empty slot, or nothing left for this program
            return
        start = tl.load(tile_start_ptr + tile)
        end = tl.load(tile_end_ptr + tile)
        col0 = tl.load(col_ptr + slice_id)
        scale = tl.load(scale_ptr + slot)

        offs_m = start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < end
        tok = tl.load(sorted_ids_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
        b_base = tl.load(b_ptrs + slice_id).to(tl.pointer_type(y_ptr.dtype.element_ty))
        b_base = b_base + slot.to(tl.int64) * n_out * MAX_RANK
        h_rows = (slice_id.to(tl.int64) * T + tok[:, None]) * MAX_RANK

        for n0 in range(pid_n * BLOCK_N, n_out, BLOCK_N * N_SPLIT):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < n_out
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # Rank loop stops at the adapter's true rank: no FLOPs on the zero padding.
            for r0 in range(0, rank, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                r_mask = offs_r < rank
                bt = tl.load(
                    b_base + offs_n[None, :].to(tl.int64) * MAX_RANK + offs_r[:, None],
                    mask=r_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )  # [BLOCK_R, BLOCK_N]
                ht = tl.load(
                    h_ptr + h_rows + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :], other=0.0
                ).to(bt.dtype)  # [BLOCK_M, BLOCK_R], h in the weights' dtype as the tensor cores want
                acc += tl.dot(ht, bt, input_precision=PRECISION, out_dtype=tl.float32)
            y_off = tok[:, None] * stride_yt + (col0 + offs_n)[None, :]
            y_mask = m_mask[:, None] & n_mask[None, :]
            y_old = tl.load(y_ptr + y_off, mask=y_mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + y_off, (y_old + scale * acc).to(y_ptr.dtype.element_ty), mask=y_mask)


def _precision(dtype: torch.dtype) -> str:
    # float32 models get exact float32 products (Triton's default for a float32 dot is tf32)
    return "ieee" if dtype == torch.float32 else "tf32"


def _require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError("Triton is not installed; use the *_ref functions or kernels.dispatch")


# Launch heuristics (benchmarks/kernels_lora.py sweeps them; see benchmarks/NOTES-kernels.md).
# *_programs: how many programs the worst-case grid (max_tiles x ...) should hold; the K (shrink) or
# column (expand) work of a live tile is split to reach it, trading dead programs for shorter loops.
TUNING = dict(shrink_programs=8192, expand_programs=4096, block_k=128, block_n=128, num_warps=4)

_TABLE_CACHE: dict[tuple, torch.Tensor] = {}


def _int_table(values: list[int], dtype: torch.dtype, device) -> torch.Tensor:
    # Small per-launch tables (slice base addresses, widths, column offsets) are cached by value: after
    # the first (warm-up) call no host->device copy happens, so launches stay CUDA-graph capturable.
    key = (str(device), dtype, tuple(values))
    t = _TABLE_CACHE.get(key)
    if t is None:
        if len(_TABLE_CACHE) > 4096:
            _TABLE_CACHE.clear()
        t = _TABLE_CACHE[key] = torch.tensor(values, dtype=dtype, device=device)
    return t


def _ptr_table(tensors: list[torch.Tensor], device) -> torch.Tensor:
    # One int64 table of base addresses lets one launch serve several slices (fused q/k/v, gate/up).
    # The slot pool keeps its tensors in place, so the table (and a captured graph) stays valid.
    return _int_table([t.data_ptr() for t in tensors], torch.int64, device)


def lora_shrink_triton(
    x: torch.Tensor,  # shape [T, in]
    lora_a: list[torch.Tensor],  # each shape [num_slots, max_rank, in]
    rank: torch.Tensor,  # shape [num_slots] int32
    meta: LoRABatchMeta,
    *,
    block_r: int = 16,
    block_k: int | None = None,
    split_k: int | None = None,
) -> torch.Tensor:  # shape [n_slices, T, max_rank] float32
    _require_triton()
    _, max_rank = _check_shrink(x, lora_a, rank, meta)
    T, K = x.shape
    n = len(lora_a)
    h = torch.zeros(n, T, max_rank, dtype=torch.float32, device=x.device)
    if T == 0 or max_rank == 0 or meta.max_tiles == 0:
        return h
    if x.stride(1) != 1:
        x = x.contiguous()
    lora_a = [a.contiguous() for a in lora_a]
    rank = rank.to(torch.int32)
    block_k = block_k or TUNING["block_k"]
    k_chunks = triton.cdiv(K, block_k)
    r_blocks = triton.cdiv(max_rank, block_r)
    if split_k is None:
        # The grid is sized for the worst case (max_tiles), but decode often has few live tiles: split K
        # so that ~TUNING["shrink_programs"] programs share the work and a live tile's K loop is short. Parts meet in h through
        # float32 atomic adds.
        split_k = max(1, min(k_chunks, triton.cdiv(TUNING["shrink_programs"], meta.max_tiles * r_blocks * n)))
    split_k = min(split_k, k_chunks)
    k_per_split = triton.cdiv(k_chunks, split_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    grid = (meta.max_tiles, r_blocks, n * split_k)
    _lora_shrink_kernel[grid](
        x, _ptr_table(lora_a, x.device), h, rank,
        meta.sorted_token_ids, meta.tile_start, meta.tile_end, meta.tile_slot,
        T, K, max_rank,
        x.stride(0), lora_a[0].stride(0), lora_a[0].stride(1), k_per_split,
        BLOCK_M=meta.block_m, BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split_k,
        PRECISION=_precision(x.dtype), num_warps=TUNING["num_warps"],
    )
    return h


def lora_expand_triton(
    y: torch.Tensor,  # shape [T, sum(out_i)], updated in place
    h: torch.Tensor,  # shape [n_slices, T, max_rank] float32
    lora_b: list[torch.Tensor],  # each shape [num_slots, out_i, max_rank]
    rank: torch.Tensor,  # shape [num_slots] int32
    scale: torch.Tensor,  # shape [num_slots] float32
    meta: LoRABatchMeta,
    *,
    block_n: int | None = None,
    block_r: int = 16,
    n_split: int | None = None,
) -> torch.Tensor:
    _require_triton()
    _, max_rank, outs = _check_expand(y, h, lora_b, rank, scale, meta)
    T = y.shape[0]
    if T == 0 or max_rank == 0 or meta.max_tiles == 0:
        return y
    if y.stride(1) != 1:
        raise ValueError("lora_expand: y must have unit column stride")
    h = h.float().contiguous()
    lora_b = [b.contiguous() for b in lora_b]
    dev = y.device
    cols = [0]
    for o in outs[:-1]:
        cols.append(cols[-1] + o)
    block_n = block_n or TUNING["block_n"]
    n_blocks = triton.cdiv(max(outs), block_n)
    if n_split is None:
        # ~TUNING["expand_programs"] programs in the worst-case grid; each loops over its share of the
        # column blocks
        n_split = max(1, min(n_blocks, triton.cdiv(TUNING["expand_programs"], meta.max_tiles * len(lora_b))))
    n_split = min(n_split, n_blocks)
    grid = (meta.max_tiles, n_split, len(lora_b))
    _lora_expand_kernel[grid](
        y, h, _ptr_table(lora_b, dev),
        _int_table(outs, torch.int32, dev), _int_table(cols, torch.int32, dev),
        rank.to(torch.int32), scale.to(torch.float32),
        meta.sorted_token_ids, meta.tile_start, meta.tile_end, meta.tile_slot,
        T, max_rank, y.stride(0),
        BLOCK_M=meta.block_m, BLOCK_N=block_n, BLOCK_R=block_r, N_SPLIT=n_split,
        PRECISION=_precision(y.dtype), num_warps=TUNING["num_warps"],
    )
    return y


# The module-level names of the contract go through the dispatcher.
def lora_shrink(x, lora_a, rank, meta):
    from kernels import dispatch

    return dispatch.lora_shrink(x, lora_a, rank, meta)


def lora_expand(y, h, lora_b, rank, scale, meta):
    from kernels import dispatch

    return dispatch.lora_expand(y, h, lora_b, rank, scale, meta)
