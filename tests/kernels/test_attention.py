"""write_kv and paged_attention: the reference and the Triton kernels against per-token loops."""

from __future__ import annotations

import math

import pytest
import torch

from kernels import dispatch
from kernels.attention import paged_attention_ref, paged_attention_triton, write_kv_ref, write_kv_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_batch(q_lens, seq_lens, H, Hkv, D, block_size, num_blocks, dtype, seed=0):
    """Random caches and a random (shuffled, -1 padded) block table for each sequence."""
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    max_blocks = max(-(-s // block_size) for s in seq_lens) + 1
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.full((B, max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, s in enumerate(seq_lens):
        n = -(-s // block_size)
        bt[b, :n] = perm[used : used + n].int()
        used += n
    assert used <= num_blocks
    k_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, Hkv, D, generator=g).to(dtype)
    q = torch.randn(sum(q_lens), H, D, generator=g).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    return q, k_cache, v_cache, bt, torch.tensor(seq_lens, dtype=torch.int32), qsl


def loop_attention(q, k_cache, v_cache, bt, seq_lens, qsl, scale):
    """Per sequence, per new token, per head: softmax over the keys at or before its position, float64."""
    T, H, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(T, H, D, dtype=torch.float64)
    for b in range(seq_lens.shape[0]):
        L = int(seq_lens[b])
        q0, q1 = int(qsl[b]), int(qsl[b + 1])
        blocks = bt[b, : -(-L // bs)].long()
        k = k_cache[blocks].reshape(-1, Hkv, D)[:L].double()
        v = v_cache[blocks].reshape(-1, Hkv, D)[:L].double()
        for j in range(q1 - q0):
            pos = L - (q1 - q0) + j
            for h in range(H):
                kh = h // (H // Hkv)
                s = (k[: pos + 1, kh] @ q[q0 + j, h].double()) * scale
                out[q0 + j, h] = torch.softmax(s, 0) @ v[: pos + 1, kh]
    return out


IMPLS = {"ref": paged_attention_ref, "triton": paged_attention_triton}

# (q_lens, seq_lens, H, Hkv, D, block_size)
CASES = [
    pytest.param([1], [1], 4, 2, 16, 4, id="decode-first-token"),
    pytest.param([1, 1, 1], [5, 17, 33], 8, 2, 32, 8, id="decode-gqa4"),
    pytest.param([3, 1, 7], [3, 12, 20], 6, 2, 24, 4, id="mixed-prefill-chunked-decode-odd-D"),
    pytest.param([9], [9], 4, 4, 16, 16, id="prefill-mha"),
    pytest.param([5, 2], [21, 40], 9, 3, 16, 16, id="prefix-shared-gqa3"),
]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("q_lens,seq_lens,H,Hkv,D,bs", CASES)
def test_paged_attention_matches_loop(impl, q_lens, seq_lens, H, Hkv, D, bs):
    q, kc, vc, bt, sl, qsl = make_batch(q_lens, seq_lens, H, Hkv, D, bs, 64, torch.float32)
    scale = 1 / math.sqrt(D)
    want = loop_attention(q, kc, vc, bt, sl, qsl, scale)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    got = IMPLS[impl](dev(q), dev(kc), dev(vc), dev(bt), dev(sl), dev(qsl), scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16/long-context kernels are checked on the GPU run")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_attention_low_precision_long_context(dtype):
    q_lens, seq_lens = [1] * 5 + [129, 64], [1, 1000, 513, 77, 2048, 129, 700]
    q, kc, vc, bt, sl, qsl = make_batch(q_lens, seq_lens, 32, 8, 128, 16, 512, dtype)
    want = loop_attention(q, kc, vc, bt, sl, qsl, 128**-0.5)
    got = paged_attention_triton(q.cuda(), kc.cuda(), vc.cuda(), bt.cuda(), sl.cuda(), qsl.cuda(), 128**-0.5)
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_write_kv_scatters_rows_and_skips_padding(impl):
    g = torch.Generator().manual_seed(3)
    kc = torch.randn(6, 4, 2, 8, generator=g)
    vc = torch.randn(6, 4, 2, 8, generator=g)
    k = torch.randn(5, 2, 8, generator=g)
    v = torch.randn(5, 2, 8, generator=g)
    slots = torch.tensor([23, 0, -1, 9, 5], dtype=torch.int64)
    want_k, want_v = kc.clone(), vc.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k[s // 4, s % 4] = k[t]
            want_v[s // 4, s % 4] = v[t]
    fn = write_kv_ref if impl == "ref" else write_kv_triton
    dkc, dvc = kc.to(DEVICE), vc.to(DEVICE)
    fn(k.to(DEVICE), v.to(DEVICE), dkc, dvc, slots.to(DEVICE))
    assert torch.equal(dkc.cpu(), want_k) and torch.equal(dvc.cpu(), want_v)


def test_bad_attention_inputs_raise_value_error():
    q, kc, vc, bt, sl, qsl = make_batch([2], [4], 4, 2, 16, 4, 4, torch.float32)
    with pytest.raises(ValueError, match="q must be"):
        paged_attention_ref(q[:, :, :8], kc, vc, bt, sl, qsl, 0.25)
    with pytest.raises(ValueError, match="multiple"):
        paged_attention_ref(q[:, :3], kc, vc, bt, sl, qsl, 0.25)
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_attention_ref(q, kc, vc, bt, sl, qsl[:1], 0.25)
    with pytest.raises(ValueError, match="dtype|is torch"):
        paged_attention_ref(q.double(), kc, vc, bt, sl, qsl, 0.25)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_ref(q[:, :2], q[:, :2], kc, vc, torch.zeros(3, dtype=torch.int64))


def test_dispatch_attention_and_write_roundtrip():
    """write_kv then paged_attention through the dispatcher equals attention over the raw K/V."""
    H, Hkv, D, bs = 4, 2, 16, 4
    g = torch.Generator().manual_seed(7)
    kc = torch.zeros(8, bs, Hkv, D).to(DEVICE)
    vc = torch.zeros(8, bs, Hkv, D).to(DEVICE)
    k = torch.randn(6, Hkv, D, generator=g)
    v = torch.randn(6, Hkv, D, generator=g)
    q = torch.randn(6, H, D, generator=g)
    bt = torch.tensor([[5, 2, -1]], dtype=torch.int32)
    slots = torch.tensor([5 * bs + i for i in range(4)] + [2 * bs, 2 * bs + 1], dtype=torch.int64)
    dispatch.write_kv(k.to(DEVICE), v.to(DEVICE), kc, vc, slots.to(DEVICE))
    qsl = torch.tensor([0, 6], dtype=torch.int32)
    sl = torch.tensor([6], dtype=torch.int32)
    got = dispatch.paged_attention(q.to(DEVICE), kc, vc, bt.to(DEVICE), sl.to(DEVICE), qsl.to(DEVICE), 0.25)
    kk = k.repeat_interleave(2, dim=1).transpose(0, 1)
    vv = v.repeat_interleave(2, dim=1).transpose(0, 1)
    want = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, is_causal=True, scale=0.25)
    torch.testing.assert_close(got.cpu(), want.transpose(0, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU (checked on the GPU run)")
def test_captured_decode_attention_follows_new_lengths_and_tables():
    q, kc, vc, bt, sl, qsl = make_batch([1, 1, 1, 1], [40, 40, 40, 40], 8, 2, 64, 16, 64, torch.bfloat16)
    q, kc, vc, bt, sl, qsl = (t.cuda() for t in (q, kc, vc, bt, sl, qsl))
    out = torch.empty_like(q)

    def step():
        out.copy_(paged_attention_triton(q, kc, vc, bt, sl, qsl, 0.125, max_query_len=1))

    step()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    sl.copy_(torch.tensor([1, 17, 33, 48], dtype=torch.int32))
    bt.copy_(bt.flip(0))
    g.replay()
    want = loop_attention(q.cpu(), kc.cpu(), vc.cpu(), bt.cpu(), sl.cpu(), qsl.cpu(), 0.125)
    torch.testing.assert_close(out.cpu().double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_triton_decode_with_key_splits_matches_loop(num_splits):
    """Flash-decoding: keys split over programs, partials merged; short sequences leave splits empty."""
    q, kc, vc, bt, sl, qsl = make_batch([1, 1, 1], [3, 70, 33], 8, 2, 16, 8, 64, torch.float32, seed=4)
    want = loop_attention(q, kc, vc, bt, sl, qsl, 0.3)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    got = paged_attention_triton(dev(q), dev(kc), dev(vc), dev(bt), dev(sl), dev(qsl), 0.3,
                                 max_query_len=1, num_splits=num_splits, block_n=16)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)


def test_reference_attention_is_differentiable_for_training():
    q, kc, vc, bt, sl, qsl = make_batch([3, 1], [3, 9], 4, 2, 8, 4, 8, torch.float64, seed=2)
    q.requires_grad_()
    kc.requires_grad_()
    out = paged_attention_ref(q, kc, vc, bt, sl, qsl, 0.4)
    w = torch.randn_like(out)
    gq, gk = torch.autograd.grad((out * w).sum(), [q, kc])
    want = loop_attention(q, kc, vc, bt, sl, qsl, 0.4)
    wq, wk = torch.autograd.grad((want * w).sum(), [q, kc])
    torch.testing.assert_close(gq, wq)
    torch.testing.assert_close(gk, wk)
    assert gq.abs().sum() > 0


@pytest.mark.parametrize("seq_lens", [[5, 33, 17, 1], [16, 16, 16], [1]], ids=["ragged", "equal", "one"])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (6, 2)])
def test_decode_plan_matches_reference(seq_lens, H, Hkv):
    """The CPU decode path (one plan per step for all layers) gives paged_attention_ref's result."""
    from kernels.attention import decode_plan, paged_decode_ref

    q, kc, vc, bt, sl, qsl = make_batch([1] * len(seq_lens), seq_lens, H, Hkv, 16, 8, 40, torch.float32)
    plan = decode_plan(bt, sl, q.shape[0], 8)
    assert (plan.mask is None) == (len(set(seq_lens)) == 1)
    got = paged_decode_ref(q, kc, vc, plan, 0.3)
    torch.testing.assert_close(got, paged_attention_ref(q, kc, vc, bt, sl, qsl, 0.3), rtol=1e-5, atol=1e-6)


def test_decode_plan_is_none_unless_every_sequence_has_one_query():
    from kernels.attention import decode_plan

    q, kc, vc, bt, sl, qsl = make_batch([1, 3], [9, 12], 4, 2, 16, 8, 20, torch.float32)
    assert decode_plan(bt, sl, q.shape[0], 8) is None
