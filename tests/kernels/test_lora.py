"""LoRA shrink/expand: the reference and the Triton kernels against a per-token loop.

On CPU the Triton kernels run through the interpreter (see conftest.py), so sizes stay small; on a GPU the
same tests compile the kernels and compare against a float64 loop.
"""

from __future__ import annotations


import pytest
import torch

from kernels import dispatch
from kernels import lora as lora_mod
from kernels.lora import (
    lora_expand_ref,
    lora_expand_triton,
    lora_shrink_ref,
    lora_shrink_triton,
    make_lora_meta,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_pool(num_slots, max_rank, in_f, outs, ranks, dtype, seed=0):
    """Random (never zero) adapters, zero-padded past each slot's true rank as the slot pool stores them."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.tensor(ranks, dtype=torch.int32)
    a_list, b_list = [], []
    for out_f in outs:
        a = torch.randn(num_slots, max_rank, in_f, generator=g) / in_f**0.5
        b = torch.randn(num_slots, out_f, max_rank, generator=g) / max_rank**0.5
        for s, r in enumerate(ranks):
            a[s, r:] = 0
            b[s, :, r:] = 0
        a_list.append(a.to(dtype))
        b_list.append(b.to(dtype))
    scale = torch.rand(num_slots, generator=g) + 0.5
    return a_list, b_list, rank, scale


def loop_lora(x, y, a_list, b_list, rank, scale, slots):
    """The obvious per-token loop in float64: h = A x, y += scale * B h, slot -1 untouched."""
    T = x.shape[0]
    max_rank = a_list[0].shape[1]
    h = torch.zeros(len(a_list), T, max_rank, dtype=torch.float64)
    y = y.double().clone()
    for t in range(T):
        s = int(slots[t])
        if s < 0:
            continue
        r = int(rank[s])
        col = 0
        for i, (a, b) in enumerate(zip(a_list, b_list)):
            ht = a[s, :r].double() @ x[t].double()
            h[i, t, :r] = ht
            y[t, col : col + b.shape[1]] += float(scale[s]) * (b[s, :, :r].double() @ ht)
            col += b.shape[1]
    return h, y


IMPLS = {
    "ref": (lora_shrink_ref, lora_expand_ref),
    "triton": (lora_shrink_triton, lora_expand_triton),
}

# (T, in, outs, ranks per slot, slot pattern)
CASES = [
    pytest.param(1, 576, [64], [7, 1, 64], "one", id="T1-decode"),
    pytest.param(3, 576, [48, 16, 16], [1, 7, 64], "mixed", id="T3-qkv-ranks-1-7-64"),
    pytest.param(129, 96, [40, 24], [7, 0, 16, 64], "mixed", id="T129-gateup-empty-slot"),
    pytest.param(17, 64, [32, 8, 8], [16, 16, 16, 16], "none", id="all-minus-one"),
    pytest.param(33, 40, [24], [64, 1, 7, 3, 16], "distinct", id="one-token-per-slot"),
]


def slot_pattern(kind, T, num_slots, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return torch.full((T,), -1, dtype=torch.int32)
    if kind == "one":
        return torch.zeros(T, dtype=torch.int32)
    if kind == "distinct":
        return (torch.arange(T, dtype=torch.int32) % (num_slots + 1)) - 1
    # random mix including -1; slot 1 is never used when there are >= 4 slots (an empty segment)
    s = torch.randint(-1, num_slots, (T,), generator=g, dtype=torch.int32)
    if num_slots >= 4:
        s[s == 1] = 3
    return s


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("T,in_f,outs,ranks,kind", CASES)
def test_shrink_expand_match_per_token_loop(impl, T, in_f, outs, ranks, kind):
    dtype = torch.float32  # float64 loop as the reference; bf16 is checked on the GPU below
    shrink, expand = IMPLS[impl]
    num_slots = len(ranks)
    a_list, b_list, rank, scale = make_pool(num_slots, max(ranks), in_f, outs, ranks, dtype)
    slots = slot_pattern(kind, T, num_slots)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, in_f, generator=g).to(dtype)
    y0 = torch.randn(T, sum(outs), generator=g).to(dtype)
    h_want, y_want = loop_lora(x, y0, a_list, b_list, rank, scale, slots)

    dev = lambda t: t.to(DEVICE)  # noqa: E731
    meta = make_lora_meta(dev(slots))
    h = shrink(dev(x), [dev(a) for a in a_list], dev(rank), meta)
    assert h.shape == (len(outs), T, max(ranks))
    # only tokens with an adapter carry h (the expand ignores the others)
    has = slots >= 0
    torch.testing.assert_close(h.cpu().double()[:, has], h_want[:, has], rtol=1e-4, atol=1e-4)
    y = dev(y0.clone())
    expand(y, h, [dev(b) for b in b_list], dev(rank), dev(scale), meta)
    torch.testing.assert_close(y.cpu().double(), y_want, rtol=1e-4, atol=1e-4)
    # tokens without an adapter are untouched, bit for bit
    assert torch.equal(y.cpu()[~has], y0[~has])


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 kernels are checked on the GPU run")
def test_triton_bf16_close_to_float64_loop():
    ranks = [16, 7, 64, 1]
    a_list, b_list, rank, scale = make_pool(4, 64, 576, [576, 192, 192], ranks, torch.bfloat16)
    slots = slot_pattern("mixed", 257, 4)
    x = torch.randn(257, 576).to(torch.bfloat16)
    y0 = torch.randn(257, 960).to(torch.bfloat16)
    _, y_want = loop_lora(x, y0, a_list, b_list, rank, scale, slots)
    meta = make_lora_meta(slots.cuda())
    h = lora_shrink_triton(x.cuda(), [a.cuda() for a in a_list], rank.cuda(), meta)
    y = y0.cuda()
    lora_expand_triton(y, h, [b.cuda() for b in b_list], rank.cuda(), scale.cuda(), meta)
    torch.testing.assert_close(y.cpu().double(), y_want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("T,block_m", [(0, 16), (1, 16), (5, 16), (70, 16), (200, 64)])
def test_meta_tiles_cover_each_adapter_token_once(T, block_m):
    g = torch.Generator().manual_seed(T)
    slots = torch.randint(-1, 6, (T,), generator=g, dtype=torch.int32)
    meta = make_lora_meta(slots, block_m=block_m)
    seen = torch.zeros(T, dtype=torch.int64)
    for start, end, s in zip(meta.tile_start.tolist(), meta.tile_end.tolist(), meta.tile_slot.tolist()):
        if s < 0:
            assert start == end == 0
            continue
        assert 0 < end - start <= block_m
        toks = meta.sorted_token_ids[start:end].long()
        assert (slots[toks] == s).all()
        seen[toks] += 1
    assert torch.equal(seen, (slots >= 0).long())
    # live tiles come first and their device-side count matches (the persistent kernels loop up to it)
    live = (meta.tile_slot >= 0).long()
    n_live = int(live.sum())
    assert meta.num_live_tiles.shape == (1,) and int(meta.num_live_tiles) == n_live
    assert bool((live[:n_live] == 1).all())
    # shapes depend on T only (CUDA-graph friendly)
    assert meta.max_tiles <= max(T, 0)


def test_meta_for_all_minus_one_has_no_live_tiles():
    meta = make_lora_meta(torch.full((9,), -1, dtype=torch.int32))
    assert (meta.tile_slot == -1).all()


def test_bad_inputs_raise_value_error():
    a_list, b_list, rank, scale = make_pool(2, 4, 8, [6], [4, 2], torch.float32)
    meta = make_lora_meta(torch.zeros(3, dtype=torch.int32))
    with pytest.raises(ValueError, match="tokens"):
        lora_shrink_ref(torch.randn(4, 8), a_list, rank, meta)
    with pytest.raises(ValueError, match="lora_a"):
        lora_shrink_ref(torch.randn(3, 9), a_list, rank, meta)
    with pytest.raises(ValueError, match="dtype|float"):
        lora_shrink_ref(torch.randn(3, 8, dtype=torch.float64), a_list, rank, meta)
    h = torch.randn(1, 3, 4)
    with pytest.raises(ValueError, match="columns"):
        lora_expand_ref(torch.randn(3, 7), h, b_list, rank, scale, meta)
    with pytest.raises(ValueError, match="h must be"):
        lora_expand_ref(torch.randn(3, 6), torch.randn(2, 3, 4), b_list, rank, scale, meta)
    with pytest.raises(ValueError, match="1-D"):
        make_lora_meta(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        make_lora_meta(torch.zeros(2))


def test_dispatch_picks_reference_on_cpu_and_honours_env(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.setenv("OPENLORA_KERNELS", "auto")
    assert dispatch.use_triton(x) is False
    monkeypatch.setenv("OPENLORA_KERNELS", "torch")
    assert dispatch.use_triton(x) is False
    monkeypatch.setenv("OPENLORA_KERNELS", "triton")
    assert dispatch.use_triton(x) is True
    monkeypatch.setenv("OPENLORA_KERNELS", "bogus")
    with pytest.raises(ValueError, match="OPENLORA_KERNELS"):
        dispatch.use_triton(x)
    if torch.cuda.is_available():
        monkeypatch.setenv("OPENLORA_KERNELS", "auto")
        assert dispatch.use_triton(x.cuda()) is True
        monkeypatch.setenv("OPENLORA_KERNELS", "torch")
        assert dispatch.use_triton(x.cuda()) is False


def test_dispatch_lora_matches_reference_end_to_end():
    a_list, b_list, rank, scale = make_pool(3, 8, 16, [12, 4], [8, 3, 5], torch.float32)
    slots = torch.tensor([2, -1, 0, 2, 1], dtype=torch.int32)
    x = torch.randn(5, 16)
    y0 = torch.randn(5, 16)
    meta = dispatch.make_lora_meta(slots.to(DEVICE))
    h = dispatch.lora_shrink(x.to(DEVICE), [a.to(DEVICE) for a in a_list], rank.to(DEVICE), meta)
    y = y0.clone().to(DEVICE)
    dispatch.lora_expand(y, h, [b.to(DEVICE) for b in b_list], rank.to(DEVICE), scale.to(DEVICE), meta)
    _, y_want = loop_lora(x, y0, a_list, b_list, rank, scale, slots)
    torch.testing.assert_close(y.cpu().double(), y_want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split_k,block_r", [(3, 16), (1, 32)])
def test_triton_split_k_and_rank_blocks_match_loop(split_k, block_r):
    ranks = [40, 1, 17]
    a_list, b_list, rank, scale = make_pool(3, 40, 200, [24, 8], ranks, torch.float32, seed=5)
    slots = torch.tensor([0, 2, -1, 0, 1, 2, 2], dtype=torch.int32)
    x = torch.randn(7, 200)
    y0 = torch.randn(7, 32)
    h_want, y_want = loop_lora(x, y0, a_list, b_list, rank, scale, slots)
    meta = make_lora_meta(slots.to(DEVICE))
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    h = lora_shrink_triton(dev(x), [dev(a) for a in a_list], dev(rank), meta,
                           split_k=split_k, block_r=block_r, block_k=32)
    has = slots >= 0
    torch.testing.assert_close(h.cpu().double()[:, has], h_want[:, has], rtol=1e-4, atol=1e-4)
    y = dev(y0.clone())
    lora_expand_triton(y, h, [dev(b) for b in b_list], dev(rank), dev(scale), meta, block_r=block_r, block_n=16)
    torch.testing.assert_close(y.cpu().double(), y_want, rtol=1e-4, atol=1e-4)


def test_triton_shrink_writes_into_a_given_buffer():
    """`out=`: h lands in the caller's zeroed piece of a larger buffer (the engine's per-step workspace), the
    same values as a fresh h, nothing written outside the piece; a piece of the wrong shape is refused."""
    ranks = [5, 16, 1]
    a_list, _, rank, _ = make_pool(3, 16, 72, [24, 8, 8], ranks, torch.float32, seed=9)
    slots = torch.tensor([1, 0, -1, 2, 1], dtype=torch.int32)
    x = torch.randn(5, 72)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    meta = make_lora_meta(slots.to(DEVICE))
    a_dev = [dev(a) for a in a_list]
    fresh = lora_shrink_triton(dev(x), a_dev, dev(rank), meta, split_k=2, block_k=32)
    buf = torch.zeros(3 * 5 * 16 + 7, device=DEVICE)
    piece = buf[7:].view(3, 5, 16)
    got = lora_shrink_triton(dev(x), a_dev, dev(rank), meta, split_k=2, block_k=32, out=piece)
    assert got.data_ptr() == piece.data_ptr()
    torch.testing.assert_close(got, fresh, rtol=1e-6, atol=1e-6)
    assert not buf[:7].any()
    h_want, _ = loop_lora(x, torch.zeros(5, 40), a_list, [torch.zeros(3, o, 16) for o in (24, 8, 8)], rank,
                          torch.ones(3), slots)
    has = slots >= 0
    torch.testing.assert_close(got.cpu().double()[:, has], h_want[:, has], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="out must be"):
        lora_shrink_triton(dev(x), a_dev, dev(rank), meta, out=buf[:3 * 5 * 15].view(3, 5, 15))


@pytest.mark.parametrize("grid_programs,drop_count", [(1, False), (3, True)])
def test_triton_persistent_loop_covers_every_item(monkeypatch, grid_programs, drop_count):
    """Grids far smaller than the work: each program loops over many (tile, K split) / (tile, column
    block) items; also a meta without the device-side live count (the launcher counts the tiles)."""
    from kernels import lora

    monkeypatch.setattr(lora, "_num_sms", lambda device: 1)
    monkeypatch.setitem(lora.TUNING, "shrink_grid", grid_programs)
    monkeypatch.setitem(lora.TUNING, "expand_grid", grid_programs)
    ranks = [16, 5, 0, 32]
    a_list, b_list, rank, scale = make_pool(4, 32, 72, [40, 24, 24], ranks, torch.float32, seed=7)
    slots = slot_pattern("mixed", 45, 4, seed=3)
    slots[:6] = 2  # a rank-0 slot: live tiles with no work
    g = torch.Generator().manual_seed(4)
    x = torch.randn(45, 72, generator=g)
    y0 = torch.randn(45, 88, generator=g)
    h_want, y_want = loop_lora(x, y0, a_list, b_list, rank, scale, slots)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    meta = make_lora_meta(dev(slots))
    if drop_count:
        meta.num_live_tiles = None
    h = lora_shrink_triton(dev(x), [dev(a) for a in a_list], dev(rank), meta, split_k=2, block_k=16)
    has = slots >= 0
    torch.testing.assert_close(h.cpu().double()[:, has], h_want[:, has], rtol=1e-4, atol=1e-4)
    y = dev(y0.clone())
    lora_expand_triton(y, h, [dev(b) for b in b_list], dev(rank), dev(scale), meta, block_n=16)
    torch.testing.assert_close(y.cpu().double(), y_want, rtol=1e-4, atol=1e-4)
    assert torch.equal(y.cpu()[~has], y0[~has])


@pytest.mark.parametrize("n_regs,shared,warps,want", [
    (150, 9216, 2, 6),  # ncu, session 9 call G (H100): the expand at 256 x 256, "Block Limit Registers 6"
    (128, 40960, 4, 4),  # the shrink there: 4
    (32, 0, 4, 16),  # a small elementwise kernel: held by the SM's 2048 threads, not its registers
    (40, 120_000, 4, 1),  # shared memory bound
])
def test_resident_programs_follow_registers_and_shared_memory(n_regs, shared, warps, want):
    from kernels import lora

    assert lora._resident_per_sm(n_regs, shared, warps, (65536, 233472, 2048)) == want


def test_persistent_grid_is_held_to_one_wave(monkeypatch):
    """The first launch of a kernel learns how many of its programs an SM holds; later launches of it size the
    grid to that (never above TUNING's cap or the item count), so no partial second wave is launched."""
    from types import SimpleNamespace

    from kernels import lora

    grids = []

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                grids.append(grid[0])
                return SimpleNamespace(n_regs=150, metadata=SimpleNamespace(shared=9216))
            return run

    monkeypatch.setattr(lora, "_num_sms", lambda device: 10)
    monkeypatch.setattr(lora, "_sm_limits", lambda device: (65536, 233472, 2048))
    monkeypatch.setattr(lora, "_RESIDENT", {})
    key = lora._launch_key("expand", torch.bfloat16, dict(BLOCK_N=256), 2, None)
    for items in (10_000, 10_000, 45):
        lora._persistent_launch(Kernel(), key, items, 8, "cuda", (), {}, 2, None)
    assert grids == [80, 60, 45]
    monkeypatch.setitem(lora.TUNING, "fit_grid", False)
    lora._persistent_launch(Kernel(), key, 10_000, 8, "cuda", (), {}, 2, None)
    assert grids[-1] == 80


@pytest.mark.parametrize("T", [70, 300])
def test_triton_tall_tiles_match_loop(T):
    """block_m 64 (the prefill tile) with long segments, ragged slices and the automatic split-K."""
    ranks = [8, 16, 3]
    a_list, b_list, rank, scale = make_pool(3, 16, 48, [36, 20], ranks, torch.float32, seed=11)
    slots = torch.randint(-1, 3, (T,), generator=torch.Generator().manual_seed(T), dtype=torch.int32)
    slots = slots.sort().values  # long same-slot runs, as in prefill
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, 48, generator=g)
    y0 = torch.randn(T, 56, generator=g)
    _, y_want = loop_lora(x, y0, a_list, b_list, rank, scale, slots)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    meta = make_lora_meta(dev(slots), block_m=64)
    h = lora_shrink_triton(dev(x), [dev(a) for a in a_list], dev(rank), meta)
    y = dev(y0.clone())
    lora_expand_triton(y, h, [dev(b) for b in b_list], dev(rank), dev(scale), meta)
    torch.testing.assert_close(y.cpu().double(), y_want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU (checked on the GPU run)")
def test_captured_graph_stays_valid_for_any_adapter_mix():
    """Capture shrink+expand once, then replay with other slots (incl. -1) and other ranks."""
    ranks = [16, 7, 64, 1, 3]
    a_list, b_list, rank, scale = make_pool(5, 64, 256, [128, 64], ranks, torch.bfloat16, seed=9)
    a_list, b_list = [a.cuda() for a in a_list], [b.cuda() for b in b_list]
    rank, scale = rank.cuda(), scale.cuda()
    T = 24
    x = torch.randn(T, 256, device="cuda").bfloat16()
    y0 = torch.randn(T, 192, device="cuda").bfloat16()
    y = y0.clone()
    meta = make_lora_meta(torch.zeros(T, dtype=torch.int32, device="cuda"), num_slots=5)

    def step():
        y.copy_(y0)
        h = lora_shrink_triton(x, a_list, rank, meta)
        lora_expand_triton(y, h, b_list, rank, scale, meta)

    step()  # warm-up: compiles and caches the launch tables
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        slots = torch.randint(-1, 5, (T,), generator=gen, dtype=torch.int32)
        if seed == 3:
            slots.fill_(-1)  # no live tile
        if seed == 4:
            slots.fill_(2)  # one adapter: the fewest live tiles
        rank.copy_(torch.randint(1, 65, (5,), generator=gen, dtype=torch.int32))
        meta.copy_(make_lora_meta(slots.cuda(), num_slots=5))
        g.replay()
        _, y_want = loop_lora(x.cpu(), y0.cpu(), [a.cpu() for a in a_list], [b.cpu() for b in b_list],
                              rank.cpu(), scale.cpu(), slots)
        torch.testing.assert_close(y.cpu().double(), y_want, rtol=2e-2, atol=2e-2)


def test_meta_copy_refreshes_in_place_and_rejects_other_sizes():
    static = make_lora_meta(torch.zeros(20, dtype=torch.int32), num_slots=4)
    ptr = static.tile_slot.data_ptr()
    live_ptr = static.num_live_tiles.data_ptr()
    slots = torch.tensor([3, -1, 1, 1, 0] * 4, dtype=torch.int32)
    static.copy_(make_lora_meta(slots, num_slots=4))
    fresh = make_lora_meta(slots, num_slots=4)
    assert static.tile_slot.data_ptr() == ptr and static.num_live_tiles.data_ptr() == live_ptr
    assert torch.equal(static.tile_slot, fresh.tile_slot) and torch.equal(static.sorted_token_ids, fresh.sorted_token_ids)
    assert torch.equal(static.num_live_tiles, fresh.num_live_tiles)
    with pytest.raises(ValueError, match="same T"):
        static.copy_(make_lora_meta(torch.zeros(21, dtype=torch.int32), num_slots=4))


def test_reference_is_differentiable_for_training():
    """engine/training.py backpropagates through the references into the adapter's A and B."""
    a_list, b_list, rank, scale = make_pool(2, 8, 12, [10, 6], [8, 5], torch.float64, seed=3)
    a_list = [a.requires_grad_() for a in a_list]
    b_list = [b.requires_grad_() for b in b_list]
    slots = torch.tensor([1, 0, -1, 1], dtype=torch.int32)
    x = torch.randn(4, 12, dtype=torch.float64)
    meta = make_lora_meta(slots)
    y = torch.randn(4, 16, dtype=torch.float64)
    out = lora_expand_ref(y.clone(), lora_shrink_ref(x, a_list, rank, meta), b_list, rank, scale, meta)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), a_list + b_list)
    # the same function written per token
    _, want = loop_lora(x, y, a_list, b_list, rank, scale, slots)
    want_grads = torch.autograd.grad((want * w).sum(), a_list + b_list)
    for g, gw in zip(grads, want_grads):
        torch.testing.assert_close(g, gw, rtol=1e-5, atol=1e-6)  # h is float32 by contract
    assert grads[0][1, :5].abs().sum() > 0  # slot 1's rows within its rank get gradient


