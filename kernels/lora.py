"""Multi-LoRA shrink/expand over segments of tokens that share an adapter slot (Punica SGMV style).

Adapters sit in a slot pool of stacked, zero-padded tensors (see docs/engine-kernels.md):

    lora_a: [num_slots, max_rank, in_features]    rows >= rank[slot] are zero
    lora_b: [num_slots, out_features, max_rank]   columns >= rank[slot] are zero

Per step, `make_lora_meta(token_slots)` sorts the tokens by slot and cuts the sorted order into *tiles*
of at most `block_m` tokens that never straddle two slots. Every layer reuses that one meta:

    h = lora_shrink(x, [a_q, a_k, a_v], rank, meta)         # [n_slices, T, max_rank] float32
    lora_expand(y, h, [b_q, b_k, b_v], rank, scale, meta)   # y[:, slice cols] += scale[s] * h_i @ b_i[s].T

The Triton kernels use a fixed-size, persistent grid: the meta carries a device-side count of live tiles
(live tiles come first in the tile list), and each program loops over work items `pid, pid + GRID, ...` below
`num_live_tiles x items per tile`. A work item is (tile, K split) in the shrink and (tile, output column
block) in the expand. A tile of slot -1 is never made (tokens without an adapter cost nothing), and loads
are masked at each slot's true rank, so bytes follow each adapter's real rank. The grid depends on T, the
shapes and TUNING only (never on the adapter mix), so both kernels can be captured in CUDA graphs, and an
all-dead batch costs one scalar load per program instead of a worst-case grid of idle programs.

The plain-PyTorch references loop over the distinct slots in the batch (never over tokens).

`lora_expand_silu_mul_triton` is the gate/up expand with the MLP activation as its epilogue: it returns
silu(gate + delta) * (up + delta) for every token in one pass over the projection output (reference: the expand,
then kernels.elementwise.silu_mul_ref).
"""

from __future__ import annotations

import os
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
    "lora_expand_silu_mul_ref",
    "lora_expand_silu_mul_triton",
    "LiveRows",
    "live_rows",
    "lora_live_rows",
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
    # shape [1] int32: number of live tiles (they are the first ones); the persistent kernels loop up to
    # it. Optional for metas built by hand: the launchers then count tile_slot >= 0 on the device.
    num_live_tiles: torch.Tensor | None = None

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
        if self.num_live_tiles is not None:
            self.num_live_tiles.copy_(_live_tiles(other))
        # the per-step caches of the references and of the CPU path (_slot_groups, _row_mask)
        self.__dict__.pop("_slot_groups", None)
        self.__dict__.pop("_row_masks", None)
        return self


