"""Native CPU kernels (kernels/native_cpu.py) against float64 torch: the packed matmul at odd sizes and the
per-token LoRA over live rows, with and without influence norms. CPU only (it is a CPU kernel)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kernels import native_cpu
from kernels.lora import live_rows, make_lora_meta
from tests.kernels.test_lora import make_pool

pytestmark = pytest.mark.skipif(not native_cpu.available(), reason="no C++ compiler on this machine")


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("m", [1, 3, 7, 8, 9, 16, 17])
@pytest.mark.parametrize("n,k", [(48, 64), (1, 5), (97, 33), (576, 576), (200, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_matches_float64(m, n, k, bias):
    w, x = _rand(n, k, seed=1), _rand(m, k, seed=2)
    b = _rand(n, seed=3) if bias else None
    got = native_cpu.gemm(x, native_cpu.pack(w), b)
    want = x.double() @ w.double().T + (b.double() if bias else 0)
    assert got.shape == (m, n)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4 * k**0.5)


def test_gemm_reads_strided_inputs_and_a_column_major_weight():
    w = _rand(130, 70, seed=4).t().contiguous().t()  # strides (1, 130)
    x = _rand(5, 140, seed=5)[:, ::2]  # row stride 140, column stride 2
    got = native_cpu.gemm(x, native_cpu.pack(w))
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4)


def test_gemm_is_the_same_on_several_threads():
    w, x = _rand(1000, 96, seed=6), _rand(6, 96, seed=7)
    pw = native_cpu.pack(w)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_cpu.gemm(x, pw)
        torch.set_num_threads(2)
        two = native_cpu.gemm(x, pw)
    finally:
        torch.set_num_threads(prev)
    assert torch.equal(one, two)  # each output column is summed in the same order whatever the split


def _reference(x, y, a_list, b_list, ranks, scale, slots, cols):
    """float64 per-token loop: y[t, slice] += scale[s] * B_s A_s x_t; returns (y, |delta| / |y| per token)."""
    y = y.double().clone()
    ratio = torch.zeros(x.shape[0], dtype=torch.float64)
    for t, s in enumerate(slots):
        if s < 0:
            continue
        r = ranks[s]
        base = y[t].norm().clamp_min(1e-6)
        d2 = 0.0
        for a, b, c in zip(a_list, b_list, cols):
            d = scale[s].double() * (b[s, :, :r].double() @ (a[s, :r].double() @ x[t].double()))
            y[t, c:c + d.shape[0]] += d
            d2 += float(d.square().sum())
        ratio[t] = d2**0.5 / base
    return y, ratio


@pytest.mark.parametrize("influence", [False, True])
@pytest.mark.parametrize("slots", [[0, 2, -1, 1, 2, 0, 3], [-1, -1, -1], [3], [2, 2, 2, 2, 2, 2, 2, 2, 2]])
def test_lora_matches_a_per_token_loop(influence, slots):
    ranks = [1, 7, 16, 0]  # slot 3 is empty: its tokens get nothing
    outs, in_f = [40, 17, 33], 29
    a_list, b_list, rank, scale = make_pool(4, 16, in_f, outs, ranks, torch.float32)
    x, y0 = _rand(len(slots), in_f, seed=8), _rand(len(slots), sum(outs) + 5, seed=9)
    cols = [0, 40, 62]  # the middle slice leaves a gap of 5 columns no adapter touches
    rows = native_cpu.native_rows(live_rows(a_list, b_list, rank), cols)
    meta = make_lora_meta(torch.tensor(slots, dtype=torch.int32), 4)
    y = y0.clone()
    infl = torch.full((len(slots),), 0.25) if influence else None
    native_cpu.lora(x, y, rows, meta.token_slots, scale, infl)
    want, ratio = _reference(x, y0, a_list, b_list, ranks, scale, slots, cols)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    if influence:
        torch.testing.assert_close(infl.double(), ratio + 0.25, rtol=1e-5, atol=1e-6)


def test_lora_rejects_mismatched_inputs():
    a_list, b_list, rank, scale = make_pool(2, 4, 8, [8], [4, 4], torch.float32)
    rows = native_cpu.native_rows(live_rows(a_list, b_list, rank), [0])
    x, y = _rand(3, 8, seed=1), _rand(3, 8, seed=2)
    with pytest.raises(AssertionError):
        native_cpu.lora(x, y, rows, torch.tensor([0, 1], dtype=torch.int32), scale)  # 2 slots for 3 tokens
    with pytest.raises(AssertionError):
        native_cpu.lora(x, y, rows, torch.tensor([0, 1, 0]), scale)  # int64 slots


def test_disabled_by_environment_and_built_once_per_cache_key(tmp_path):
    code = ("from kernels import native_cpu; import sys; "
            "sys.stdout.write(str(native_cpu.load() is None))")
    root = os.path.dirname(os.path.dirname(native_cpu.__file__))
    env = {**os.environ, "OPENLORA_NATIVE_CPU": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout == "True"
    # a fresh cache directory gets one build, named by its key; a second process loads it, builds nothing
    env = {**os.environ, "OPENLORA_NATIVE_CACHE": str(tmp_path)}
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                             cwd=root)
        assert out.stdout == "False"
        built = [p.name for p in tmp_path.iterdir()]
        assert len(built) == 1 and built[0].startswith("cpu_decode-") and built[0].endswith(".so")


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 4, 24), (8, 2, 128), (2, 1, 8)])
def test_decode_attention_matches_torch(heads, kv_heads, d):
    """RoPE, the KV write at each token's slot and attention over a paged context, against float64 torch:
    contexts of 1 to 70 tokens over shuffled blocks of 16, and a padding token (slot -1) that writes nothing."""
    bs, nblocks, lens = 16, 40, [1, 17, 70, 33, 5]
    T = len(lens)
    g = torch.Generator().manual_seed(11)
    kc, vc = torch.randn(nblocks, bs, kv_heads, d, generator=g), torch.randn(nblocks, bs, kv_heads, d, generator=g)
    perm = torch.randperm(nblocks, generator=g)
    tables = torch.full((T, 6), -1, dtype=torch.int32)
    used = 0
    for t, n in enumerate(lens):
        nb = -(-n // bs)
        tables[t, :nb] = perm[used:used + nb].to(torch.int32)
        used += nb
    slots = torch.tensor([int(tables[t, (n - 1) // bs]) * bs + (n - 1) % bs for t, n in enumerate(lens)])
    slots[3] = -1  # padding: its key and value stay as they are; it attends over what is there
    qkv = torch.randn(T, (heads + 2 * kv_heads) * d, generator=g)
    pos = torch.tensor(lens) - 1
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).double() / d)
    ang = pos.double()[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    k_ref, v_ref = kc.double().clone(), vc.double().clone()
    q = _rotate(qkv[:, :heads * d].double().view(T, heads, d), cos[:, None], sin[:, None])
    k_new = _rotate(qkv[:, heads * d:(heads + kv_heads) * d].double().view(T, kv_heads, d), cos[:, None], sin[:, None])
    v_new = qkv[:, (heads + kv_heads) * d:].double().view(T, kv_heads, d)
    for t in range(T):
        if slots[t] >= 0:
            k_ref.view(-1, kv_heads, d)[slots[t]] = k_new[t]
            v_ref.view(-1, kv_heads, d)[slots[t]] = v_new[t]
    want = torch.empty(T, heads, d, dtype=torch.float64)
    for t, n in enumerate(lens):
        idx = torch.tensor([int(tables[t, i // bs]) * bs + i % bs for i in range(n)])
        keys, vals = k_ref.view(-1, kv_heads, d)[idx], v_ref.view(-1, kv_heads, d)[idx]  # [n, kv, d]
        for h in range(heads):
            kvh = h // (heads // kv_heads)
            p = torch.softmax(keys[:, kvh] @ q[t, h] * d**-0.5, dim=0)
            want[t, h] = p @ vals[:, kvh]
    got = native_cpu.decode_attention(qkv, cos.float(), sin.float(), kc, vc, slots, tables,
                                      torch.tensor(lens, dtype=torch.int32), heads, d**-0.5)
    torch.testing.assert_close(got.double().view(T, heads, d), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc.double(), k_ref, rtol=1e-6, atol=1e-6)  # written where asked, nowhere else
    torch.testing.assert_close(vc.double(), v_ref, rtol=0, atol=0)
