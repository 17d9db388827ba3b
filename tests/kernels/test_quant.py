"""4-bit group-wise quantization and the dequantizing matmul."""

from __future__ import annotations

import pytest
import torch

from kernels.quant import dequantize, quant_matmul, quant_matmul_ref, quant_matmul_triton, quantize_linear_weight

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("N,K,G", [(576, 576, 64), (7, 96, 32), (130, 256, 128)])
def test_quantize_roundtrip_error_within_half_a_step(N, K, G):
    g = torch.Generator().manual_seed(N)
    w = torch.randn(N, K, generator=g) * 0.05 + 0.01
    qw = quantize_linear_weight(w, G)
    assert qw.qweight.shape == (N, K // 2) and qw.qweight.dtype == torch.uint8
    assert qw.scales.shape == qw.zeros.shape == (N, K // G)
    # 4 bits a weight plus one scale and one zero per group
    assert qw.nbytes == N * K // 2 + 2 * N * (K // G) * w.element_size()
    err = (dequantize(qw) - w).abs().view(N, K // G, G)
    step = qw.scales[..., None]
    assert bool((err <= step * 0.5 + 1e-6).all())
    # the codes use the whole 0..15 range somewhere (not degenerate)
    codes = torch.cat([qw.qweight & 0xF, qw.qweight >> 4])
    assert int(codes.max()) == 15 and int(codes.min()) == 0


def test_packing_order_is_low_nibble_first():
    w = torch.arange(32, dtype=torch.float32).view(1, 32)  # one group, scale 31/15
    qw = quantize_linear_weight(w, 32)
    q = torch.stack([qw.qweight & 0xF, qw.qweight >> 4], dim=2).view(1, 32)
    assert torch.equal(q, torch.sort(q, dim=1).values)  # monotone in k: nibbles in k order


IMPLS = {"ref": quant_matmul_ref, "triton": quant_matmul_triton}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("M,N,K,G", [(1, 576, 576, 64), (3, 40, 128, 32), (129, 72, 192, 64)])
def test_quant_matmul_matches_float64_product(impl, M, N, K, G):
    g = torch.Generator().manual_seed(M + N)
    w = torch.randn(N, K, generator=g) * 0.05
    x = torch.randn(M, K, generator=g)
    qw = quantize_linear_weight(w, G)
    want = x.double() @ dequantize(qw).double().T
    qd = type(qw)(qw.qweight.to(DEVICE), qw.scales.to(DEVICE), qw.zeros.to(DEVICE), qw.group_size, qw.shape)
    got = IMPLS[impl](x.to(DEVICE), qd)
    assert got.shape == (M, N)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 tensor-core path is checked on the GPU run")
def test_quant_matmul_bf16_llama_shapes():
    w = (torch.randn(1024, 4096) * 0.02).bfloat16()
    qw = quantize_linear_weight(w.cuda(), 128)
    for M in (1, 32, 300):
        x = torch.randn(M, 4096).bfloat16()
        want = x.double() @ dequantize(qw).cpu().double().T
        got = quant_matmul(x.cuda(), qw)
        rel = (got.cpu().double() - want).norm() / want.norm()
        assert rel < 1e-2, rel


def test_quant_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="divide"):
        quantize_linear_weight(torch.randn(4, 100), 64)
    with pytest.raises(ValueError, match="N, K"):
        quantize_linear_weight(torch.randn(4), 2)
    qw = quantize_linear_weight(torch.randn(4, 64), 32)
    with pytest.raises(ValueError, match="features"):
        quant_matmul_ref(torch.randn(2, 32), qw)
    with pytest.raises(ValueError, match="dtype|scales"):
        quant_matmul_ref(torch.randn(2, 64, dtype=torch.float64), qw)


@pytest.mark.parametrize("split_k,block_n", [(3, 16), (1, 32)])
def test_quant_matmul_split_k_matches_float64_product(split_k, block_n):
    g = torch.Generator().manual_seed(11)
    w = torch.randn(24, 192, generator=g) * 0.05
    x = torch.randn(5, 192, generator=g)
    qw = quantize_linear_weight(w, 32)
    want = x.double() @ dequantize(qw).double().T
    qd = type(qw)(qw.qweight.to(DEVICE), qw.scales.to(DEVICE), qw.zeros.to(DEVICE), qw.group_size, qw.shape)
    got = quant_matmul_triton(x.to(DEVICE), qd, split_k=split_k, block_n=block_n, block_k=32)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)
