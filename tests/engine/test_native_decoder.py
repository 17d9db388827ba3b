"""The native CPU decode path (engine/models/native_decoder.py, kernels/native_cpu.py) gives the torch paths'
tokens, logprobs and influence: a mixed batch of adapters with different ranks and module subsets plus a
base-model request, on Llama (tied head) and Qwen2 (qkv bias, untied head); an adapter swapped in a slot
between runs; and it really runs (counted), and only where it applies."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kernels import native_cpu
from tests.engine.conftest import ADAPTER_SPECS, make_peft_adapter, warm_adapters

pytestmark = pytest.mark.skipif(not native_cpu.available(), reason="no C++ compiler on this machine")

PROMPTS = [[1, 5, 9, 2, 7], [3, 3, 8], [4, 11, 6, 2, 9, 10, 12], [2, 8], [6, 1, 1, 5]]


def _engine(model_dir, adapters, native: bool, **kw) -> LLMEngine:
    cfg = dict(num_kv_blocks=64, block_size=4, num_lora_slots=4, max_lora_rank=16, max_num_seqs=8,
               cpu_native_kernels=native)
    cfg.update(kw)
    eng = LLMEngine(model_dir, EngineConfig(**cfg))
    for name, path in adapters.items():
        eng.register_adapter(name, path)
    return eng


def _warm(eng, names, counts):
    """Adapters loaded first (warm_adapters: the counts assume every sequence admitted at once), counts zeroed."""
    warm_adapters(eng, names)
    for key in counts:
        counts[key] = 0
    return eng


def _run(eng, names, max_tokens=12, logprobs=2):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)
    return eng.generate(PROMPTS, params, adapters=names)


@pytest.fixture
def count_layers(monkeypatch):
    """Calls of the fused layer ("n") and of the per-projection native attention ("attention")."""
    calls = {"n": 0, "attention": 0}

    def counting(key, real):
        def counted(*a, **kw):
            calls[key] += 1
            return real(*a, **kw)
        return counted

    monkeypatch.setattr(native_cpu, "decoder_layer", counting("n", native_cpu.decoder_layer))
    monkeypatch.setattr(native_cpu, "decode_attention", counting("attention", native_cpu.decode_attention))
    return calls


def _assert_same(got, want):
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        gl, wl = g.completions[0].logprobs, w.completions[0].logprobs
        assert len(gl) == len(wl) == len(g.token_ids)
        for (lp_g, top_g), (lp_w, top_w) in zip(gl, wl):  # chosen token's logprob and the top alternatives
            assert abs(lp_g - lp_w) < 1e-4
            assert [t for t, _ in top_g] == [t for t, _ in top_w]
            assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(top_g, top_w))
        assert g.influence.keys() == w.influence.keys()
        for name in g.influence:
            gi, wi = g.influence[name], w.influence[name]
            assert gi["tokens"] == wi["tokens"]
            assert gi["delta_ratio"] == pytest.approx(wi["delta_ratio"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("model", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_native_decode_matches_the_torch_paths(model, request, tmp_path, count_layers):
    model_dir = request.getfixturevalue(model)
    adapters = {name: make_peft_adapter(model_dir, tmp_path / name, r, t, a, seed=i, use_rslora=rs, std=0.3)
                for i, (name, (r, t, a, rs)) in enumerate(ADAPTER_SPECS.items())}
    names = ["a4", "b8", None, "c16", "b8"]
    want = _run(_engine(model_dir, adapters, native=False), names)
    assert count_layers["n"] == 0  # off means off
    eng = _warm(_engine(model_dir, adapters, native=True), names, count_layers)
    assert eng.model.native_decoder is not None
    got = _run(eng, names)
    layers = len(eng.model.layers)
    assert count_layers["n"] >= layers * 10  # the decode steps (11 of them, one may be mixed) ran natively
    _assert_same(got, want)


def test_an_adapter_swapped_into_a_slot_is_what_the_next_step_reads(tiny_llama_dir, tiny_adapters, count_layers):
    """One slot: the second run must decode with c16's rows, not the a4 rows the layer structs pointed at."""
    kw = dict(num_lora_slots=1)
    ref = _engine(tiny_llama_dir, tiny_adapters, native=False, **kw)
    eng = _engine(tiny_llama_dir, tiny_adapters, native=True, **kw)
    for name in ("a4", "c16", "a4"):
        _assert_same(_run(eng, [name] * len(PROMPTS)), _run(ref, [name] * len(PROMPTS)))
    assert count_layers["n"] > 0


def test_larger_decode_steps_take_the_per_projection_kernels_and_match(tiny_llama_dir, tiny_adapters, count_layers):
    """17 decoding sequences: above the fused layer's step size, so each projection's native matmul/LoRA
    (up to 64 tokens) and the native attention run instead; tokens, logprobs and influence as the torch paths."""
    n = native_cpu.MAX_GEMM_TOKENS + 1
    prompts = [PROMPTS[i % len(PROMPTS)] + [i + 1] for i in range(n)]
    names = [["a4", "b8", None, "c16"][i % 4] for i in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2)
    runs = []
    for native in (False, True):
        eng = _warm(_engine(tiny_llama_dir, tiny_adapters, native=native, max_num_seqs=32, num_kv_blocks=128),
                    names, count_layers)
        runs.append(eng.generate(prompts, params, adapters=names))
    layers = len(eng.model.layers)
    # the full-batch decode steps (4 or 5, depending on how the prefill was chunked) ran per projection
    assert count_layers["attention"] >= 4 * layers
    _assert_same(runs[1], runs[0])


def test_training_keeps_the_torch_path(tiny_llama_dir, tiny_adapters):
    eng = _engine(tiny_llama_dir, tiny_adapters, native=True)
    with torch.enable_grad():
        h = eng.model.embed_tokens(torch.tensor([1, 2]))
        cos, sin = eng.model.rotary.tables(torch.tensor([0, 1]), h.dtype)
        assert eng.model.native_decoder.forward(h, cos, sin) is None
