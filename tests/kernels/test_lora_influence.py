"""The Triton expand's fused influence statistics against the explicit formula (delta buffer + row norms).

Runs through TRITON_INTERPRET on CPU (tests/conftest.py sets it when there is no GPU) at small, odd sizes."""

from __future__ import annotations

import pytest
import torch

from kernels import lora

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _expand(y, h, b, rank, scale, meta, influence=None):
    """lora_expand_triton on DEVICE (the interpreter on CPU), result back on the CPU."""
    d = lambda t: t.to(DEVICE)  # noqa: E731
    dmeta = lora.make_lora_meta(d(meta.token_slots), num_slots=rank.shape[0])
    dinfl = None if influence is None else d(influence)
    out = lora.lora_expand_triton(d(y), d(h), [d(x) for x in b], d(rank), d(scale), dmeta, influence=dinfl)
    if influence is not None:
        influence.copy_(dinfl.cpu())
    return out.cpu()


def _case(T: int, ranks: list[int], outs: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    S, R = len(ranks), max(16, max(ranks))
    rank = torch.tensor(ranks, dtype=torch.int32)
    slots = torch.randint(-1, S, (T,), generator=g, dtype=torch.int32)
    y = torch.randn(T, sum(outs), generator=g)
    h = torch.randn(len(outs), T, R, generator=g)
    b = [torch.randn(S, o, R, generator=g) for o in outs]
    for i, r in enumerate(ranks):  # the pool's contract: rows/cols past a slot's rank are zero
        h[:, slots == i, r:] = 0
        for bi in b:
            bi[i, :, r:] = 0
    h[:, slots < 0] = 0
    scale = torch.rand(S, generator=g) + 0.5
    return y, h, b, rank, scale, lora.make_lora_meta(slots, num_slots=S), slots


@pytest.mark.parametrize("T,ranks,outs", [(1, [7], [24]), (3, [1, 16], [40, 24, 24]),
                                          (37, [7, 16, 0, 3], [40, 24, 24]), (129, [16, 5], [64, 64])])
@pytest.mark.parametrize("short_rows", [0, 64], ids=["tiles", "rows"])
def test_fused_influence_matches_norms_of_an_explicit_delta(T, ranks, outs, short_rows, monkeypatch):
    monkeypatch.setitem(lora.TUNING, "expand_short_rows", short_rows)  # both the tile and the row path
    y, h, b, rank, scale, meta, slots = _case(T, ranks, outs, seed=T)
    plain = _expand(y.clone(), h, b, rank, scale, meta)
    infl = torch.zeros(2, T)
    fused = _expand(y.clone(), h, b, rank, scale, meta, influence=infl)
    torch.testing.assert_close(fused, plain, rtol=0, atol=0)  # the statistics change nothing in y
    delta = lora.lora_expand_ref(torch.zeros_like(y), h, b, rank, scale, meta)
    live = (slots >= 0) & (rank[slots.clamp(min=0).long()] > 0)
    torch.testing.assert_close(infl[0], (delta * delta).sum(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(infl[1], torch.where(live, (y * y).sum(1), torch.zeros(T)), rtol=1e-5, atol=1e-5)
    # the statistic the engine keeps: |delta| / max(|base|, 1e-6), zero for tokens without an adapter
    ratio = infl[0].sqrt() / infl[1].sqrt().clamp_min(1e-6)
    expected = delta.norm(dim=1) / y.norm(dim=1).clamp_min(1e-6)
    torch.testing.assert_close(ratio, torch.where(live, expected, torch.zeros(T)), rtol=1e-4, atol=1e-6)


def test_fused_influence_accumulates_and_rejects_a_bad_buffer():
    y, h, b, rank, scale, meta, _ = _case(9, [4, 8], [24, 16], seed=3)
    once = torch.zeros(2, 9)
    _expand(y.clone(), h, b, rank, scale, meta, influence=once)
    twice = torch.zeros(2, 9)
    for _ in range(2):
        _expand(y.clone(), h, b, rank, scale, meta, influence=twice)
    torch.testing.assert_close(twice, 2 * once)
    for bad in (torch.zeros(9), torch.zeros(2, 8), torch.zeros(2, 9, dtype=torch.float64)):
        with pytest.raises(ValueError, match="influence"):
            _expand(y.clone(), h, b, rank, scale, meta, influence=bad)
