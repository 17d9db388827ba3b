"""Serving adapters through the real AdapterCache: waiting for a load never blocks others, slot
references come back, a pool holding only some modules still gives PEFT's tokens, influence is
reported per adapter."""

from __future__ import annotations

import pytest
import torch

from engine.adapters.cache import AdapterCache
from engine.config import EngineConfig, ModelConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _engine(model_dir, adapters_dirs, cache=None, **kw) -> LLMEngine:
    cfg = dict(num_kv_blocks=64, block_size=4, num_lora_slots=3, max_lora_rank=16)
    cfg.update(kw)
    eng = LLMEngine(model_dir, EngineConfig(**cfg), adapters=cache)
    for name, path in adapters_dirs.items():
        eng.register_adapter(name, path)
    return eng


def test_request_waits_for_its_adapter_without_blocking_others(tiny_llama_dir, tiny_adapters):
    eng = _engine(tiny_llama_dir, tiny_adapters)
    lora = eng.add_request("Hello there", GREEDY, adapter="b8")
    base = eng.add_request("Hello there", GREEDY)
    first = eng.step()
    # the adapter's load started in the background; the base request behind it ran anyway
    assert [o.request_id for o in first] == [base]
    assert eng.requests[lora].seqs[0].num_computed_tokens == 0
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert set(done) == {lora, base}
    assert done[lora].token_ids != done[base].token_ids


def test_slot_references_are_released_on_finish_and_abort(tiny_llama_dir, tiny_adapters):
    eng = _engine(tiny_llama_dir, tiny_adapters)
    eng.generate(["Hi", "Yo"], GREEDY, adapters=["a4", "c16"])
    assert eng.adapters.stats()["slots_referenced"] == 0
    rid = eng.add_request("Hi", GREEDY, adapter="a4")
    while not eng.requests[rid].seqs[0].num_computed_tokens:
        eng.step()
    assert eng.adapters.stats()["slots_referenced"] == 1
    eng.abort(rid)
    assert eng.adapters.stats()["slots_referenced"] == 0


def test_pool_of_a_module_subset_matches_peft(tiny_llama_dir, tiny_adapters, hf_reference):
    # a pool without k_proj/gate_proj: fused q/k/v and gate/up projections add only the slices it holds
    subset = {k: tiny_adapters[k] for k in ("a4", "c16")}
    cache = AdapterCache(ModelConfig.from_dir(tiny_llama_dir), num_slots=2, max_rank=16,
                         target_modules=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    eng = _engine(tiny_llama_dir, subset, cache=cache)
    prompts = [eng.tokenizer.encode(p) for p in ("The quick brown fox", "Once upon a time")]
    names = ["a4", "c16"]
    ref, _ = hf_reference(tiny_llama_dir, prompts, 8, subset, names)
    outs = eng.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8), adapters=names)
    assert [o.token_ids for o in outs] == ref


def test_influence_is_reported_per_adapter_and_zero_free_for_base(tiny_llama_dir, tiny_adapters):
    eng = _engine(tiny_llama_dir, tiny_adapters)
    base, small, big = eng.generate(["Hello there"] * 3, GREEDY, adapters=[None, "a4", "b8"])
    assert base.influence == {}
    prompt_len = len(eng.tokenizer.encode("Hello there"))
    for out, name in ((small, "a4"), (big, "b8")):
        stats = out.influence[name]
        # every prompt token and every generated token but the last went through the model
        assert stats["tokens"] == prompt_len + GREEDY.max_tokens - 1
        assert 0.0 < stats["share"] < 1.0 and stats["delta_ratio"] > 0
    # b8 touches all seven projections with a bigger scale than a4's q/v: a larger delta
    assert big.influence["b8"]["delta_ratio"] > small.influence["a4"]["delta_ratio"]


def test_influence_matches_the_delta_it_describes(tiny_llama_dir, tiny_adapters):
    """The runner's per-token ratio equals |delta| / |base| computed by hand for one projection."""
    from engine.context import Context, reset_context, set_context
    from kernels import dispatch

    eng = _engine(tiny_llama_dir, tiny_adapters)
    slot = None
    while slot is None:
        slot = eng.adapters.request("c16")
    layer = eng.model.layers[0].mlp.down_proj
    x = torch.randn(3, 128)
    pool = eng.adapters.pool
    ctx = Context(lora_meta=dispatch.make_lora_meta(torch.tensor([slot, -1, slot], dtype=torch.int32)),
                  lora_pool=pool, influence_sum=torch.zeros(3))
    set_context(ctx)
    try:
        y = layer(x)
    finally:
        reset_context()
    base = x @ layer.weight.T
    delta = float(pool.scale[slot]) * (x @ pool.lora_a["down_proj"][0][slot].T) @ pool.lora_b["down_proj"][0][slot].T
    expect = delta.norm(dim=-1) / base.norm(dim=-1)
    assert torch.allclose(y[0], base[0] + delta[0], atol=1e-5) and torch.allclose(y[1], base[1])
    assert ctx.influence_count == 1
    assert torch.allclose(ctx.influence_sum, expect * torch.tensor([1.0, 0.0, 1.0]), atol=1e-5)
    eng.adapters.release(slot)


def test_fused_mix_passes_through_and_splits_influence(tiny_llama_dir, tiny_adapters):
    from engine.adapters.fusion import FusedMix

    eng = _engine(tiny_llama_dir, tiny_adapters)
    alone = eng.generate(["Hello there"], GREEDY, adapters=["a4"])[0]
    solo_mix = eng.generate(["Hello there"], GREEDY, adapters=[FusedMix((("a4", 1.0),))])[0]
    assert solo_mix.token_ids == alone.token_ids
    mix = FusedMix((("a4", 0.75), ("c16", 0.25)), strategy="linear")
    out = eng.generate(["Hello there"], GREEDY, adapters=[mix])[0]
    assert set(out.influence) == {"a4", "c16"}
    assert out.influence["a4"]["share"] == pytest.approx(3 * out.influence["c16"]["share"])


def test_more_adapters_than_slots_wait_their_turn(tiny_llama_dir, tiny_adapters):
    eng = _engine(tiny_llama_dir, tiny_adapters, num_lora_slots=1)
    ids = [eng.add_request("Hello there", GREEDY, adapter=n) for n in ("a4", "b8", "c16")]
    ids.append(eng.add_request("Hello there", GREEDY))
    most_in_flight, done = 0, {}
    while eng.has_unfinished():
        slots = {s.lora_slot for s in eng.scheduler.running if s.adapter is not None}
        most_in_flight = max(most_in_flight, len(slots))
        for o in eng.step():
            done[o.request_id] = o
    assert most_in_flight == 1 and set(done) == set(ids)
    # each adapter's answer is its own (same as served alone)
    alone = _engine(tiny_llama_dir, tiny_adapters).generate(["Hello there"] * 3, GREEDY, adapters=["a4", "b8", "c16"])
    assert [done[i].token_ids for i in ids[:3]] == [o.token_ids for o in alone]
