"""EngineConfig.quantization = "q4": the engine serves 4-bit projection weights (engine/layers/quant.py).

The anchor: a q4 engine computes exactly what a full-precision engine computes when its projection weights
are replaced by dequantize(quantize(w)), with and without LoRA adapters on top (CPU fp32). Plus: the
projection tensors shrink, bad settings are refused before anything loads, the CLI and node plumb it.
"""

from __future__ import annotations

import json

import pytest
import torch

from engine.config import EngineConfig
from engine.errors import EngineConfigError
from engine.layers.linear import LoRALinear
from engine.layers.quant import group_size_for, projection_bytes, quantized_weight
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kernels.quant import dequantize, quantize_linear_weight

PROMPTS = ["The quick brown fox", "Once upon a time in a land far away,", "1, 2, 3, 4,"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(model_dir, EngineConfig(num_kv_blocks=64, block_size=16, num_lora_slots=4, max_lora_rank=16,
                                             **kw))


def _projections(model) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def _run(engine: LLMEngine, adapters, prompts=PROMPTS):
    """All prompts together, greedy: per request the logits of every sampled step, and its tokens."""
    engine.runner.keep_logits = True
    ids = [engine.add_request(p, GREEDY, a) for p, a in zip(prompts, adapters)]
    steps: dict[str, list[torch.Tensor]] = {}
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.token_ids
        for row, rid in enumerate(engine.last_rows):
            steps.setdefault(rid, []).append(engine.last_logits[row].clone())
    return [torch.stack(steps[i]) for i in ids], [done[i] for i in ids]


def _load_dequantized(ref: LLMEngine, q4: LLMEngine) -> None:
    """Give ref's projections the q4 engine's dequantized weights (and refresh any copies made from them)."""
    for (_, rm), (_, qm) in zip(_projections(ref.model), _projections(q4.model)):
        with torch.no_grad():
            rm.weight.copy_(dequantize(quantized_weight(qm)))
    prepare = getattr(ref.model, "prepare_cpu_decode", None)
    if prepare is not None:
        prepare()  # CPU decode layouts are copies of the weights


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().amax(-1) / b.abs().amax(-1)).max())


@pytest.fixture(scope="module")
def engines(tiny_llama_dir, tiny_adapters):
    """(q4 engine, full-precision engine whose projections hold dequantize(quantize(w))), same adapters."""
    q4 = _engine(tiny_llama_dir, quantization="q4")
    ref = _engine(tiny_llama_dir)
    for (name, rm), (_, qm) in zip(_projections(ref.model), _projections(q4.model)):
        # the loader quantized the checkpoint's own rows (fused q/k/v, gate/up in order), nothing else
        expected = quantize_linear_weight(rm.weight.detach(), group_size_for(rm.weight.shape[1], 128))
        assert torch.equal(qm.qweight, expected.qweight), name
        assert qm.weight is None
    _load_dequantized(ref, q4)
    for eng in (q4, ref):
        for name, path in tiny_adapters.items():
            eng.register_adapter(name, path)
    yield q4, ref
    q4.close()
    ref.close()


def test_q4_engine_computes_the_dequantized_model(engines):
    q4, ref = engines
    logits, tokens = _run(q4, [None] * len(PROMPTS))
    ref_logits, ref_tokens = _run(ref, [None] * len(PROMPTS))
    assert tokens == ref_tokens and all(len(t) == GREEDY.max_tokens for t in tokens)
    for ours, want in zip(logits, ref_logits):
        assert _rel(ours, want) < 1e-5


def test_one_sequence_decode_steps_match_too(engines):
    q4, ref = engines  # one token per step: the path where CPU engines use their own decode layouts
    (logits,), (tokens,) = _run(q4, ["b8"], PROMPTS[:1])
    (ref_logits,), (ref_tokens,) = _run(ref, ["b8"], PROMPTS[:1])
    assert tokens == ref_tokens and _rel(logits, ref_logits) < 1e-5


def test_adapters_apply_on_top_of_4bit_base_weights(engines):
    q4, ref = engines
    names = ["a4", "b8", "c16"]
    logits, tokens = _run(q4, names)
    ref_logits, ref_tokens = _run(ref, names)
    assert tokens == ref_tokens
    for ours, want in zip(logits, ref_logits):
        assert _rel(ours, want) < 1e-5
    base_logits, _ = _run(q4, [None] * len(PROMPTS))
    # every adapter moves the first step's logits (same prompt, same base weights)
    assert all(_rel(a[0], b[0]) > 1e-3 for a, b in zip(logits, base_logits))


