"""add_rmsnorm, silu_mul and rope_write_kv: the Triton kernels against their references, the references
against float64 and against the engine's torch code they stand for.

bf16 results equal the reference bit for bit where the math is elementwise (rope, silu) and within one
bf16 ulp for the norm, whose sum is taken in another order. On CUDA, silu may also differ by one ulp:
Triton's float32 exp is the fast hardware one, torch's is libm-accurate.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers.rmsnorm import RMSNorm
from engine.layers.rotary import apply_rotary
from kernels import dispatch
from kernels.elementwise import (add_rmsnorm_ref, add_rmsnorm_triton, rope_write_kv_ref, rope_write_kv_triton,
                                 silu_mul_ref, silu_mul_triton)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float32]


def rand(*shape, dtype, seed, scale=1.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def assert_within_one_ulp(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16: at most one unit in the last place apart (8 significant bits)."""
    got, want = got.double().cpu(), want.double().cpu()
    big = torch.maximum(got.abs(), want.abs()).clamp_min(1e-30)
    ulp = torch.exp2(torch.floor(torch.log2(big)) - 7)
    assert bool(((got - want).abs() <= ulp).all()), f"max error {(got - want).abs().max().item()}"


def assert_matches(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    """float32 to 1e-6. Low precision: equal when `exact`, else at most one ulp apart in at most one value
    in a thousand (what a sum taken in another order flips; a missed rounding step flips far more)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        return
    differ = int((got != want).sum())
    if exact:
        assert differ == 0, f"{differ} of {want.numel()} values differ"
    else:
        assert_within_one_ulp(got, want)
        assert differ <= max(1, want.numel() // 1000), f"{differ} of {want.numel()} values differ"


# --------------------------------------------------------------------------------------------------
# add_rmsnorm
# --------------------------------------------------------------------------------------------------


def norm_inputs(T, N, dtype, residual: bool, seed=0):
    x = rand(T, N, dtype=dtype, seed=seed, scale=2.0)
    r = rand(T, N, dtype=dtype, seed=seed + 1) if residual else None
    w = (1.0 + 0.5 * rand(N, dtype=torch.float32, seed=seed + 2)).to(dtype)
    return x, r, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N", [7, 64, 576])
@pytest.mark.parametrize("T", [1, 3, 129])
@pytest.mark.parametrize("residual", [False, True])
def test_add_rmsnorm_kernel_matches_the_reference(dtype, N, T, residual):
    x, r, w = norm_inputs(T, N, dtype, residual)
    got, want = add_rmsnorm_triton(x, r, w, 1e-5), add_rmsnorm_ref(x, r, w, 1e-5)
    if residual:
        (got, got_res), (want, want_res) = got, want
        assert torch.equal(got_res, want_res)  # x + residual, rounded to dtype as torch's add does
    assert_matches(got, want, exact=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rmsnorm_kernel_adds_eps_where_it_matters(dtype):
    # mean square ~1e-6 next to eps 1e-5: eps sets most of the scale
    x = rand(3, 64, dtype=dtype, seed=7, scale=1e-3)
    w = rand(64, dtype=dtype, seed=8)
    assert_matches(add_rmsnorm_triton(x, None, w, 1e-5), add_rmsnorm_ref(x, None, w, 1e-5), exact=False)


def test_add_rmsnorm_reads_row_strided_views():
    base = rand(5, 600, dtype=torch.bfloat16, seed=3)
    x, r = base[:, :576], base[:, 8:584]  # row stride 600, not contiguous
    w = rand(576, dtype=torch.bfloat16, seed=4)
    (got, got_res), (want, want_res) = add_rmsnorm_triton(x, r, w, 1e-6), add_rmsnorm_ref(x, r, w, 1e-6)
    assert torch.equal(got_res, want_res)
    assert_matches(got, want, exact=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_add_rmsnorm_reference_is_the_layers_torch_path(dtype, residual, monkeypatch):
    monkeypatch.setenv("OPENLORA_KERNELS", "torch")
    x, r, w = norm_inputs(4, 576, dtype, residual, seed=5)
    layer = RMSNorm(576, 1e-5).to(dtype).to(DEVICE)
    with torch.no_grad():
        layer.weight.copy_(w)
        got = layer(x) if r is None else layer(x, r)
    want = add_rmsnorm_ref(x, r, w, 1e-5)
    for a, b in zip(got if residual else [got], want if residual else [want]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rmsnorm_reference_against_float64(dtype):
    x, r, w = norm_inputs(3, 576, dtype, True, seed=6)
    out, new_res = add_rmsnorm_ref(x, r, w, 1e-5)
    h = x.double() + r.double()
    want = w.double() * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: the sum, h and the product each rounded
    torch.testing.assert_close(new_res.double(), h, rtol=tol, atol=0)
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)


# --------------------------------------------------------------------------------------------------
# silu_mul
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [7, 576])
@pytest.mark.parametrize("T", [1, 3, 129])
def test_silu_mul_kernel_matches_the_reference(dtype, inter, T):
    gate_up = rand(T, 2 * inter, dtype=dtype, seed=inter + T, scale=3.0)
    got, want = silu_mul_triton(gate_up), silu_mul_ref(gate_up)
    assert_matches(got, want, exact=not gate_up.is_cuda)


def test_silu_mul_reads_a_row_strided_view():
    gate_up = rand(4, 1200, dtype=torch.bfloat16, seed=8, scale=3.0)[:, :1152]
    assert_matches(silu_mul_triton(gate_up), silu_mul_ref(gate_up), exact=not gate_up.is_cuda)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_reference_against_float64(dtype):
    gate_up = rand(3, 2 * 576, dtype=dtype, seed=9, scale=3.0)
    g, u = gate_up.double().chunk(2, dim=-1)
    want = g / (1 + torch.exp(-g)) * u
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(silu_mul_ref(gate_up).double(), want, rtol=tol, atol=tol)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(silu_mul_ref(gate_up), F.silu(gate) * up)  # LlamaMLP's torch path


# --------------------------------------------------------------------------------------------------
# rope_write_kv
# --------------------------------------------------------------------------------------------------


def rope_inputs(T, H, Hkv, D, dtype, seed=0, num_blocks=6, block_size=4, padded=(1,)):
    """qkv as a row-strided view, real rotary tables for random positions, random caches and shuffled
    slots (the tokens in `padded` get slot -1)."""
    width = (H + 2 * Hkv) * D
    qkv = rand(T, width + 24, dtype=dtype, seed=seed)[:, 8:8 + width]
    g = torch.Generator().manual_seed(seed + 1)
    pos = torch.randint(0, 500, (T,), generator=g)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(pos.float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (t.to(dtype).unsqueeze(1).to(DEVICE) for t in (emb.cos(), emb.sin()))
    k_cache = rand(num_blocks, block_size, Hkv, D, dtype=dtype, seed=seed + 2)
    v_cache = rand(num_blocks, block_size, Hkv, D, dtype=dtype, seed=seed + 3)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T]
    slots[[i for i in padded if i < T]] = -1
    return qkv, cos, sin, k_cache, v_cache, slots.to(DEVICE)


ROPE_CASES = [
    pytest.param(1, 4, 2, 8, id="decode-T1-gqa2-d8"),
    pytest.param(3, 4, 2, 16, id="T3-gqa2-d16"),
    pytest.param(5, 3, 1, 64, id="T5-gqa3-d64"),
    pytest.param(129, 4, 2, 16, id="T129-gqa2-d16"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, Hkv, D", ROPE_CASES)
def test_rope_write_kv_kernel_matches_the_reference(dtype, T, H, Hkv, D):
    nb = max(6, -(-T // 4) + 2)
    qkv, cos, sin, kc, vc, slots = rope_inputs(T, H, Hkv, D, dtype, seed=T + D, num_blocks=nb,
                                               padded=(0, 2) if T > 2 else ())
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q = rope_write_kv_triton(qkv, cos, sin, kc, vc, slots, H, Hkv, D)
    q_ref = rope_write_kv_ref(qkv, cos, sin, kc_ref, vc_ref, slots, H, Hkv, D)
    assert q.is_contiguous() and q.shape == (T, H, D)
    assert_matches(q, q_ref, exact=True)
    assert_matches(kc, kc_ref, exact=True)
    assert torch.equal(vc, vc_ref)  # v is copied, never computed


def test_rope_write_kv_leaves_padding_slots_untouched():
    T, H, Hkv, D = 4, 4, 2, 16
    qkv, cos, sin, kc, vc, slots = rope_inputs(T, H, Hkv, D, torch.bfloat16, seed=11, padded=(1, 3))
    before_k, before_v = kc.clone(), vc.clone()
    rope_write_kv_triton(qkv, cos, sin, kc, vc, slots, H, Hkv, D)
    written = torch.zeros(kc.shape[0] * kc.shape[1], dtype=torch.bool)
    written[slots[slots >= 0].cpu()] = True
    assert torch.equal(kc.view(-1, Hkv, D)[~written.to(DEVICE)], before_k.view(-1, Hkv, D)[~written.to(DEVICE)])
    assert torch.equal(vc.view(-1, Hkv, D)[~written.to(DEVICE)], before_v.view(-1, Hkv, D)[~written.to(DEVICE)])
    assert not torch.equal(kc, before_k)  # the two real tokens were written


def test_rope_write_kv_takes_two_dimensional_tables():
    T, H, Hkv, D = 3, 4, 2, 16
    qkv, cos, sin, kc, vc, slots = rope_inputs(T, H, Hkv, D, torch.bfloat16, seed=12)
    kc2, vc2 = kc.clone(), vc.clone()
    q = rope_write_kv_triton(qkv, cos[:, 0], sin[:, 0], kc, vc, slots, H, Hkv, D)
    q2 = rope_write_kv_triton(qkv, cos, sin, kc2, vc2, slots, H, Hkv, D)
    assert torch.equal(q, q2) and torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_write_kv_reference_against_float64_and_apply_rotary(dtype):
    T, H, Hkv, D = 5, 3, 1, 16
    qkv, cos, sin, kc, vc, slots = rope_inputs(T, H, Hkv, D, dtype, seed=13, padded=(2,))
    kc_before = kc.clone()
    q = rope_write_kv_ref(qkv, cos, sin, kc, vc, slots, H, Hkv, D)

    # the engine's torch path: one apply_rotary over the q and k heads
    heads = qkv[:, :(H + Hkv) * D].view(T, H + Hkv, D)
    rotated = apply_rotary(heads, cos, sin)
    assert torch.equal(q, rotated[:, :H])

    # float64, token by token
    x, c, s = heads.double(), cos.double(), sin.double()
    want = x * c + torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1) * s
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(q.double(), want[:, :H], rtol=tol, atol=tol)
    for t in range(T):
        slot = int(slots[t])
        if slot < 0:
            continue
        blk, off = divmod(slot, kc.shape[1])
        torch.testing.assert_close(kc[blk, off].double(), want[t, H:], rtol=tol, atol=tol)
        assert torch.equal(vc[blk, off], qkv[t, (H + Hkv) * D:].view(Hkv, D))
    untouched = [s for s in range(kc.shape[0] * kc.shape[1]) if s not in set(slots.tolist())]
    assert torch.equal(kc.view(-1, Hkv, D)[untouched], kc_before.view(-1, Hkv, D)[untouched])


def test_bad_rope_inputs_raise_value_error():
    qkv, cos, sin, kc, vc, slots = rope_inputs(3, 4, 2, 16, torch.bfloat16, seed=14)
    with pytest.raises(ValueError, match="qkv"):
        rope_write_kv_ref(qkv[:, :-16], cos, sin, kc, vc, slots, 4, 2, 16)
    with pytest.raises(ValueError, match="dtype"):
        rope_write_kv_triton(qkv, cos.float(), sin.float(), kc, vc, slots, 4, 2, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        rope_write_kv_triton(qkv, cos, sin, kc, vc, slots[:2], 4, 2, 16)


# --------------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_dispatch_routes_all_three(mode, monkeypatch):
    monkeypatch.setenv("OPENLORA_KERNELS", mode)
    x, r, w = norm_inputs(3, 64, torch.bfloat16, True, seed=15)
    out, res = dispatch.add_rmsnorm(x, r, w, 1e-5)
    assert_within_one_ulp(out, add_rmsnorm_ref(x, r, w, 1e-5)[0])
    assert torch.equal(res, x + r)
    gate_up = rand(3, 14, dtype=torch.bfloat16, seed=16)
    assert_matches(dispatch.silu_mul(gate_up), silu_mul_ref(gate_up), exact=not gate_up.is_cuda)
    qkv, cos, sin, kc, vc, slots = rope_inputs(3, 4, 2, 8, torch.bfloat16, seed=17)
    kc2, vc2 = kc.clone(), vc.clone()
    q = dispatch.rope_write_kv(qkv, cos, sin, kc, vc, slots, 4, 2, 8)
    assert torch.equal(q, rope_write_kv_ref(qkv, cos, sin, kc2, vc2, slots, 4, 2, 8))
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)
