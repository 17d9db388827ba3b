"""The CPU decode fast paths give the references' results and follow the adapter pool as it changes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.context import Context, reset_context, set_context
from engine.layers.linear import LoRALinear
from kernels.lora import make_lora_meta


def make_pool(num_slots=4, max_rank=8, in_f=16, outs=(12, 6, 6), modules=("q_proj", "k_proj", "v_proj"), seed=0):
    """A slot pool as engine.adapters lays it out: one stacked tensor per module, per-layer views of it."""
    g = torch.Generator().manual_seed(seed)
    pool = SimpleNamespace(lora_a={}, lora_b={}, a_stack={}, b_stack={})
    for m, out_f in zip(modules, outs):
        pool.a_stack[m] = torch.randn(1, num_slots, max_rank, in_f, generator=g) * 0.3
        pool.b_stack[m] = torch.randn(1, num_slots, out_f, max_rank, generator=g) * 0.3
        pool.lora_a[m] = list(pool.a_stack[m].unbind(0))
        pool.lora_b[m] = list(pool.b_stack[m].unbind(0))
    pool.rank = torch.tensor([max_rank, 3, 0, max_rank][:num_slots], dtype=torch.int32)
    pool.scale = torch.rand(num_slots, generator=g) + 0.5
    for m in modules:  # zero past each slot's rank, as the pool keeps it
        for s, r in enumerate(pool.rank.tolist()):
            pool.a_stack[m][:, s, r:] = 0
            pool.b_stack[m][:, s, :, r:] = 0
    return pool


def run(layer, x, pool, slots, reference: bool, influence: bool = False):
    ctx = Context(lora_meta=make_lora_meta(slots, num_slots=pool.rank.shape[0]), lora_pool=pool)
    if influence:
        ctx.influence_sum = torch.zeros(x.shape[0])
    set_context(ctx)
    try:
        # grad enabled sends LoRALinear to the references (as training does); inference takes the live rows
        with torch.enable_grad() if reference else torch.inference_mode():
            y = layer(x).detach()
    finally:
        reset_context()
    return y, ctx.influence_sum


def make_layer(in_f=16, outs=(12, 6, 6), modules=("q_proj", "k_proj", "v_proj")):
    torch.manual_seed(0)
    layer = LoRALinear(in_f, list(outs), list(modules), layer_idx=0)
    torch.nn.init.normal_(layer.weight)
    return layer


@pytest.mark.parametrize("influence", [False, True])
def test_live_rows_path_matches_references(influence):
    layer, pool = make_layer(), make_pool()
    x = torch.randn(7, 16)
    slots = torch.tensor([0, 1, -1, 3, 0, 2, 1], dtype=torch.int32)
    got, g_inf = run(layer, x, pool, slots, reference=False, influence=influence)
    want, w_inf = run(layer, x, pool, slots, reference=True, influence=influence)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if influence:
        torch.testing.assert_close(g_inf, w_inf, rtol=1e-5, atol=1e-6)


def test_live_rows_follow_an_adapter_written_into_the_pool():
    """A load writes the pool in place: the layer's gathered rows must not serve the old adapter."""
    layer, pool = make_layer(), make_pool()
    x = torch.randn(4, 16)
    slots = torch.tensor([1, 1, 0, 2], dtype=torch.int32)
    run(layer, x, pool, slots, reference=False)  # gathers the rows
    with torch.no_grad():  # slot 2 (rank 0, empty) gets an adapter, as SlotPool.write does
        for m in pool.a_stack:
            pool.a_stack[m][:, 2, :5].normal_()
            pool.b_stack[m][:, 2, :, :5].normal_()
        pool.rank[2] = 5
    got, _ = run(layer, x, pool, slots, reference=False)
    want, _ = run(layer, x, pool, slots, reference=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_pool_holding_a_subset_of_the_projection():
    """A pool for q and v only leaves k's columns to the base weight."""
    layer = make_layer()
    pool = make_pool(outs=(12, 6), modules=("q_proj", "v_proj"))
    x = torch.randn(5, 16)
    slots = torch.tensor([0, 3, 1, -1, 0], dtype=torch.int32)
    got, _ = run(layer, x, pool, slots, reference=False, influence=True)
    want, _ = run(layer, x, pool, slots, reference=True, influence=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 2, 8, 40])
def test_cpu_decode_layouts_compute_the_same_projection(tokens):
    layer = make_layer()
    x = torch.randn(tokens, 16)
    with torch.inference_mode():
        want = layer(x)
        layer.prepare_cpu_decode(column_major_weight=True)
        got = layer(x)
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # another BLAS: another summation order
