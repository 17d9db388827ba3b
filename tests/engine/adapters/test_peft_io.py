"""save_peft_adapter writes folders that peft and our parser both read back identically."""

from __future__ import annotations

import pytest
import torch

from engine.adapters import AdapterCache, save_peft_adapter
from engine.errors import AdapterError

from .conftest import peft_deltas, slot_delta, tiny_base


def random_tensors(rank, modules, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {(m, l): (torch.randn(rank, shapes[m][0], generator=g), torch.randn(shapes[m][1], rank, generator=g))
            for m in modules for l in range(2)}


def test_written_adapter_round_trips_through_peft(model_config, tmp_path):
    from peft import PeftModel

    from engine.adapters import module_shapes

    shapes = module_shapes(model_config)
    tensors = random_tensors(3, ("k_proj", "up_proj"), shapes)
    out = save_peft_adapter(tmp_path / "made", tensors, rank=3, alpha=6, target_modules=["up_proj", "k_proj"],
                            use_rslora=True, base_model="tiny-llama")
    model = PeftModel.from_pretrained(tiny_base(), out)
    ref = peft_deltas(model)
    assert set(ref) == set(tensors)
    scale = 6 / 3 ** 0.5
    for loc, (a, b) in tensors.items():
        torch.testing.assert_close(ref[loc], scale * b @ a, rtol=1e-5, atol=1e-5)
    cache = AdapterCache(model_config, num_slots=1, max_rank=4, background=False)
    spec = cache.register("made", out)
    assert (spec.rank, spec.use_rslora, spec.base_model) == (3, True, "tiny-llama")
    slot = cache.request("made")
    for loc in tensors:
        torch.testing.assert_close(slot_delta(cache.pool, slot, *loc), ref[loc], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    (lambda t: t.update({("q_proj", 0): (torch.ones(2, 32), torch.ones(32, 2))}), "not in target_modules"),
    (lambda t: t[("k_proj", 0)][0].__setitem__((0, 0), float("nan")), "NaN"),
    (lambda t: t.update({("k_proj", 1): (torch.ones(2, 32), torch.ones(16, 2))}), "rank 2"),
    (lambda t: t.update({"lm_head.weight": torch.ones(1)}), "neither"),
])
def test_bad_tensors_are_refused(model_config, tmp_path, bad, match):
    from engine.adapters import module_shapes

    tensors = random_tensors(3, ("k_proj",), module_shapes(model_config))
    bad(tensors)
    with pytest.raises(AdapterError, match=match):
        save_peft_adapter(tmp_path / "x", tensors, rank=3, alpha=3, target_modules=["k_proj"])
    assert not (tmp_path / "x" / "adapter_model.safetensors").exists()
