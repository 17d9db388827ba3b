"""The model's Triton path (what CUDA runs: fused add + RMSNorm, silu * up, RoPE + KV write, paged
attention) against its torch path, on CPU through the Triton interpreter (OPENLORA_KERNELS=triton).

The engine runs float32 only on CPU, so generation is compared in float32; bf16, the dtype the fused
kernels are written for, is compared one forward pass at a time on the model itself (a prefill of two
sequences, then a decode step). The interpreter cannot run the attention kernel's bf16 tl.dot (its bf16 run
is on the GPU, tests/kernels/test_attention.py), so there attention is the reference on both paths and
what differs is the fused kernels alone.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.context import Context, reset_context, set_context
from engine.llm_engine import LLMEngine
from engine.loader import load_model
from engine.sampling_params import SamplingParams
from kernels import attention, elementwise

PROMPTS = ["The quick brown fox", "Once upon a time in a land far away,", "1 2 3"]
FUSED = ("add_rmsnorm_triton", "silu_mul_triton", "rope_write_kv_triton")


def _generate(model_dir, kernels: str, monkeypatch) -> tuple[list, dict[str, int]]:
    monkeypatch.setenv("OPENLORA_KERNELS", kernels)
    calls = dict.fromkeys(FUSED, 0)
    for name in FUSED:
        def spy(*args, _name=name, _fn=getattr(elementwise, name)):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(elementwise, name, spy)
    eng = LLMEngine(model_dir, EngineConfig(num_kv_blocks=32, block_size=4, cpu_decode_layouts=False))
    outs = eng.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=2))
    eng.close()
    monkeypatch.undo()
    return [o.completions[0] for o in outs], calls


def test_triton_path_gives_the_torch_paths_tokens_and_logprobs(tiny_llama_dir, monkeypatch):
    ref, ref_calls = _generate(tiny_llama_dir, "torch", monkeypatch)
    fused, calls = _generate(tiny_llama_dir, "triton", monkeypatch)
    assert not any(ref_calls.values())
    layers, steps = 2, 6  # the tiny model's layers; prefill + 5 decode steps at least
    assert calls["rope_write_kv_triton"] >= layers * steps and calls["silu_mul_triton"] >= layers * steps
    assert calls["add_rmsnorm_triton"] >= (2 * layers + 1) * steps
    for r, f in zip(ref, fused):
        assert r.token_ids == f.token_ids
        for lr, lf in zip(r.logprobs, f.logprobs):
            assert lf[0] == pytest.approx(lr[0], rel=1e-4, abs=1e-5)


def _step_context(lens_before: list[int], new: list[int], tables: list[list[int]], block_size: int) -> Context:
    """The metadata of one step: sequence b has lens_before[b] tokens cached and new[b] arriving."""
    slots, qsl = [], [0]
    for before, n, table in zip(lens_before, new, tables):
        slots += [table[p // block_size] * block_size + p % block_size for p in range(before, before + n)]
        qsl.append(qsl[-1] + n)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32)
    return Context(slot_mapping=torch.tensor(slots), block_tables=bt,
                   seq_lens=torch.tensor([b + n for b, n in zip(lens_before, new)], dtype=torch.int32),
                   query_start_loc=torch.tensor(qsl, dtype=torch.int32))


def _forward_bf16(model, kernels: str, monkeypatch) -> list[torch.Tensor]:
    """Prefill [5, 3] tokens, then decode one token each: the hidden states of both steps."""
    monkeypatch.setenv("OPENLORA_KERNELS", kernels)
    cfg, bs = model.config, 4
    for layer in model.layers:  # fresh caches (random, so a read of an unwritten slot would show)
        g = torch.Generator().manual_seed(1)
        shape = (8, bs, cfg.num_key_value_heads, cfg.head_dim)
        layer.self_attn.attn.k_cache = torch.randn(shape, generator=g).to(torch.bfloat16)
        layer.self_attn.attn.v_cache = torch.randn(shape, generator=g).to(torch.bfloat16)
    tables = [[3, 5], [6]]
    ids = torch.randint(0, cfg.vocab_size, (10,), generator=torch.Generator().manual_seed(2))
    steps = [([0, 0], [5, 3], ids[:8], torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])),
             ([5, 3], [1, 1], ids[8:], torch.tensor([5, 3]))]
    hidden = []
    with torch.inference_mode():
        for before, new, step_ids, positions in steps:
            set_context(_step_context(before, new, tables, bs))
            try:
                hidden.append(model(step_ids, positions).float())
            finally:
                reset_context()
    return hidden


def test_bf16_forward_through_the_fused_kernels_matches_the_torch_path(tiny_llama_dir, monkeypatch):
    model = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    ref = _forward_bf16(model, "torch", monkeypatch)
    monkeypatch.setattr(attention, "paged_attention_triton",
                        lambda *args: attention.paged_attention_ref(*args))
    fused = _forward_bf16(model, "triton", monkeypatch)
    for r, f in zip(ref, fused):
        # the norms' sums may round one bf16 ulp apart; nothing else may differ
        err = (r - f).abs().amax(-1) / r.abs().amax(-1)
        assert float(err.max()) < 2e-2, err


def test_padded_graph_steps_through_the_fused_kernels_match_the_torch_path(tiny_llama_dir, monkeypatch):
    """Decode steps padded to a graph bucket (the CPU emulation of engine/cuda_graph.py): three sequences
    run in the bucket of four, so every step carries a padding token (slot -1) through rope_write_kv."""
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=1)
    cfg = EngineConfig(num_kv_blocks=32, block_size=4, max_num_seqs=4, cpu_decode_layouts=False)
    monkeypatch.setenv("OPENLORA_KERNELS", "torch")
    eng = LLMEngine(tiny_llama_dir, cfg)
    plain = eng.generate(PROMPTS, params)
    eng.close()
    monkeypatch.setenv("OPENLORA_KERNELS", "triton")
    padding_rows = []
    rope = elementwise.rope_write_kv_triton

    def spy(qkv, cos, sin, k_cache, v_cache, slot_mapping, *rest):
        padding_rows.append(int((slot_mapping < 0).sum()))
        return rope(qkv, cos, sin, k_cache, v_cache, slot_mapping, *rest)

    monkeypatch.setattr(elementwise, "rope_write_kv_triton", spy)
    eng = LLMEngine(tiny_llama_dir, cfg)
    eng.runner.enable_cuda_graphs(4, eng.max_model_len, emulate=True)
    padded = eng.generate(PROMPTS, params)
    assert eng.runner.graph_steps >= 4 and {t for t, _, _, _ in eng.runner.graphs.graphs} == {4}
    assert padding_rows.count(1) >= 4 * 2  # every padded decode step, in both layers
    eng.close()
    for a, b in zip(plain, padded):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        for la, lb in zip(a.completions[0].logprobs, b.completions[0].logprobs):
            assert lb[0] == pytest.approx(la[0], rel=1e-4, abs=1e-5)
