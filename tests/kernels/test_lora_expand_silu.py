"""The gate/up expand fused with the MLP activation (kernels.lora.lora_expand_silu_mul_triton) against the unfused
path it replaces: the expand into the projection output, then silu(gate) * up.

On CPU the kernel runs through the interpreter (tests/kernels/conftest.py) at small, odd sizes; on a GPU the same
tests compile it and a bf16 case is checked against a float64 per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels import lora
from tests.kernels.test_lora import loop_lora, make_pool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(T, inter, ranks, slots_kind, seed, dtype=torch.float32, in_f=24):
    g = torch.Generator().manual_seed(seed)
    S = len(ranks)
    max_rank = max(16, max(ranks))
    a, b, rank, scale = make_pool(S, max_rank, in_f, [inter, inter], ranks, dtype, seed=seed)
    if slots_kind == "none":
        slots = torch.full((T,), -1, dtype=torch.int32)
    elif slots_kind == "one":
        slots = torch.zeros(T, dtype=torch.int32)
    else:  # every slot and -1, shuffled
        slots = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32)
    x = torch.randn(T, in_f, generator=g).to(dtype)
    gate_up = (torch.randn(T, 2 * inter, generator=g) * 2).to(dtype)
    return x, gate_up, a, b, rank, scale, slots


def _on(t):
    return t.to(DEVICE)


def _fused(x, gate_up, a, b, rank, scale, slots, influence=None):
    meta = lora.make_lora_meta(_on(slots), num_slots=rank.shape[0])
    h = lora.lora_shrink_triton(_on(x), [_on(t) for t in a], _on(rank), meta)
    gu = _on(gate_up)
    out = lora.lora_expand_silu_mul_triton(gu, h, [_on(t) for t in b], _on(rank), _on(scale), meta,
                                           influence=influence)
    torch.testing.assert_close(gu.cpu(), gate_up, rtol=0, atol=0)  # the projection output is only read
    return out.cpu(), h, meta


def _unfused(gate_up, h, b, rank, scale, meta, influence=None):
    y = _on(gate_up).clone()
    lora.lora_expand_triton(y, h, [_on(t) for t in b], _on(rank), _on(scale), meta, influence=influence)
    gate, up = y.chunk(2, dim=-1)
    return (F.silu(gate) * up).cpu()


@pytest.mark.parametrize("T,inter,ranks,kind", [
    (1, 24, [7], "one"),
    (3, 40, [1, 16], "mixed"),
    (37, 200, [7, 16, 0, 3], "mixed"),  # a rank-0 slot, -1 tokens, column blocks with a ragged end
    (129, 72, [16, 5], "one"),
    (20, 24, [16], "none"),  # all -1: the activation alone
    (70, 136, [64, 16, 7], "mixed"),
])
@pytest.mark.parametrize("short_rows", [0, 8, 64], ids=["tiles", "mixed-paths", "rows"])
def test_fused_matches_expand_then_activation(T, inter, ranks, kind, short_rows, monkeypatch):
    # tiles of <= short_rows tokens go row by row, the others through a tile-high dot: each path on its own, and
    # the two side by side
    monkeypatch.setitem(lora.TUNING, "silu_short_rows", short_rows)
    x, gate_up, a, b, rank, scale, slots = _case(T, inter, ranks, kind, seed=T + inter)
    got, h, meta = _fused(x, gate_up, a, b, rank, scale, slots)
    want = _unfused(gate_up, h, b, rank, scale, meta)
    assert got.shape == (T, inter)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the float64 per-token loop: silu(gate + delta) * (up + delta)
    _, y64 = loop_lora(x, gate_up, a, b, rank, scale, slots)
    gate, up = y64.chunk(2, dim=-1)
    torch.testing.assert_close(got.double(), F.silu(gate) * up, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("short_rows", [0, 64], ids=["tiles", "rows"])
def test_fused_matches_the_reference_and_adds_the_expands_influence(short_rows, monkeypatch):
    monkeypatch.setitem(lora.TUNING, "silu_short_rows", short_rows)
    x, gate_up, a, b, rank, scale, slots = _case(45, 56, [16, 4, 9], "mixed", seed=5)
    infl = _on(torch.zeros(2, 45))
    got, h, meta = _fused(x, gate_up, a, b, rank, scale, slots, influence=infl)
    ref = lora.lora_expand_silu_mul_ref(gate_up, h.cpu(), b, rank, scale, lora.make_lora_meta(slots, num_slots=3))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    want = _on(torch.zeros(2, 45))
    _unfused(gate_up, h, b, rank, scale, meta, influence=want)
    torch.testing.assert_close(infl, want, rtol=1e-5, atol=1e-5)
    assert infl[0][_on(slots) < 0].abs().sum() == 0 and infl[0][_on(slots) >= 0].min() > 0


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 dots are checked on the GPU run (the interpreter has no bf16 dot)")
@pytest.mark.parametrize("short_rows", [0, 64], ids=["tiles", "rows"])
def test_bf16_rounds_as_the_unfused_path(short_rows, monkeypatch):
    """bf16: gate and up are rounded after their delta (the expand's store), then the activation's roundings."""
    monkeypatch.setitem(lora.TUNING, "silu_short_rows", short_rows)
    x, gate_up, a, b, rank, scale, slots = _case(33, 48, [16, 8], "mixed", seed=7, dtype=torch.bfloat16)
    got, h, meta = _fused(x, gate_up, a, b, rank, scale, slots)
    want = _unfused(gate_up, h, b, rank, scale, meta)
    assert got.dtype == torch.bfloat16
    # the same roundings in the same order: at most an ulp apart where the dots sum in another order
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    _, y64 = loop_lora(x, gate_up, a, b, rank, scale, slots)
    gate, up = y64.chunk(2, dim=-1)
    torch.testing.assert_close(got.double(), F.silu(gate) * up, rtol=3e-2, atol=3e-2)


def test_bad_inputs_raise_and_write_nothing():
    x, gate_up, a, b, rank, scale, slots = _case(5, 24, [4], "one", seed=1)
    meta = lora.make_lora_meta(_on(slots), num_slots=1)
    h = lora.lora_shrink_triton(_on(x), [_on(t) for t in a], _on(rank), meta)
    gu, bd, r, s = _on(gate_up), [_on(t) for t in b], _on(rank), _on(scale)
    with pytest.raises(ValueError, match="lora_b must be"):
        lora.lora_expand_silu_mul_triton(gu, h, bd[:1], r, s, meta)
    with pytest.raises(ValueError, match="gate_up must be"):
        lora.lora_expand_silu_mul_triton(gu[:, :40], h, bd, r, s, meta)
    with pytest.raises(ValueError, match="h must be"):
        lora.lora_expand_silu_mul_triton(gu, h[:1], bd, r, s, meta)
    with pytest.raises(ValueError, match="influence"):
        lora.lora_expand_silu_mul_triton(gu, h, bd, r, s, meta, influence=_on(torch.zeros(2, 4)))
    torch.testing.assert_close(gu.cpu(), gate_up, rtol=0, atol=0)


@pytest.mark.parametrize("short_rows", [0, 64], ids=["tiles", "rows"])
def test_nothing_past_each_rank_is_used(short_rows, monkeypatch):
    """As the expand (test_lora.test_triton_expand_uses_nothing_past_each_rank): B's columns are read up to the rank
    rounded up to 8, h at the exact rank, so values past each rank in both change nothing."""
    monkeypatch.setitem(lora.TUNING, "silu_short_rows", short_rows)
    x, gate_up, a, b, rank, scale, slots = _case(29, 40, [3, 7, 11], "mixed", seed=9)
    clean, h, meta = _fused(x, gate_up, a, b, rank, scale, slots)
    g = torch.Generator().manual_seed(10)
    h_dirty, b_dirty = h.cpu().clone(), [t.clone() for t in b]
    for s, r in enumerate(rank.tolist()):
        h_dirty[:, slots == s, r:] = 5.0
        for t in b_dirty:
            t[s, :, r:] = torch.randn(t.shape[1], t.shape[2] - r, generator=g) * 10
    dirty = lora.lora_expand_silu_mul_triton(_on(gate_up), _on(h_dirty), [_on(t) for t in b_dirty], _on(rank),
                                             _on(scale), meta)
    torch.testing.assert_close(dirty.cpu(), clean, rtol=0, atol=0)


@pytest.mark.parametrize("sub_rows", [16, 32])
def test_tall_tiles_done_in_row_blocks_match_whole_tiles(sub_rows, monkeypatch):
    """Prefill-sized (64-token) tiles go `silu_sub_rows` rows at a time under the item's B blocks: the same output and
    influence as whole tiles, with ragged tile ends (segments of 70 and 45 tokens, and -1 tokens) and a rank-0 slot."""
    monkeypatch.setitem(lora.TUNING, "silu_short_rows", 4)
    T, inter = 150, 40
    x, gate_up, a, b, rank, scale, _ = _case(T, inter, [16, 5, 0], "one", seed=21)
    order = torch.randperm(T, generator=torch.Generator().manual_seed(22))
    slots = torch.tensor([0] * 70 + [1] * 45 + [-1] * 20 + [2] * 15, dtype=torch.int32)[order]

    def run(sub):
        monkeypatch.setitem(lora.TUNING, "silu_sub_rows", sub)
        meta = lora.make_lora_meta(_on(slots), num_slots=3, block_m=64)
        h = lora.lora_shrink_triton(_on(x), [_on(t) for t in a], _on(rank), meta)
        infl = _on(torch.zeros(2, T))
        out = lora.lora_expand_silu_mul_triton(_on(gate_up), h, [_on(t) for t in b], _on(rank), _on(scale), meta,
                                               influence=infl)
        return out.cpu(), infl.cpu(), h, meta

    whole, infl_whole, h, meta = run(64)
    parts, infl_parts, _, _ = run(sub_rows)
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(infl_parts, infl_whole, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts, _unfused(gate_up, h, b, rank, scale, meta), rtol=1e-5, atol=1e-5)