def test_projection_memory_shrinks_more_than_4x(engines):
    q4, ref = engines
    before, after = projection_bytes(ref.model), projection_bytes(q4.model)
    assert before["projection_bytes"] >= 4 * after["projection_bytes"]
    # embeddings, norms (and the tied head) stay in the model's dtype
    assert after["other_bytes"] == before["other_bytes"]
    assert q4.model.embed_tokens.weight.dtype == torch.float32
    assert all(isinstance(m.qweight, torch.Tensor) and m.qweight.dtype == torch.uint8
               for _, m in _projections(q4.model))


def test_qwen2_biases_are_still_added(tiny_qwen2_dir):
    q4 = _engine(tiny_qwen2_dir, quantization="q4")
    ref = _engine(tiny_qwen2_dir)
    _load_dequantized(ref, q4)
    assert any(m.bias is not None for _, m in _projections(q4.model))
    logits, tokens = _run(q4, [None] * len(PROMPTS))
    ref_logits, ref_tokens = _run(ref, [None] * len(PROMPTS))
    assert tokens == ref_tokens
    assert max(_rel(a, b) for a, b in zip(logits, ref_logits)) < 1e-5


def test_group_size_falls_back_to_the_largest_that_divides():
    assert group_size_for(64, 128) == 64  # the tiny model's hidden size
    assert group_size_for(576, 128) == 96  # SmolLM2's hidden size
    assert group_size_for(1536, 128) == 128
    with pytest.raises(EngineConfigError, match="no divisor"):
        group_size_for(40, 128)


@pytest.mark.parametrize("kw, match", [(dict(quantization="q8"), "quantization"),
                                       (dict(quantization="Q4"), "quantization"),
                                       (dict(quantization="q4", quant_group_size=24), "quant_group_size"),
                                       (dict(quantization="q4", quant_group_size=0), "quant_group_size")])
def test_invalid_quantization_is_refused_before_loading(tiny_llama_dir, kw, match):
    with pytest.raises(EngineConfigError, match=match):
        EngineConfig(**kw).validate()
    with pytest.raises(EngineConfigError, match=match):
        _engine(tiny_llama_dir, **kw)


def test_generate_cli_plumbs_quantization(tiny_llama_dir, engines, capsys, monkeypatch):
    from engine import llm_engine
    from node.cli import main

    seen = []

    class Recording(LLMEngine):
        def __init__(self, model_dir, config=None, adapters=None):
            seen.append(config)
            super().__init__(model_dir, config, adapters)

    monkeypatch.setattr(llm_engine, "LLMEngine", Recording)
    args = ["generate", PROMPTS[0], "--model", str(tiny_llama_dir), "--device", "cpu", "--max-tokens", "8", "--json"]
    assert main(args + ["--quantization", "q4"]) == 0
    assert seen[-1].quantization == "q4"
    out = json.loads(capsys.readouterr().out)
    q4_tokens = engines[0].generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=8))[0].token_ids
    assert out[0]["completions"][0]["token_ids"] == q4_tokens
    assert main(args + ["--quantization", "none"]) == 0 and seen[-1].quantization is None
    capsys.readouterr()
    n = len(seen)
    assert main(args + ["--quantization", "q8"]) == 1
    assert "quantization" in capsys.readouterr().err and len(seen) == n  # refused before an engine is built


def test_settings_and_serve_path_plumb_quantization(node_engine_config, monkeypatch):
    from node.config import load_settings
    from node.errors import ConfigError

    monkeypatch.setenv("OPENLORA_ENGINE_QUANTIZATION", "q4")
    settings = load_settings(device="cpu", engine_quant_group_size=64)
    assert settings.engine_quantization == "q4"
    with pytest.raises(ConfigError, match="engine_quantization"):
        load_settings(engine_quantization="q8")
    with pytest.raises(ConfigError, match="engine_quant_group_size"):
        load_settings(engine_quant_group_size=24)
    cfg = node_engine_config(settings)
    assert (cfg.quantization, cfg.quant_group_size) == ("q4", 64)