def test_meta_of_wrong_type_is_rejected():
    a_list, _, rank, _ = make_pool(2, 4, 8, [6], [4, 2], torch.float32)
    with pytest.raises(ValueError, match="LoRABatchMeta"):
        lora_shrink_ref(torch.randn(3, 8), a_list, rank, object())


def test_reference_follows_meta_refreshed_in_place():
    """The references cache each meta's slot groups; copy_ must invalidate that cache."""
    a_list, b_list, rank, scale = make_pool(3, 4, 8, [6], [4, 2, 3], torch.float32)
    x = torch.randn(5, 8)
    meta = make_lora_meta(torch.tensor([0, 0, 1, -1, 2], dtype=torch.int32))
    lora_shrink_ref(x, a_list, rank, meta)  # fills the cache
    new_slots = torch.tensor([2, -1, 2, 0, 1], dtype=torch.int32)
    meta.copy_(make_lora_meta(new_slots))
    h = lora_shrink_ref(x, a_list, rank, meta)
    h_want, _ = loop_lora(x, torch.zeros(5, 6), a_list, b_list, rank, scale, new_slots)
    torch.testing.assert_close(h.double(), h_want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixed", "distinct", "one", "none"])
def test_live_rows_match_per_token_loop(kind):
    """The CPU decode path (kernels.lora.LiveRows): one matmul over the pool's live rows, masked per token."""
    from kernels.lora import live_rows, lora_live_rows

    outs = [12, 5, 5]
    a_list, b_list, rank, scale = make_pool(5, 8, 16, outs, [8, 3, 0, 6, 8], torch.float32, seed=7)
    # slot 3 leaves the second slice out (an adapter that does not target that module): no live rows there
    a_list[1][3].zero_()
    b_list[1][3].zero_()
    b_list[0][4].zero_()  # B zero, A not (PEFT's initialisation): the delta is zero, so no rows either
    T = 11
    slots = slot_pattern(kind, T, 5, seed=2)
    x = torch.randn(T, 16)
    y = torch.randn(T, sum(outs))
    meta = make_lora_meta(slots, num_slots=5)
    rows = live_rows(a_list, b_list, rank)
    assert 3 not in rows.row_slots[rows.bounds[1][0]:rows.bounds[1][1]].tolist()
    assert 4 not in rows.row_slots[rows.bounds[0][0]:rows.bounds[0][1]].tolist()
    assert 2 not in rows.key  # rank 0: an empty slot has no rows
    got = y.clone()
    lora_live_rows(x, list(got.split(outs, dim=1)), rows, scale, meta)
    _, want = loop_lora(x, y, a_list, b_list, rank, scale, slots)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_live_rows_masks_follow_meta_refreshed_in_place():
    from kernels.lora import live_rows, lora_live_rows

    a_list, b_list, rank, scale = make_pool(3, 4, 8, [6], [4, 2, 3], torch.float32)
    rows = live_rows(a_list, b_list, rank)
    x, y = torch.randn(5, 8), torch.zeros(5, 6)
    meta = make_lora_meta(torch.tensor([0, 0, 1, -1, 2], dtype=torch.int32))
    lora_live_rows(x, [y.clone()], rows, scale, meta)  # fills the mask cache
    new_slots = torch.tensor([2, -1, 2, 0, 1], dtype=torch.int32)
    meta.copy_(make_lora_meta(new_slots))
    got = y.clone()
    lora_live_rows(x, [got], rows, scale, meta)
    _, want = loop_lora(x, y, a_list, b_list, rank, scale, new_slots)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_triton_expand_uses_nothing_past_each_rank():
    """The expand reads B's rank columns up to the rank rounded up to 8 (whole vectors), counting on the pool's zero
    padding past it; h is read at the exact rank, so even a B and an h full of values past each slot's rank (ranks 1,
    7, 13 and 5 in a pool of 16) give the delta of the true ranks."""
    T, in_f, outs, ranks = 37, 40, [48, 16, 16], [1, 7, 13, 5]
    a_list, b_list, rank, scale = make_pool(4, 16, in_f, outs, ranks, torch.float32, seed=11)
    g = torch.Generator().manual_seed(12)
    slots = slot_pattern("mixed", T, 4)
    x, y = torch.randn(T, in_f, generator=g), torch.randn(T, sum(outs), generator=g)
    h_want, y_want = loop_lora(x, y, a_list, b_list, rank, scale, slots)
    h = h_want.float().clone()
    dirty_b = [b.clone() for b in b_list]
    for s, r in enumerate(ranks):
        h[:, slots == s, r:] = 5.0  # garbage where the shrink writes nothing
        for b in dirty_b:
            b[s, :, r:] = torch.randn(b.shape[1], 16 - r, generator=g) * 10
    meta = make_lora_meta(slots.to(DEVICE), num_slots=4)
    got = y.to(DEVICE).clone()
    lora_expand_triton(got, h.to(DEVICE), [b.to(DEVICE) for b in dirty_b], rank.to(DEVICE), scale.to(DEVICE), meta)
    torch.testing.assert_close(got.cpu().double(), y_want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("short_rows", [0, 4, 64], ids=["tiles", "mixed-paths", "rows"])
@pytest.mark.parametrize("T,in_f,outs,ranks,kind", CASES)
def test_triton_expand_row_and_tile_paths_match_per_token_loop(T, in_f, outs, ranks, kind, short_rows, monkeypatch):
    """Tiles of at most TUNING["expand_short_rows"] tokens go row by row (the delta a reduction over the rank), the
    others through a tile-high dot: each path on its own and side by side give the loop's y, and the same influence
    sums as the tile path."""
    monkeypatch.setitem(lora_mod.TUNING, "expand_short_rows", short_rows)
    num_slots = len(ranks)
    a_list, b_list, rank, scale = make_pool(num_slots, max(ranks), in_f, outs, ranks, torch.float32, seed=3)
    slots = slot_pattern(kind, T, num_slots)
    g = torch.Generator().manual_seed(4)
    x, y0 = torch.randn(T, in_f, generator=g), torch.randn(T, sum(outs), generator=g)
    h_want, y_want = loop_lora(x, y0, a_list, b_list, rank, scale, slots)
    meta = make_lora_meta(slots.to(DEVICE))
    h = h_want.float().to(DEVICE)
    y = y0.to(DEVICE).clone()
    infl = torch.zeros(2, T, device=DEVICE)
    lora_expand_triton(y, h, [b.to(DEVICE) for b in b_list], rank.to(DEVICE), scale.to(DEVICE), meta, influence=infl)
    torch.testing.assert_close(y.cpu().double(), y_want, rtol=1e-4, atol=1e-4)
    monkeypatch.setitem(lora_mod.TUNING, "expand_short_rows", 0)
    y_tiles, infl_tiles = y0.to(DEVICE).clone(), torch.zeros(2, T, device=DEVICE)
    lora_expand_triton(y_tiles, h, [b.to(DEVICE) for b in b_list], rank.to(DEVICE), scale.to(DEVICE), meta,
                       influence=infl_tiles)
    torch.testing.assert_close(y, y_tiles, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(infl, infl_tiles, rtol=1e-5, atol=1e-5)