def _live_tiles(meta: "LoRABatchMeta") -> torch.Tensor:
    """[1] int32 device count of live tiles (no host sync)."""
    if getattr(meta, "num_live_tiles", None) is not None:
        return meta.num_live_tiles
    return (meta.tile_slot >= 0).sum().to(torch.int32).reshape(1)


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
        n_live = tiles_cum[-1:].clamp(max=max_tiles)
    else:
        start = end = tile_slot = t
        n_live = torch.zeros(1, dtype=torch.int64, device=dev)
    return LoRABatchMeta(
        token_slots=slots,
        sorted_token_ids=order.to(torch.int32),
        tile_start=start.to(torch.int32),
        tile_end=end.to(torch.int32),
        tile_slot=tile_slot.to(torch.int32),
        block_m=bm,
        num_live_tiles=n_live.to(torch.int32),
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


def lora_expand_silu_mul_ref(
    gate_up: torch.Tensor,  # shape [T, 2I]: the base gate/up projection (gate | up), not modified
    h: torch.Tensor,  # shape [2, T, max_rank]: the shrink of the gate and up slices
    lora_b: list[torch.Tensor],  # [b_gate, b_up], each shape [num_slots, I, max_rank]
    rank: torch.Tensor,  # shape [num_slots] int32
    scale: torch.Tensor,  # shape [num_slots] float32
    meta: LoRABatchMeta,
) -> torch.Tensor:  # shape [T, I]
    """silu(gate) * up of the gate/up projection with each token's LoRA delta added: the expand, then the MLP's
    activation (kernels.elementwise.silu_mul_ref), as the unfused engine path runs them."""
    from kernels.elementwise import silu_mul_ref

    _check_silu_expand(gate_up, lora_b)
    y = lora_expand_ref(gate_up.clone(), h, lora_b, rank, scale, meta)
    return silu_mul_ref(y)


def _check_silu_expand(gate_up: torch.Tensor, lora_b) -> None:
    if not isinstance(lora_b, (list, tuple)) or len(lora_b) != 2 or lora_b[0].shape != lora_b[1].shape:
        raise ValueError("lora_expand_silu_mul: lora_b must be [b_gate, b_up] of one shape [num_slots, I, max_rank]")
    if gate_up.dim() != 2 or gate_up.shape[1] != 2 * lora_b[0].shape[1]:
        raise ValueError(f"lora_expand_silu_mul: gate_up must be [T, {2 * lora_b[0].shape[1]}] (gate | up), "
                         f"got {tuple(gate_up.shape)}")


# --------------------------------------------------------------------------------------------------
# CPU path for small batches: the pool's live adapter rows as one matmul per projection
# --------------------------------------------------------------------------------------------------
#
# A CPU decode step of 8 requests over 3 adapters spends more time in the references' per-slot, per-slice
# loop (slots x slices x shrink+expand per layer, each with a gather and a scatter) than in the LoRA
# arithmetic. For a handful of tokens it is cheaper to multiply every token by every *live* adapter row of
# the projection (rows < rank of the slots whose A and B are nonzero for that slice: a slot of an adapter that
# does not target the module has none), keep each token's own slot's rows with a mask, and expand with one
# matmul per slice. The rows are gathered once per pool change (LiveRows), the masks once per step.


@dataclass
class LiveRows:
    """A projection's live adapter rows, gathered from the slot pool in (slice, slot, r) order."""

    a: torch.Tensor  # shape [K, in]: A rows of every slice
    bt: list[torch.Tensor]  # per slice, shape [K_i, out_i]: the matching columns of B, transposed
    bounds: list[tuple[int, int]]  # per slice, its rows [k0, k1) in `a`
    row_slots: torch.Tensor  # shape [K] int64, the slot of each row
    key: tuple[int, ...]  # row_slots as a tuple: projections with the same rows share a step's mask


def live_rows(
    lora_a: list[torch.Tensor],  # each shape [num_slots, max_rank, in]
    lora_b: list[torch.Tensor],  # each shape [num_slots, out_i, max_rank]
    rank: torch.Tensor,  # shape [num_slots] int32
) -> LiveRows:
    a_rows, bts, bounds, slots_of = [], [], [], []
    ranks = rank.tolist()
    for a, b in zip(lora_a, lora_b):
        k0 = len(slots_of)
        parts_b = []
        for s, r in enumerate(ranks):
            # B (A x) is exactly zero when either factor is: such a slot has no live rows here
            if r <= 0 or not (bool(a[s, :r].any()) and bool(b[s, :, :r].any())):
                continue
            a_rows.append(a[s, :r])
            parts_b.append(b[s, :, :r].t())
            slots_of += [s] * r
        bounds.append((k0, len(slots_of)))
        bts.append(torch.cat(parts_b).contiguous() if parts_b else b.new_zeros(0, b.shape[1]))
    a_cat = torch.cat(a_rows).contiguous() if a_rows else lora_a[0].new_zeros(0, lora_a[0].shape[2])
    return LiveRows(a_cat, bts, bounds, torch.tensor(slots_of, dtype=torch.int64), tuple(slots_of))


def _row_mask(meta: LoRABatchMeta, rows: LiveRows, scale: torch.Tensor) -> torch.Tensor:
    """[T, K]: scale[slot of token t] where row k belongs to that slot, else 0 (cached on the meta per row set)."""
    cached = meta.__dict__.get("_row_masks")
    if cached is None or cached[0] is not scale:
        slots = meta.token_slots.long()
        cached = (scale, slots, scale.float()[slots.clamp(min=0)], {})
        meta.__dict__["_row_masks"] = cached
    _, slots, tok_scale, masks = cached
    mask = masks.get(rows.key)
    if mask is None:
        mask = masks[rows.key] = (slots[:, None] == rows.row_slots[None, :]) * tok_scale[:, None]
    return mask


def lora_live_rows(
    x: torch.Tensor,  # shape [T, in]
    outs: list[torch.Tensor],  # per slice, shape [T, out_i] (views allowed), updated in place: out_i += delta_i
    rows: LiveRows,
    scale: torch.Tensor,  # shape [num_slots] float32
    meta: LoRABatchMeta,
) -> None:
    """out_i += scale[s] * B_i[s, :, :r] @ A_i[s, :r] @ x for each token of slot s >= 0: the references' shrink
    and expand (float32 inputs), as one shrink and one expand matmul per slice for the whole step."""
    if rows.a.shape[0] == 0:
        return
    h = torch.mm(x, rows.a.t())
    h.mul_(_row_mask(meta, rows, scale))
    for out, (k0, k1), bt in zip(outs, rows.bounds, rows.bt):
        if k1 > k0:
            out.addmm_(h[:, k0:k1], bt)


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------

if HAVE_TRITON:
    from kernels.elementwise import _round_to

    # Integers that change with the step's token count are not specialised on (Triton would otherwise compile a
    # variant per divisibility class: an eager step with an odd token count stalled ~1.5 s compiling new ones
    # mid-serving); the per-projection sizes and strides stay specialised for vectorised loads.
    @triton.jit(do_not_specialize=["T", "MAX_TILES", "SPLIT_K"])
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
        num_live_ptr,  # shape [1] int32: live tiles (the first ones)
        # dimensions
        T,
        K,
        MAX_RANK,
        MAX_TILES,
        # strides
        stride_xt,
        stride_as,  # lora_a slot stride (= max_rank * K, same for all slices)
        stride_ar,  # lora_a row stride (= K)
        K_PER_SPLIT,  # columns of K per work item (a multiple of BLOCK_K)
        SPLIT_K,  # work items per tile
        # meta-parameters
        N_SLICES: tl.constexpr,
        R_PAD: tl.constexpr,  # max_rank rounded up to a power of two
        BLOCK_C: tl.constexpr,  # N_SLICES * R_PAD rounded up to a power of two, >= 16
        BLOCK_M: tl.constexpr,
        BLOCK_K: tl.constexpr,
        A_ALIGN: tl.constexpr,  # byte alignment of every lora_a base (16 lets loads be 16 bytes wide)
        ATOMIC: tl.constexpr,  # SPLIT_K > 1: parts meet in h through float32 atomic adds
        PRECISION: tl.constexpr,
    ):
        # Tiling. The rank rows of all slices are stacked into one "column" axis of BLOCK_C: column c is
        # rank row c % R_PAD of slice c // R_PAD (q/k/v at rank 16: 48 live columns of 64). One work item
        # computes h[:, tile tokens, :] += x[tokens, K part] @ A_all[slot, :, K part].T with a single dot
        # per BLOCK_K step, so x is read once for all slices. Work items are (live tile, K split), handed
        # out round-robin over a fixed grid: the grid never depends on how many tiles are live.
        # Latency: at decode a program has one or two items, so the chain of dependent loads (tile ->
        # slot/rank and token ids -> x/A) is the cost. The next item's tile fields, rank and token ids
        # are prefetched one item ahead (the first ones before the live count is known).
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)

        offs_c = tl.arange(0, BLOCK_C)
        c_slice = offs_c // R_PAD
        c_rank = offs_c % R_PAD
        c_ok = (c_slice < N_SLICES) & (c_rank < MAX_RANK)
        # base address of each column's slice (a vector of pointers, loaded once per program)
        a_col = tl.load(a_ptrs + c_slice, mask=c_slice < N_SLICES, other=0).to(tl.pointer_type(x_ptr.dtype.element_ty))
        if A_ALIGN > 1:
            a_col = tl.multiple_of(a_col, A_ALIGN)
        a_col = a_col + c_rank.to(tl.int64) * stride_ar
        h_col = c_slice.to(tl.int64) * T * MAX_RANK + c_rank  # h offset of each column, token 0
        arange_m = tl.arange(0, BLOCK_M)

        # prefetch item pid (clamped reads: the item may not exist)
        t_n = tl.minimum(pid // SPLIT_K, MAX_TILES - 1)
        slot_n = tl.load(tile_slot_ptr + t_n)
        start_n = tl.load(tile_start_ptr + t_n)
        end_n = tl.load(tile_end_ptr + t_n)
        rank_n = tl.load(rank_ptr + tl.maximum(slot_n, 0))
        tok_n = tl.load(sorted_ids_ptr + start_n + arange_m, mask=start_n + arange_m < end_n, other=0)
        n_items = tl.load(num_live_ptr) * SPLIT_K

        for w in range(pid, n_items, n_prog):
            slot = slot_n
            rank = rank_n
            m_mask = start_n + arange_m < end_n
            tok = tok_n.to(tl.int64)
            pid_k = w % SPLIT_K
            c_mask = c_ok & (c_rank < rank)  # no bytes past the slot's true rank
            a_row = a_col + slot.to(tl.int64) * stride_as
            k_lo = pid_k * K_PER_SPLIT
            k_hi = tl.minimum(K, k_lo + K_PER_SPLIT)

            # prefetch the next item (overlaps this item's loads)
            t_n = tl.minimum((w + n_prog) // SPLIT_K, MAX_TILES - 1)
            slot_n = tl.load(tile_slot_ptr + t_n)
            start_n = tl.load(tile_start_ptr + t_n)
            end_n = tl.load(tile_end_ptr + t_n)
            rank_n = tl.load(rank_ptr + tl.maximum(slot_n, 0))
            tok_n = tl.load(sorted_ids_ptr + start_n + arange_m, mask=start_n + arange_m < end_n, other=0)

            acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < k_hi
                xt = tl.load(
                    x_ptr + tok[:, None] * stride_xt + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )  # [BLOCK_M, BLOCK_K]
                at = tl.load(
                    a_row[None, :] + offs_k[:, None],
                    mask=k_mask[:, None] & c_mask[None, :],
                    other=0.0,
                )  # [BLOCK_K, BLOCK_C], K contiguous in memory
                acc += tl.dot(xt, at, input_precision=PRECISION, out_dtype=tl.float32)

            h_off = tok[:, None] * MAX_RANK + h_col[None, :]
            h_mask = m_mask[:, None] & c_mask[None, :]
            if ATOMIC:
                tl.atomic_add(h_ptr + h_off, acc, mask=h_mask, sem="relaxed")
            else:
                tl.store(h_ptr + h_off, acc, mask=h_mask)

    @triton.jit
    def _influence_row(infl_ptr, T, tj, d2, y2, ok):
        """Add a row's sums of d2 and y2 ([BLOCK_N] each) to the token's influence statistics, both in one reduction:
        each sum across the program's warps is a round through shared memory behind a barrier, and the two
        statistics share one round instead of taking one each."""
        both = tl.sum(tl.join(d2, y2), axis=0)  # [2]
        which = tl.arange(0, 2)
        tl.atomic_add(infl_ptr + which * T + tj, both, mask=which < tl.where(ok, 2, 0), sem="relaxed")

    @triton.jit
    def _influence_tile(infl_ptr, T, tok, d2, y2, ok):
        """_influence_row for the rows `tok` of a tile (d2, y2: [rows, BLOCK_N]; ok: [rows])."""
        both = tl.sum(tl.join(d2, y2), axis=1)  # [rows, 2]
        which = tl.arange(0, 2)
        tl.atomic_add(infl_ptr + which[None, :] * T + tok[:, None], both, mask=ok[:, None] & (which < 2)[None, :],
                      sem="relaxed")

    @triton.jit
    def _rank_cols(offs_r, rank, R_ALIGN: tl.constexpr):
        """Mask of the rank columns of B to read: up to the rank rounded up to R_ALIGN (a power of two dividing
        MAX_RANK). The pool zero-pads B past each slot's rank, and h is read with the exact rank, so the extra
        columns add nothing to the product; a bound aligned to R_ALIGN lets each row's columns be read as one
        vector instead of an access per element (ncu: 71% of the sectors the gate/up kernel fetched at 256 decode
        tokens were excess while B was read element by element)."""
        return offs_r < (rank + R_ALIGN - 1) // R_ALIGN * R_ALIGN

    @triton.jit(do_not_specialize=["T", "MAX_TILES"])  # see the shrink kernel
    def _lora_expand_kernel(
        # pointers
        y_ptr,  # shape [T, N_total], updated in place
        h_ptr,  # shape [n_slices, T, max_rank] float32
        blk_ptr,  # shape [5, n_blocks] int64: per BLOCK_N column block (all slices in order): slice,
        #           first column within the slice, first column in y, slice width out_i, lora_b address
        rank_ptr,  # shape [num_slots] int32
        scale_ptr,  # shape [num_slots] float32
        sorted_ids_ptr,  # shape [T] int32
        tile_start_ptr,  # shape [max_tiles] int32
        tile_end_ptr,  # shape [max_tiles] int32
        tile_slot_ptr,  # shape [max_tiles] int32
        num_live_ptr,  # shape [1] int32
        infl_ptr,  # shape [2, T] float32 (INFLUENCE): per token, sum of delta^2 and of base y^2 added here
        # dimensions
        T,
        MAX_RANK,
        MAX_TILES,
        N_BLOCKS,  # column blocks over all slices
        # strides
        stride_yt,
        # meta-parameters
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        R_PAD: tl.constexpr,  # max_rank rounded up to a power of two, >= 16 (tl.dot's minimum K)
        B_ALIGN: tl.constexpr,  # byte alignment of every lora_b base
        Y_ALIGN: tl.constexpr,  # element alignment of every block's first y column
        PRECISION: tl.constexpr,
        INFLUENCE: tl.constexpr = False,
        N_ALIGN: tl.constexpr = 1,  # a power of two dividing every slice width and BLOCK_N
        R_ALIGN: tl.constexpr = 1,  # a power of two dividing MAX_RANK (B's rank columns are read in runs of it)
        SHORT_ROWS: tl.constexpr = 0,  # tiles of at most this many tokens are done row by row
    ):
        # Tiling. A work item is (live tile, column block): y[tile tokens, BLOCK_N columns of one slice]
        # += scale * h[slice, tokens, :rank] @ B[slot, columns, :rank].T, one dot with the whole rank as
        # its K (no rank loop), then one read-modify-write of the y block (rows of BLOCK_N contiguous
        # columns, 16-byte accesses thanks to the alignment hints). Column blocks are listed per slice,
        # so slices of different widths (q 4096, k/v 1024) get no dead blocks; every per-block field is
        # one table read (no slice -> width -> address chain). Items are handed out round-robin over a
        # fixed grid; consecutive items share a tile (its h rows stay in L1/L2) and walk B contiguously.
        # The next item's tile fields, rank, scale and token ids are prefetched one item ahead.
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        offs_r = tl.arange(0, R_PAD)
        arange_m = tl.arange(0, BLOCK_M)
        arange_n = tl.arange(0, BLOCK_N)

        t_n = tl.minimum(pid // N_BLOCKS, MAX_TILES - 1)
        slot_n = tl.load(tile_slot_ptr + t_n)
        start_n = tl.load(tile_start_ptr + t_n)
        end_n = tl.load(tile_end_ptr + t_n)
        rank_n = tl.load(rank_ptr + tl.maximum(slot_n, 0))
        scale_n = tl.load(scale_ptr + tl.maximum(slot_n, 0))
        tok_n = tl.load(sorted_ids_ptr + start_n + arange_m, mask=start_n + arange_m < end_n, other=0)
        n_items = tl.load(num_live_ptr) * N_BLOCKS

        for w in range(pid, n_items, n_prog):
            slot = slot_n
            rank = rank_n
            scale = scale_n
            start = start_n
            end = end_n
            m_mask = start + arange_m < end
            tok = tok_n.to(tl.int64)
            blk = w % N_BLOCKS
            slice_id = tl.load(blk_ptr + blk)
            n0 = tl.load(blk_ptr + N_BLOCKS + blk)
            ycol = tl.load(blk_ptr + 2 * N_BLOCKS + blk)
            n_out = tl.load(blk_ptr + 3 * N_BLOCKS + blk)
            b_base = tl.load(blk_ptr + 4 * N_BLOCKS + blk).to(tl.pointer_type(y_ptr.dtype.element_ty))
            if B_ALIGN > 1:
                b_base = tl.multiple_of(b_base, B_ALIGN)
            if Y_ALIGN > 1:
                ycol = tl.multiple_of(ycol, Y_ALIGN)

            r_mask = offs_r < rank
            # Vectorised access needs masks the compiler can prove constant over aligned runs of columns. The
            # column bounds come from the table, so `// N_ALIGN * N_ALIGN` (exact: they are multiples of it) is
            # what tells the compiler their alignment; tl.multiple_of on a loaded scalar is not taken into account.
            # Without it every y element was its own 2-byte load and store (ld/st.global.b16).
            offs_n = n0 // N_ALIGN * N_ALIGN + arange_n
            n_lim = tl.where(rank > 0, n_out // N_ALIGN * N_ALIGN, 0)  # rank 0: no y read-modify-write
            n_mask = offs_n < n_lim
            rb_mask = _rank_cols(offs_r, rank, R_ALIGN)
            b_row = b_base + (slot.to(tl.int64) * n_out + offs_n) * MAX_RANK  # [BLOCK_N] row starts of B

            # prefetch the next item (overlaps this item's loads)
            t_n = tl.minimum((w + n_prog) // N_BLOCKS, MAX_TILES - 1)
            slot_n = tl.load(tile_slot_ptr + t_n)
            start_n = tl.load(tile_start_ptr + t_n)
            end_n = tl.load(tile_end_ptr + t_n)
            rank_n = tl.load(rank_ptr + tl.maximum(slot_n, 0))
            scale_n = tl.load(scale_ptr + tl.maximum(slot_n, 0))
            tok_n = tl.load(sorted_ids_ptr + start_n + arange_m, mask=start_n + arange_m < end_n, other=0)

            if end - start <= SHORT_ROWS:
                # A tile of a few tokens (many adapters at decode: one token a tile at 1000 adapters). The tile
                # path would run its dot, layout shuffles and y traffic on BLOCK_M rows for each real one (ncu,
                # 256 tokens over 256 adapters: 25% of DRAM bandwidth); a row instead takes its delta as a
                # [BLOCK_N] reduction over the rank on CUDA cores, under the slot's B block loaded once.
                row_b = tl.load(b_row[:, None] + offs_r[None, :], mask=n_mask[:, None] & rb_mask[None, :],
                                other=0.0)  # [BLOCK_N, R_PAD]
                b_dtype = row_b.dtype
                row_b = row_b.to(tl.float32)
                for j in range(start, end):
                    tj = tl.load(sorted_ids_ptr + j).to(tl.int64)
                    # y's row is loaded before anything waits on B: issued after the reduction (as it was), its
                    # load only began once B had arrived (measured neutral, session 10 call A; it costs nothing)
                    row_ptr = y_ptr + tj * stride_yt + ycol + arange_n
                    row_y = tl.load(row_ptr, mask=n_mask, other=0.0).to(tl.float32)
                    # h rounded to B's dtype, as the tile path's dot takes it
                    row_h = tl.load(h_ptr + (slice_id * T + tj) * MAX_RANK + offs_r, mask=r_mask, other=0.0)
                    row_d = scale * tl.sum(row_b * row_h.to(b_dtype).to(tl.float32)[None, :], axis=1)
                    if INFLUENCE:
                        _influence_row(infl_ptr, T, tj, row_d * row_d, row_y * row_y, True)
                    tl.store(row_ptr, (row_y + row_d).to(y_ptr.dtype.element_ty), mask=n_mask)
            else:
                y_off = tok[:, None] * stride_yt + (ycol + arange_n)[None, :]
                y_mask = m_mask[:, None] & n_mask[None, :]
                y_old = tl.load(y_ptr + y_off, mask=y_mask, other=0.0)
                bt = tl.load(
                    b_row[None, :] + offs_r[:, None],
                    mask=rb_mask[:, None] & n_mask[None, :],
                    other=0.0,
                )  # [R_PAD, BLOCK_N]: BLOCK_N x rank contiguous elements of B
                ht = tl.load(
                    h_ptr + (slice_id * T + tok[:, None]) * MAX_RANK + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :],
                    other=0.0,
                ).to(bt.dtype)  # [BLOCK_M, R_PAD], h in the weights' dtype as the tensor cores want
                acc = tl.dot(ht, bt, input_precision=PRECISION, out_dtype=tl.float32)
                y_base = y_old.to(tl.float32)
                delta = scale * acc
                if INFLUENCE:
                    # influence statistics from the tile already in registers: per token, |delta|^2 and |base y|^2
                    # over this block's columns (masked entries are 0), summed over blocks by atomics; this
                    # replaces a delta buffer, two row norms over [T, N] and an add per projection
                    _influence_tile(infl_ptr, T, tok, delta * delta, y_base * y_base, m_mask)
                tl.store(y_ptr + y_off, (y_base + delta).to(y_ptr.dtype.element_ty), mask=y_mask)

if HAVE_TRITON:

    @triton.jit
    def _silu_item(t, plain_tiles, n_plain, tile_start_ptr, tile_end_ptr, tile_slot_ptr, rank_ptr, scale_ptr,
                   sorted_ids_ptr, MAX_TILES, BLOCK_M: tl.constexpr):
        """Row tile t of lora_expand_silu_mul's work: the -1 tokens' tiles first, then the meta's LoRA tiles.
        Returns its sorted positions [start, end), slot, rank (0 without an adapter), scale and token ids.
        Reads are clamped, so a t past the last tile is harmless (its item is never run)."""
        lt = tl.minimum(tl.maximum(t - plain_tiles, 0), MAX_TILES - 1)
        is_lora = t >= plain_tiles
        start = tl.where(is_lora, tl.load(tile_start_ptr + lt), t * BLOCK_M)
        end = tl.where(is_lora, tl.load(tile_end_ptr + lt), tl.minimum(t * BLOCK_M + BLOCK_M, n_plain))
        slot = tl.where(is_lora, tl.load(tile_slot_ptr + lt), -1)
        rank = tl.where(slot >= 0, tl.load(rank_ptr + tl.maximum(slot, 0)), 0)
        scale = tl.load(scale_ptr + tl.maximum(slot, 0))
        offs = start + tl.arange(0, BLOCK_M)
        tok = tl.load(sorted_ids_ptr + offs, mask=offs < end, other=0).to(tl.int64)
        return start, end, slot, rank, scale, tok

    @triton.jit
    def _round_as(x, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
        """x rounded to DTYPE and held in float32: the GPU's own rounding cast where NATIVE (2 instructions), else
        elementwise._round_to's bit form, exact in the interpreter too (whose casts truncate)."""
        y = x
        if NATIVE:
            y = x.to(DTYPE).to(tl.float32)
        else:
            y = _round_to(x, DTYPE)
        return y

    @triton.jit
    def _silu_mul_rounded(g, u, DTYPE: tl.constexpr, NATIVE: tl.constexpr):
        """silu(g) * u as the unfused path stores it: g and u (with their deltas) rounded to DTYPE (the expand's
        store), then elementwise's silu_mul_kernel: F.silu's x / (1 + exp(-x)) with an IEEE division, rounded,
        times u, rounded. float32, rounded to DTYPE."""
        g = _round_as(g, DTYPE, NATIVE)
        u = _round_as(u, DTYPE, NATIVE)
        s = _round_as(tl.math.div_rn(g, 1.0 + tl.exp(-g)), DTYPE, NATIVE)
        return _round_as(s * u, DTYPE, NATIVE)

    @triton.jit
    def _silu_tile_rows(gu_ptr, out_ptr, h_ptr, infl_ptr, tok, m_mask, offs_n, n_mask, offs_r, r_mask, bg, bu, scale,
                        rank, T, INTER, MAX_RANK, stride_gu, PRECISION: tl.constexpr, INFLUENCE: tl.constexpr,
                        NATIVE_ROUND: tl.constexpr):
        """lora_expand_silu_mul's tile path for the rows `tok` (mask m_mask) of one column block: their gate and up
        blocks, each delta a tile-high dot of h and the slot's B blocks (bg, bu: [R_PAD, BLOCK_N]), the influence
        sums, the activation stored."""
        dtype = out_ptr.dtype.element_ty
        mn_mask = m_mask[:, None] & n_mask[None, :]
        src = gu_ptr + tok[:, None] * stride_gu + offs_n[None, :]
        g = tl.load(src, mask=mn_mask, other=0.0).to(tl.float32)
        u = tl.load(src + INTER, mask=mn_mask, other=0.0).to(tl.float32)
        h_off = tok[:, None] * MAX_RANK + offs_r[None, :]
        h_mask = m_mask[:, None] & r_mask[None, :]
        hg = tl.load(h_ptr + h_off, mask=h_mask, other=0.0).to(bg.dtype)  # [rows, R_PAD]
        hu = tl.load(h_ptr + T * MAX_RANK + h_off, mask=h_mask, other=0.0).to(bg.dtype)
        dg = scale * tl.dot(hg, bg, input_precision=PRECISION, out_dtype=tl.float32)
        du = scale * tl.dot(hu, bu, input_precision=PRECISION, out_dtype=tl.float32)
        if INFLUENCE:
            live = m_mask & (tok * 0 + rank > 0)  # nothing for a token without a (nonzero-rank) adapter
            _influence_tile(infl_ptr, T, tok, dg * dg + du * du, g * g + u * u, live)
        act = _silu_mul_rounded(g + dg, u + du, dtype, NATIVE_ROUND)
        tl.store(out_ptr + tok[:, None] * INTER + offs_n[None, :], act.to(dtype), mask=mn_mask)

    @triton.jit(do_not_specialize=["T", "MAX_TILES"])  # see the shrink kernel
    def _lora_expand_silu_mul_kernel(
        # pointers
        gu_ptr,  # shape [T, 2I], unit column stride: the base gate/up output (gate | up), read only
        out_ptr,  # shape [T, I] contiguous: silu(gate + delta_gate) * (up + delta_up)
        h_ptr,  # shape [2, T, max_rank] float32: the shrink of the gate and up slices
        bg_ptr,  # shape [num_slots, I, max_rank]: lora_b of gate_proj
        bu_ptr,  # shape [num_slots, I, max_rank]: lora_b of up_proj
        rank_ptr,  # shape [num_slots] int32
        scale_ptr,  # shape [num_slots] float32
        sorted_ids_ptr,  # shape [T] int32
        tile_start_ptr,  # shape [max_tiles] int32
        tile_end_ptr,  # shape [max_tiles] int32
        tile_slot_ptr,  # shape [max_tiles] int32
        num_live_ptr,  # shape [1] int32
        infl_ptr,  # shape [2, T] float32 (INFLUENCE): per token, sum of delta^2 and of base y^2 over gate and up
        # dimensions
        T,
        INTER,  # I
        MAX_RANK,
        MAX_TILES,
        N_BLOCKS,  # column blocks of I
        stride_gu,
        # meta-parameters
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        R_PAD: tl.constexpr,  # max_rank rounded up to a power of two, >= 16
        PRECISION: tl.constexpr,
        INFLUENCE: tl.constexpr,
        SHORT_ROWS: tl.constexpr,  # tiles of at most this many tokens are done row by row
        NATIVE_ROUND: tl.constexpr,  # round with the GPU's casts (compiled) instead of the bit form (interpreter)
        R_ALIGN: tl.constexpr,  # see _rank_cols
        SUB_M: tl.constexpr,  # rows a LoRA tile is done in at a time (BLOCK_M, or a power of two below it)
    ):
        # The gate/up expand with the MLP's activation as its epilogue: the expand's read-modify-write of the
        # [T, 2I] projection output (the largest of a layer's LoRA traffic) and the activation's second read of
        # it become one read, and two launches one. Every token needs its activation, adapter or not, so the
        # work is two kinds of row tile over the same column blocks: first the tokens of slot -1 (they sort
        # first: sorted positions [0, tile_start[0]) when any tile is live, all T otherwise), BLOCK_M at a time,
        # with no LoRA term (rank 0 masks every h and B load); then the LoRA tiles of the meta. A work item is
        # (row tile, column block) on a fixed persistent grid, as in the expand. Rounding follows the unfused
        # path: gate and up with their deltas are rounded to the activation dtype (the expand's store), then
        # silu_mul_kernel's float32 formula.
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        offs_r = tl.arange(0, R_PAD)
        arange_m = tl.arange(0, BLOCK_M)
        arange_n = tl.arange(0, BLOCK_N)
        dtype = out_ptr.dtype.element_ty

        n_live = tl.load(num_live_ptr)
        first = tl.load(tile_start_ptr)  # MAX_TILES >= 1 (the launcher checks)
        n_plain = tl.where(n_live > 0, first, T)
        plain_tiles = tl.cdiv(n_plain, BLOCK_M)
        n_items = (plain_tiles + n_live) * N_BLOCKS

        # Latency: at 1000 adapters a decode tile holds one token and a program walks ~27 items, each behind a
        # chain of dependent loads (tile -> token ids -> rows); the next item's tile fields and token ids are
        # loaded one item ahead, as in the expand.
        start_n, end_n, slot_n, rank_n, scale_n, tok_n = _silu_item(
            pid // N_BLOCKS, plain_tiles, n_plain, tile_start_ptr, tile_end_ptr, tile_slot_ptr, rank_ptr, scale_ptr,
            sorted_ids_ptr, MAX_TILES, BLOCK_M)
        for w in range(pid, n_items, n_prog):
            blk = w % N_BLOCKS
            start, end, slot, rank, scale, tok = start_n, end_n, slot_n, rank_n, scale_n, tok_n
            m_mask = start + arange_m < end
            start_n, end_n, slot_n, rank_n, scale_n, tok_n = _silu_item(
                (w + n_prog) // N_BLOCKS, plain_tiles, n_plain, tile_start_ptr, tile_end_ptr, tile_slot_ptr,
                rank_ptr, scale_ptr, sorted_ids_ptr, MAX_TILES, BLOCK_M)

            offs_n = blk * BLOCK_N + arange_n
            n_mask = offs_n < INTER
            r_mask = offs_r < rank
            rb_mask = _rank_cols(offs_r, rank, R_ALIGN)
            if end - start <= SHORT_ROWS:
                # A tile of a few tokens (many adapters at decode: one token a tile at 1000 adapters): a tile-high
                # dot would run the activation on BLOCK_M rows for each real one, and the activation's float32
                # math, not the bytes, is then most of the kernel's time. Each token is done as a row instead:
                # its delta a [BLOCK_N] reduction over the rank (CUDA cores), the slot's B blocks loaded once.
                row_bt_off = (slot.to(tl.int64) * INTER + offs_n[:, None]) * MAX_RANK + offs_r[None, :]
                row_bt_mask = n_mask[:, None] & rb_mask[None, :]
                row_bg = tl.load(bg_ptr + row_bt_off, mask=row_bt_mask, other=0.0)  # [BLOCK_N, R_PAD]
                row_bu = tl.load(bu_ptr + row_bt_off, mask=row_bt_mask, other=0.0)
                b_dtype = row_bg.dtype
                row_bg = row_bg.to(tl.float32)
                row_bu = row_bu.to(tl.float32)
                for j in range(start, end):
                    tj = tl.load(sorted_ids_ptr + j).to(tl.int64)
                    row_src = gu_ptr + tj * stride_gu + offs_n
                    row_g = tl.load(row_src, mask=n_mask, other=0.0).to(tl.float32)
                    row_u = tl.load(row_src + INTER, mask=n_mask, other=0.0).to(tl.float32)
                    # h rounded to B's dtype, as the dot takes it
                    row_hg = tl.load(h_ptr + tj * MAX_RANK + offs_r, mask=r_mask, other=0.0).to(b_dtype)
                    row_hu = tl.load(h_ptr + (T + tj) * MAX_RANK + offs_r, mask=r_mask, other=0.0).to(b_dtype)
                    row_dg = scale * tl.sum(row_bg * row_hg.to(tl.float32)[None, :], axis=1)
                    row_du = scale * tl.sum(row_bu * row_hu.to(tl.float32)[None, :], axis=1)
                    if INFLUENCE:
                        _influence_row(infl_ptr, T, tj, row_dg * row_dg + row_du * row_du,
                                       row_g * row_g + row_u * row_u, rank > 0)
                    row_act = _silu_mul_rounded(row_g + row_dg, row_u + row_du, dtype, NATIVE_ROUND)
                    tl.store(out_ptr + tj * INTER + offs_n, row_act.to(dtype), mask=n_mask)
            else:
                b_off = (slot.to(tl.int64) * INTER + offs_n[None, :]) * MAX_RANK + offs_r[:, None]
                b_mask = rb_mask[:, None] & n_mask[None, :]
                bg = tl.load(bg_ptr + b_off, mask=b_mask, other=0.0)  # [R_PAD, BLOCK_N]
                bu = tl.load(bu_ptr + b_off, mask=b_mask, other=0.0)
                if SUB_M == BLOCK_M:
                    _silu_tile_rows(gu_ptr, out_ptr, h_ptr, infl_ptr, tok, m_mask, offs_n, n_mask, offs_r, r_mask, bg,
                                    bu, scale, rank, T, INTER, MAX_RANK, stride_gu, PRECISION, INFLUENCE, NATIVE_ROUND)
                else:
                    # Tall (prefill) tiles go SUB_M rows at a time under the item's B blocks: a whole 64 x 128 tile
                    # of gate and up in float32 held every register (255 a thread, 8 warps an SM), and the
                    # activation's float math then ran at a quarter of the issue rate.
                    arange_s = tl.arange(0, SUB_M)
                    for s0 in range(start, end, SUB_M):
                        rows = s0 + arange_s
                        s_mask = rows < end
                        s_tok = tl.load(sorted_ids_ptr + rows, mask=s_mask, other=0).to(tl.int64)
                        _silu_tile_rows(gu_ptr, out_ptr, h_ptr, infl_ptr, s_tok, s_mask, offs_n, n_mask, offs_r,
                                        r_mask, bg, bu, scale, rank, T, INTER, MAX_RANK, stride_gu, PRECISION,
                                        INFLUENCE, NATIVE_ROUND)


def _precision(dtype: torch.dtype) -> str:
    # float32 models get exact float32 products (Triton's default for a float32 dot is tf32)
    return "ieee" if dtype == torch.float32 else "tf32"


def _interpreting() -> bool:
    """Whether Triton runs kernels through its interpreter (TRITON_INTERPRET), whose float casts truncate."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def _require_triton() -> None:
    if not HAVE_TRITON:
        raise RuntimeError("Triton is not installed; use the *_ref functions or kernels.dispatch")


# Launch heuristics (benchmarks/kernels_lora.py sweeps them; see benchmarks/NOTES-kernels.md).
# *_grid: programs per SM of the persistent grids (capped by the worst-case number of work items).
# shrink_items: work items wanted when the whole batch is on one adapter; K is split to reach it.
# block_n: output columns per expand work item.
# *_tall: the expand's settings for tall (block_m >= 64, prefill-sized) tiles, whose y blocks are 4x larger.
# Measured on the H100 with influence on (benchmarks/kernels_lora.py --influence, RESULTS.md session 6): 2 warps
# for the expand at decode (-5..-28% at 256 tokens), 64-column blocks for tall tiles (-11..-18% at 4,096).
# silu_*: the gate/up expand fused with the MLP activation (lora_expand_silu_mul_triton), whose work item holds
# two y blocks and two B blocks. silu_short_rows: tiles of at most this many tokens go row by row. Swept on the H100
# (benchmarks/kernels_lora.py --silu --influence, RESULTS.md session 7): 4 rows beat 8 at 32 adapters x 256
# tokens (88 vs 137 us) and match it elsewhere; 2 warps help the row path (256 adapters 235 vs 289 us) but cost
# the tile path more (32 adapters 112 vs 88), so 4 warps stay; 128-column blocks for tall tiles (4,096 tokens: 345
# vs 397 us). silu_sub_rows: a tall tile's rows are done this many at a time (session 9, call D: 16 rows 273 us at
# 4,096 tokens against 345 for 32 and 343 for the whole 64; decode tiles are 16 rows, so unchanged).
# (num_stages 1 and 2 were swept for all three kernels in session 9, call D: none beat Triton's default beyond the
# run's noise, so launches leave it to Triton.) expand_short_rows: the expand's
# tiles of at most this many tokens go row by row (session 9, call H: 256 tokens over 256 adapters, q/k/v 110.8 vs
# 119.1 us for tiles only, down 100.3 vs 104.4; 8 rows cost 32-adapter batches 29 -> 46 us). block_n_r16: the
# expand's decode block_n when the pool's max rank is <= 16 (None: block_n); session 9, call I, 256 tokens over 256
# adapters: 256 columns q/k/v 95.6 vs 110.1 us, down 89.7 vs 100.2, but at max rank 64 309 vs 186, hence rank-bound.
TUNING = dict(shrink_grid=8, expand_grid=8, shrink_items=264, block_k=128, block_n=128, shrink_warps=4,
              expand_warps=2, block_n_tall=64, expand_warps_tall=4, silu_block_n=128, silu_warps=4,
              silu_block_n_tall=128, silu_warps_tall=4, silu_short_rows=4, silu_sub_rows=16, expand_short_rows=4,
              block_n_r16=256)

# fit_grid: size each persistent grid to the programs that are resident at once (below). *_maxnreg: a register cap
# for the compiler (None: its own choice). Session 10, call A (H100, influence on): the fused gate/up kernel at 96
# registers holds 5 programs an SM instead of 4, 256 tokens on one adapter 34.3 -> 30.9 us, over 256 adapters
# 187.3 -> 169.7, 4,096 prefill tokens 275.9 -> 243.6; the expand at 96 spills in its tile path (one adapter
# 19.9 -> 24.2 us) and the shrink gains nothing.
TUNING.update(fit_grid=True, shrink_maxnreg=None, expand_maxnreg=None, silu_maxnreg=96)

_TABLE_CACHE: dict[tuple, torch.Tensor] = {}
_SM_COUNT: dict[str, int] = {}
# Resident programs an SM of each compiled persistent launch (launch key -> count), read from the first launch's
# compiled kernel (registers, shared memory).
_RESIDENT: dict[tuple, int] = {}


# An SM's registers, shared memory (bytes) and threads, per device (H100 figures where torch does not say).
_SM_LIMITS: dict[str, tuple[int, int, int]] = {}


def _sm_limits(device) -> tuple[int, int, int]:
    key = str(device)
    if key not in _SM_LIMITS:
        props = torch.cuda.get_device_properties(torch.device(device))
        _SM_LIMITS[key] = (getattr(props, "regs_per_multiprocessor", 65536),
                           getattr(props, "shared_memory_per_multiprocessor", 233472),
                           getattr(props, "max_threads_per_multi_processor", 2048))
    return _SM_LIMITS[key]


def _resident_per_sm(n_regs: int, shared: int, num_warps: int, limits: tuple[int, int, int]) -> int:
    """Programs of a kernel (registers a thread, shared memory bytes a program) an SM holds at once."""
    regs_sm, smem_sm, threads_sm = limits
    # registers go to warps in units of 256, from the quarter of the file of the scheduler each warp runs on
    warp_regs = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = 4 * ((regs_sm // 4) // warp_regs) // num_warps
    by_smem = smem_sm // (shared + 1024) if shared else 32  # the driver reserves 1 KB a block
    return max(1, min(by_regs, by_smem, threads_sm // (32 * num_warps), 32))


def _persistent_launch(kernel, key: tuple, items: int, per_sm: int, device, args, consts: dict, num_warps: int,
                       maxnreg: int | None) -> None:
    """Launch a persistent kernel (programs loop over `items` round-robin) on at most `per_sm` programs an SM.

    With fit_grid, the grid is also held to the programs an SM holds at once. A grid past that runs its last
    programs as a second wave, each with as many items as the first wave's, at a fraction of the SM's slots: at
    1.33 waves (the expand at 150 registers, 6 resident of 8) a latency-bound kernel takes two programs' time
    where one wave of 8/6 the items takes 1.33 (ncu, session 9 call G: "partial wave ... up to 50% of the
    runtime"). The kernels are not purely latency-bound, and the measured gain was smaller: q/k/v at 256 tokens over
    256 adapters 96.3 -> 90.3 us (session 10, call A). The first launch of a key learns the count from its compiled kernel; the engine's warm-up makes
    that launch, so captured graphs get the fitted grid."""
    n_sms = _num_sms(device)
    if TUNING["fit_grid"] and key in _RESIDENT:
        per_sm = min(per_sm, _RESIDENT[key])
    grid = (max(1, min(items, per_sm * n_sms)),)
    opts = {"num_warps": num_warps}
    if maxnreg:
        opts["maxnreg"] = maxnreg
    compiled = kernel[grid](*args, **consts, **opts)
    n_regs = getattr(compiled, "n_regs", None)  # the interpreter returns no compiled kernel
    if key not in _RESIDENT and n_regs and torch.device(device).type == "cuda":
        _RESIDENT[key] = _resident_per_sm(n_regs, compiled.metadata.shared, num_warps, _sm_limits(device))


def _launch_key(name: str, dtype: torch.dtype, consts: dict, num_warps: int, maxnreg: int | None) -> tuple:
    return (name, dtype, tuple(sorted(consts.items())), num_warps, maxnreg)


def _num_sms(device) -> int:
    key = str(device)
    if key not in _SM_COUNT:
        dev = torch.device(device)
        _SM_COUNT[key] = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    return _SM_COUNT[key]


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


def _align(values: list[int], cap: int) -> int:
    """Largest power of two <= cap dividing every value (byte addresses/offsets): a tl.multiple_of hint
    that lets loads from table-held addresses be 16 bytes wide."""
    a = cap
    while a > 1 and any(v % a for v in values):
        a //= 2
    return a


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def lora_shrink_triton(
    x: torch.Tensor,  # shape [T, in]
    lora_a: list[torch.Tensor],  # each shape [num_slots, max_rank, in]
    rank: torch.Tensor,  # shape [num_slots] int32
    meta: LoRABatchMeta,
    *,
    block_r: int | None = None,  # unused: the whole (stacked) rank axis is one block; kept for callers
    block_k: int | None = None,
    split_k: int | None = None,
    out: torch.Tensor | None = None,  # a zeroed contiguous float32 [n_slices, T, max_rank] to write h into
) -> torch.Tensor:  # shape [n_slices, T, max_rank] float32
    """h = x @ A of each token's adapter, per slice. `out` lets a caller hand in h from a buffer it zeroed once
    for many projections (the engine zeroes one per step): on a CUDA-graphed decode step every memset is a
    node of its own, and there is one h per projection."""
    _require_triton()
    _, max_rank = _check_shrink(x, lora_a, rank, meta)
    T, K = x.shape
    n = len(lora_a)
    if out is None:
        h = torch.zeros(n, T, max_rank, dtype=torch.float32, device=x.device)
    elif (out.shape != (n, T, max_rank) or out.dtype != torch.float32 or out.device != x.device
          or not out.is_contiguous()):
        raise ValueError(f"lora_shrink: out must be a contiguous float32 [{n}, {T}, {max_rank}] tensor on "
                         f"{x.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    else:
        h = out
    if T == 0 or max_rank == 0 or meta.max_tiles == 0:
        return h
    if x.stride(1) != 1:
        x = x.contiguous()
    lora_a = [a.contiguous() for a in lora_a]
    rank = rank.to(torch.int32)
    r_pad = _pow2(max_rank)
    block_c = max(16, _pow2(n * r_pad))
    # keep the A tile (BLOCK_K x BLOCK_C) at <= 8k elements: 64 registers a thread at 4 warps
    block_k = block_k or max(16, min(TUNING["block_k"], 8192 // block_c))
    k_chunks = triton.cdiv(K, block_k)
    if split_k is None:
        # Enough work items to fill the chip when every token is on one adapter (the fewest live tiles
        # for this T): ceil(T / block_m) tiles x split_k >= shrink_items. Many adapters only add items.
        split_k = triton.cdiv(TUNING["shrink_items"], triton.cdiv(T, meta.block_m))
    split_k = max(1, min(split_k, k_chunks))
    k_per_split = triton.cdiv(k_chunks, split_k) * block_k
    split_k = triton.cdiv(K, k_per_split)
    args = (x, _ptr_table(lora_a, x.device), h, rank,
            meta.sorted_token_ids, meta.tile_start, meta.tile_end, meta.tile_slot, _live_tiles(meta),
            T, K, max_rank, meta.max_tiles,
            x.stride(0), lora_a[0].stride(0), lora_a[0].stride(1), k_per_split, split_k)
    consts = dict(N_SLICES=n, R_PAD=r_pad, BLOCK_C=block_c, BLOCK_M=meta.block_m, BLOCK_K=block_k,
                  A_ALIGN=_align([a.data_ptr() for a in lora_a], 16), ATOMIC=split_k > 1,
                  PRECISION=_precision(x.dtype))
    warps, maxnreg = TUNING["shrink_warps"], TUNING["shrink_maxnreg"]
    _persistent_launch(_lora_shrink_kernel, _launch_key("shrink", x.dtype, consts, warps, maxnreg),
                       meta.max_tiles * split_k, TUNING["shrink_grid"], x.device, args, consts, warps, maxnreg)
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
    block_r: int | None = None,  # unused: the whole rank is one dot; kept for callers
    n_split: int | None = None,  # unused since the persistent grid; kept for callers
    influence: torch.Tensor | None = None,  # shape [2, T] float32: += per-token |delta|^2 and |base y|^2
) -> torch.Tensor:
    """y += each token's LoRA delta. With `influence`, row 0 gains each token's squared delta norm and row 1
    the squared norm of its base output (y before the delta), both over all columns of y: the influence
    statistic |delta| / |base| follows from them without a delta buffer (tokens with no adapter get 0, 0)."""
    _require_triton()
    _, max_rank, outs = _check_expand(y, h, lora_b, rank, scale, meta)
    if influence is not None and (influence.shape != (2, y.shape[0]) or influence.dtype != torch.float32
                                  or influence.device != y.device or not influence.is_contiguous()):
        raise ValueError(f"lora_expand: influence must be a contiguous float32 [2, {y.shape[0]}] tensor on "
                         f"{y.device}, got {tuple(influence.shape)} {influence.dtype} on {influence.device}")
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
    tall = meta.block_m >= 64
    if not block_n:
        block_n = TUNING["block_n_tall"] if tall else TUNING["block_n"]
        if not tall and max_rank <= 16 and TUNING["block_n_r16"]:
            # decode with ranks <= 16: a B block of 256 x 16 holds as many registers as the 128 x 32 one of larger
            # pools, and halves the items per token (one token a tile at 1000 adapters, where each item is mostly
            # fixed cost)
            block_n = TUNING["block_n_r16"]
    # one int64 table of 5 rows per column block: slice, first column in the slice, first column in y,
    # slice width, lora_b base address (cached by value: one per layer/module after the warm-up)
    blocks = [(i, n0, cols[i] + n0, o, lora_b[i].data_ptr()) for i, o in enumerate(outs) for n0 in range(0, o, block_n)]
    n_blocks = len(blocks)
    if n_blocks == 0:
        return y
    table = _int_table([b[f] for f in range(5) for b in blocks], torch.int64, dev)
    esize = y.element_size()
    args = (y, h, table, rank.to(torch.int32), scale.to(torch.float32),
            meta.sorted_token_ids, meta.tile_start, meta.tile_end, meta.tile_slot, _live_tiles(meta),
            influence if influence is not None else y,  # unused pointer when INFLUENCE is off
            T, max_rank, meta.max_tiles, n_blocks, y.stride(0))
    consts = dict(BLOCK_M=meta.block_m, BLOCK_N=block_n, R_PAD=max(16, _pow2(max_rank)),
                  B_ALIGN=_align([b.data_ptr() for b in lora_b], 16),
                  Y_ALIGN=_align([b[2] * esize for b in blocks] + [y.data_ptr(), y.stride(0) * esize], 16) // esize,
                  PRECISION=_precision(y.dtype), INFLUENCE=influence is not None,
                  N_ALIGN=_align(list(outs) + [block_n], 16), R_ALIGN=_align([max_rank], 8),
                  SHORT_ROWS=TUNING["expand_short_rows"])
    warps, maxnreg = TUNING["expand_warps_tall" if tall else "expand_warps"], TUNING["expand_maxnreg"]
    _persistent_launch(_lora_expand_kernel, _launch_key("expand", y.dtype, consts, warps, maxnreg),
                       meta.max_tiles * n_blocks, TUNING["expand_grid"], dev, args, consts, warps, maxnreg)
    return y


def lora_expand_silu_mul_triton(
    gate_up: torch.Tensor,  # shape [T, 2I] (gate | up), not modified
    h: torch.Tensor,  # shape [2, T, max_rank] float32
    lora_b: list[torch.Tensor],  # [b_gate, b_up], each shape [num_slots, I, max_rank]
    rank: torch.Tensor,  # shape [num_slots] int32
    scale: torch.Tensor,  # shape [num_slots] float32
    meta: LoRABatchMeta,
    *,
    influence: torch.Tensor | None = None,  # shape [2, T] float32, as lora_expand_triton's
) -> torch.Tensor:  # shape [T, I]
    """silu(gate + delta_gate) * (up + delta_up) in one pass over the gate/up output (lora_expand_silu_mul_ref);
    `influence` gains what lora_expand_triton's would for the two slices."""
    _require_triton()
    _check_silu_expand(gate_up, lora_b)
    _, max_rank, _ = _check_expand(gate_up, h, lora_b, rank, scale, meta)
    if influence is not None and (influence.shape != (2, gate_up.shape[0]) or influence.dtype != torch.float32
                                  or influence.device != gate_up.device or not influence.is_contiguous()):
        raise ValueError(f"lora_expand_silu_mul: influence must be a contiguous float32 [2, {gate_up.shape[0]}] "
                         f"tensor on {gate_up.device}, got {tuple(influence.shape)} {influence.dtype} on "
                         f"{influence.device}")
    T, inter = gate_up.shape[0], gate_up.shape[1] // 2
    if T == 0 or max_rank == 0 or meta.max_tiles == 0:
        from kernels.elementwise import silu_mul_triton

        return silu_mul_triton(gate_up)
    if gate_up.stride(1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty(T, inter, dtype=gate_up.dtype, device=gate_up.device)
    h = h.float().contiguous()
    lora_b = [b.contiguous() for b in lora_b]
    tall = meta.block_m >= 64
    block_n = TUNING["silu_block_n_tall" if tall else "silu_block_n"]
    n_blocks = triton.cdiv(inter, block_n)
    # worst case row tiles: every token on slot -1 (cdiv(T, block_m)) plus every tile live
    items = (triton.cdiv(T, meta.block_m) + meta.max_tiles) * n_blocks
    args = (gate_up, out, h, lora_b[0], lora_b[1], rank.to(torch.int32), scale.to(torch.float32),
            meta.sorted_token_ids, meta.tile_start, meta.tile_end, meta.tile_slot, _live_tiles(meta),
            influence if influence is not None else out,  # unused pointer when INFLUENCE is off
            T, inter, max_rank, meta.max_tiles, n_blocks, gate_up.stride(0))
    consts = dict(BLOCK_M=meta.block_m, BLOCK_N=block_n, R_PAD=max(16, _pow2(max_rank)),
                  PRECISION=_precision(gate_up.dtype), INFLUENCE=influence is not None,
                  SHORT_ROWS=TUNING["silu_short_rows"], NATIVE_ROUND=not _interpreting(),
                  R_ALIGN=_align([max_rank], 8), SUB_M=min(meta.block_m, TUNING["silu_sub_rows"]))
    warps, maxnreg = TUNING["silu_warps_tall" if tall else "silu_warps"], TUNING["silu_maxnreg"]
    _persistent_launch(_lora_expand_silu_mul_kernel, _launch_key("silu", gate_up.dtype, consts, warps, maxnreg),
                       items, TUNING["expand_grid"], gate_up.device, args, consts, warps, maxnreg)
    return out


# The module-level names of the contract go through the dispatcher.
def lora_shrink(x, lora_a, rank, meta):
    from kernels import dispatch

    return dispatch.lora_shrink(x, lora_a, rank, meta)


def lora_expand(y, h, lora_b, rank, scale, meta):
    from kernels import dispatch

    return dispatch.lora_expand(y, h, lora_b, rank, scale, meta)
