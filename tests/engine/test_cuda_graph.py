"""Decode steps through the CUDA-graph path: static buffers, padding to a bucket, one graph for any mix
of adapters. On CPU the same path runs eagerly (`emulate`), so padding and buffer handling are checked
against the plain path here. Real capture and replay are checked on the GPU by benchmarks/gpu_parity.py
(graphs on vs off, and against transformers + PEFT): its tiny model needs no SmolLM2 tokenizer, which
the device machine cannot download."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.cuda_graph import buckets, pad_lengths, token_buckets
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPTS = ["The quick brown fox", "Once upon a time", "Hello there", "Why is the sky blue?", "1 2 3 4 5"]
ADAPTERS = [None, "a4", "b8", "c16", "a4"]


def _engine(model_dir, adapters, graphs: str, device: str = "cpu") -> LLMEngine:
    eng = LLMEngine(model_dir, EngineConfig(device=device, num_kv_blocks=96, block_size=4, num_lora_slots=3,
                                            max_lora_rank=16, max_num_seqs=8, cuda_graphs=graphs == "capture"))
    for name, path in adapters.items():
        eng.register_adapter(name, path)
    for name in adapters:  # resident before the first step: batch sizes then follow the arrivals, not load timing
        eng.adapters.load(name)
    if graphs.startswith("emulate"):
        # "emulate_mixed": steps that prefill take the padded graph path too (token budget 2048, the default)
        eng.runner.enable_cuda_graphs(8, eng.max_model_len, emulate=True,
                                        max_tokens=2048 if graphs == "emulate_mixed" else 0)
    return eng


def _staggered(eng: LLMEngine, params: SamplingParams):
    """Requests arrive over several steps, so decode batches of 1..5 rows (3 buckets) are padded."""
    ids, outs, step = [], {}, 0
    while len(ids) < len(PROMPTS) or eng.has_unfinished():
        if len(ids) < len(PROMPTS) and step % 2 == 0:
            i = len(ids)
            ids.append(eng.add_request(PROMPTS[i], params, adapter=ADAPTERS[i]))
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = o
        step += 1
    return [outs[i] for i in ids]


def _tokens(outs):
    return [o.completions[0].token_ids for o in outs]


def test_buckets_cover_every_batch_size():
    assert buckets(1) == [1]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    b = buckets(256)
    assert b[:5] == [1, 2, 4, 8, 16] and b[-1] == 256 and all(y - x <= 16 for x, y in zip(b, b[1:]))
    assert token_buckets(256, 4096) == [512, 768, 1024, 1536, 2048, 3072, 4096, 4352]
    assert token_buckets(8, 100)[0] == 16 and token_buckets(8, 100)[-1] == 108
    b = buckets(600)
    assert b[-4:] == [448, 512, 576, 600] and 256 in b and 320 in b and all(y - x <= 64 for x, y in zip(b, b[1:]))


def test_padding_sequences_never_outgrow_a_block_table_row():
    assert pad_lengths(3, 3, 8) == [1, 1, 1]
    assert pad_lengths(10, 3, 4) == [2, 4, 4]
    assert pad_lengths(12, 3, 4) == [4, 4, 4]
    for tokens, seqs, cap in ((4352, 256, 384), (2064, 16, 512), (100, 7, 16)):
        lens = pad_lengths(tokens, seqs, cap)
        assert sum(lens) == tokens and len(lens) == seqs and max(lens) <= cap and min(lens) >= 1


def test_a_step_whose_padding_cannot_fit_runs_eagerly(tiny_llama_dir, tiny_adapters):
    eng = _engine(tiny_llama_dir, tiny_adapters, "emulate_mixed")
    graphs = eng.runner.graphs
    graphs.pad_cap = 1  # padding sequences may hold one token only: spare tokens have nowhere to go
    eng.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert not any(t != b for t, b, _, _ in graphs.graphs)  # no mixed graph was used
    assert eng.runner.eager_steps > 0


@pytest.mark.parametrize("mode", ["emulate", "emulate_mixed"])
def test_emulated_graph_path_gives_the_plain_paths_tokens_logprobs_and_influence(tiny_llama_dir, tiny_adapters,
                                                                                   mode):
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2)
    plain = _staggered(_engine(tiny_llama_dir, tiny_adapters, "off"), params)
    eng = _engine(tiny_llama_dir, tiny_adapters, mode)
    padded = _staggered(eng, params)
    shapes = set(eng.runner.graphs.graphs)
    assert {t for t, b, _, _ in shapes if t == b} >= {1, 2, 4}  # decode buckets
    if mode == "emulate":  # prefill steps ran eagerly next to the padded decode steps
        assert eng.runner.graph_steps > 5 and eng.runner.eager_steps > 0
    else:  # every step took a graph shape; steps that prefilled were padded to 8 sequences
        assert eng.runner.eager_steps == 0
        mixed = {(t, lora) for t, b, lora, _ in shapes if t != b}
        assert mixed and all(t in token_buckets(8, 2048) for t, _ in mixed)
        assert {lora for _, lora in mixed} == {False, True}
    for a, b in zip(plain, padded):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        for la, lb in zip(a.completions[0].logprobs, b.completions[0].logprobs):
            assert la[0] == pytest.approx(lb[0], rel=1e-4, abs=1e-5)
        assert a.influence.keys() == b.influence.keys()
        for name in a.influence:
            assert a.influence[name]["tokens"] == b.influence[name]["tokens"]
            assert a.influence[name]["delta_ratio"] == pytest.approx(b.influence[name]["delta_ratio"], rel=1e-4)


@pytest.mark.parametrize("mode", ["emulate", "emulate_mixed"])
def test_sampling_with_seeds_is_unchanged_by_padding(tiny_llama_dir, tiny_adapters, mode):
    params = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, seed=7, ignore_eos=True)
    plain = _staggered(_engine(tiny_llama_dir, tiny_adapters, "off"), params)
    padded = _staggered(_engine(tiny_llama_dir, tiny_adapters, mode), params)
    assert _tokens(plain) == _tokens(padded)


def test_cuda_graphs_refused_for_a_cpu_model(tiny_llama_dir, tiny_adapters):
    eng = _engine(tiny_llama_dir, tiny_adapters, "off")
    with pytest.raises(ValueError, match="CUDA"):
        eng.runner.enable_cuda_graphs(8, eng.max_model_len)


def test_a_full_batch_that_prefills_still_takes_a_graph(tiny_llama_dir, tiny_adapters):
    """Mixed graphs hold max_batch + 1 sequences: the step that admits the last request of a full batch (every
    one of max_batch sequences real) pads with the extra one instead of running eagerly; its tokens, logprobs and
    influence match the plain path's."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1)
    prompts = [f"{p} {i}" for i in range(2) for p in PROMPTS][:8]
    adapters = [ADAPTERS[i % len(ADAPTERS)] for i in range(8)]

    def run(mode):
        eng = _engine(tiny_llama_dir, tiny_adapters, mode)
        ids = [eng.add_request(prompts[i], params, adapter=adapters[i]) for i in range(7)]
        eng.step()  # seven sequences prefill
        ids.append(eng.add_request(prompts[7], params, adapter=adapters[7]))
        outs = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = o
        return eng, [outs[i] for i in ids]

    plain_eng, plain = run("off")
    eng, padded = run("emulate_mixed")
    graphs = eng.runner.graphs
    assert eng.runner.eager_steps == 0 and graphs.mixed_seqs == 9
    assert any(b == 9 for _, b, _, _ in graphs.graphs)
    for a, b in zip(plain, padded):
        assert a.completions[0].token_ids == b.completions[0].token_ids
        for (lp_a, _), (lp_b, _) in zip(a.completions[0].logprobs, b.completions[0].logprobs):
            assert lp_a == pytest.approx(lp_b, abs=1e-4)
        for name, stats in a.influence.items():
            assert b.influence[name]["delta_ratio"] == pytest.approx(stats["delta_ratio"], rel=1e-4)
