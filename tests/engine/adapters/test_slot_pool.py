"""SlotPool storage and writes: stacked per-module tensors, packed and per-pair writes, fast reads."""

from __future__ import annotations

import shutil

import pytest
import torch

from engine.adapters import AdapterCache, SlotPool
from engine.adapters.peft_format import (
    ALL_MODULES, AdapterWeights, ReadTimings, module_shapes, pack_weights, parse_adapter, read_weights,
)
from engine.errors import AdapterError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_pool(model_config, device, num_slots=3, max_rank=8, dtype=torch.float32):
    return SlotPool.create(model_config, num_slots, max_rank, ALL_MODULES, torch.device(device), dtype)


def random_weights(model_config, seed, ranks, rank=None, scale=0.5):
    """ranks[(module, layer)] -> r; pairs not listed are absent (a zero delta)."""
    g = torch.Generator().manual_seed(seed)
    shapes = module_shapes(model_config)
    tensors = {(m, layer): (torch.randn(r, shapes[m][0], generator=g), torch.randn(shapes[m][1], r, generator=g))
               for (m, layer), r in ranks.items()}
    return AdapterWeights(f"w{seed}", rank or max(ranks.values()), scale, tensors)


def assert_slot_holds(pool, slot, weights):
    for m in pool.target_modules:
        for layer in range(pool.num_layers):
            a, b = pool.lora_a[m][layer][slot].cpu(), pool.lora_b[m][layer][slot].cpu()
            pair = weights.tensors.get((m, layer))
            r = 0 if pair is None else pair[0].shape[0]
            if pair is not None:
                assert torch.equal(a[:r], pair[0].to(a.dtype)) and torch.equal(b[:, :r], pair[1].to(b.dtype))
            assert not a[r:].any() and not b[:, r:].any(), f"{m} layer {layer}: padding not zero"
    assert int(pool.rank[slot]) == weights.rank and float(pool.scale[slot]) == weights.scale


def test_layer_views_are_contiguous_slices_of_one_tensor_per_module(model_config):
    pool = make_pool(model_config, "cpu")
    for m in ALL_MODULES:
        stack_a, stack_b = pool.a_stack[m], pool.b_stack[m]
        for layer in range(model_config.num_hidden_layers):
            a, b = pool.lora_a[m][layer], pool.lora_b[m][layer]
            assert a.is_contiguous() and b.is_contiguous()
            assert a.data_ptr() == stack_a[layer].data_ptr() and b.data_ptr() == stack_b[layer].data_ptr()
            assert a.shape == (3, 8, module_shapes(model_config)[m][0])
            assert b.shape == (3, module_shapes(model_config)[m][1], 8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "pairs"])
def test_write_fills_leading_ranks_and_zeroes_the_rest(model_config, device, packed):
    pool = make_pool(model_config, device)
    ptrs = {m: (pool.lora_a[m][0].data_ptr(), pool.lora_b[m][1].data_ptr()) for m in ALL_MODULES}
    shapes = module_shapes(model_config)
    big = random_weights(model_config, 1, {(m, layer): 8 for m in ALL_MODULES for layer in range(2)})
    # mixed ranks, a skipped layer, modules left out: all must come out zero where absent
    small = random_weights(model_config, 2, {("q_proj", 0): 4, ("q_proj", 1): 2, ("down_proj", 1): 3})
    if packed:
        big = pack_weights(big, shapes, 2, pool.dtype, pin_memory=device == "cuda")
        small = pack_weights(small, shapes, 2, pool.dtype, pin_memory=device == "cuda")
        assert small.packed is not None
    stream = torch.cuda.Stream() if device == "cuda" else None
    pool.write(1, big, stream)
    pool.write(1, small, stream)  # overwrites a full-rank adapter: leftovers must be cleared
    pool.write(2, big, stream)
    if device == "cuda":
        torch.cuda.synchronize()
    assert_slot_holds(pool, 1, small)
    assert_slot_holds(pool, 2, big)
    assert not any(pool.lora_a[m][layer][0].any() for m in ALL_MODULES for layer in range(2))
    pool.clear(2, stream)
    if device == "cuda":
        torch.cuda.synchronize()
    assert not any(pool.lora_b[m][layer][2].any() for m in ALL_MODULES for layer in range(2))
    assert int(pool.rank[2]) == 0
    # pool tensors are written in place, never reallocated (CUDA graphs hold their addresses)
    assert ptrs == {m: (pool.lora_a[m][0].data_ptr(), pool.lora_b[m][1].data_ptr()) for m in ALL_MODULES}


def test_read_weights_packs_into_one_buffer(adapters, model_config):
    parsed = parse_adapter("pattern", adapters.root / "pattern", model_config, max_rank=8,
                           max_adapter_bytes=1 << 20)
    timings = ReadTimings()
    w = read_weights(parsed, torch.float32, timings=timings)
    assert w.packed is not None and timings.reads == 1
    lo, hi = w.packed.buffer.data_ptr(), w.packed.buffer.data_ptr() + w.packed.nbytes
    for a, b in w.tensors.values():  # every tensor is a view into the one buffer
        assert lo <= a.data_ptr() < hi and lo <= b.data_ptr() < hi
    # the same numbers as packing the per-pair tensors afresh
    again = pack_weights(AdapterWeights(w.content_hash, w.rank, w.scale, dict(w.tensors)),
                         module_shapes(model_config), model_config.num_hidden_layers, torch.float32)
    assert torch.equal(again.packed.buffer, w.packed.buffer)


@pytest.mark.parametrize("change", ["weight_byte", "config"])
def test_a_same_size_change_after_registration_is_refused(adapters, model_config, tmp_path, change):
    folder = tmp_path / "a"
    shutil.copytree(adapters.root / "qv4", folder)
    parsed = parse_adapter("a", folder, model_config, max_rank=8, max_adapter_bytes=1 << 20)
    if change == "weight_byte":
        path = folder / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01  # a mantissa bit of the last weight: same size, still finite
        path.write_bytes(bytes(data))
    else:
        cfg = (folder / "adapter_config.json").read_text().replace('"lora_alpha": 8', '"lora_alpha": 9')
        (folder / "adapter_config.json").write_text(cfg)
    with pytest.raises(AdapterError, match="changed on disk"):
        read_weights(parsed, torch.float32)


def test_cache_counts_the_read_breakdown(model_config, adapters):
    with AdapterCache(model_config, num_slots=2, max_rank=8, background=False) as cache:
        cache.register("qv4", adapters.root / "qv4")
        cache.load("qv4")
        detail = cache.stats()["disk_to_host_detail"]
        assert detail["reads"] == 1
        parts = detail["read_ms"] + detail["verify_ms"] + detail["alloc_ms"] + detail["pack_ms"]
        assert 0 < parts <= cache.disk_to_host.ms + 1e-6
