"""Influence statistics through the Triton kernels (fused into the LoRA expand) equal the reference path's
(delta buffer + row norms). On CPU the kernels run in TRITON_INTERPRET, forced by OPENLORA_KERNELS=triton."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPTS = ["The quick brown fox", "Once upon a time", "Hello there"]


def _run(model_dir, adapters, kernels: str, monkeypatch, graphs: bool = False):
    """The three prompts on three adapters, greedy; `graphs`: through the CUDA-graph static-buffer path, run
    eagerly (its CPU emulation)."""
    monkeypatch.setenv("OPENLORA_KERNELS", kernels)
    eng = LLMEngine(model_dir, EngineConfig(num_kv_blocks=64, block_size=4, num_lora_slots=3, max_lora_rank=16,
                                            cpu_decode_layouts=False))
    for name, path in adapters.items():
        eng.register_adapter(name, path)
    if graphs:
        eng.runner.enable_cuda_graphs(4, eng.max_model_len, emulate=True)
    outs = eng.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                        adapters=["a4", "b8", "c16"])
    assert (eng.runner.graph_steps > 0) == graphs
    eng.close()
    return outs


def test_fused_influence_equals_the_reference_statistics(tiny_llama_dir, tiny_adapters, monkeypatch):
    ref = _run(tiny_llama_dir, tiny_adapters, "torch", monkeypatch)
    fused = _run(tiny_llama_dir, tiny_adapters, "triton", monkeypatch)
    for r, f in zip(ref, fused):
        assert r.token_ids == f.token_ids
        assert r.influence.keys() == f.influence.keys() and r.influence
        for name, stats in r.influence.items():
            assert f.influence[name]["tokens"] == stats["tokens"]
            assert f.influence[name]["delta_ratio"] == pytest.approx(stats["delta_ratio"], rel=1e-4)
