"""The correctness anchor: our engine against transformers (+ PEFT) on the same weights, CPU fp32.

Greedy tokens must be identical and the logits of every step within 1e-4 relative, for the base model and
three adapters of different ranks and target modules all decoded together in one mixed batch, through
both the step() path and the streaming path.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPTS = ["The quick brown fox", "Once upon a time in a land far away,", "1, 2, 3, 4,",
           "Paris is the capital of"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest logit, per row; the worst row."""
    return float(((a - b).abs().amax(-1) / b.abs().amax(-1)).max())


def _engine(model_dir, **kw) -> LLMEngine:
    cfg = dict(num_kv_blocks=128, block_size=16, num_lora_slots=4, max_lora_rank=16)
    cfg.update(kw)
    return LLMEngine(model_dir, EngineConfig(**cfg))


def _run_collecting_logits(engine: LLMEngine, prompts, adapters, max_tokens, stagger: int = 0):
    """Run all requests together; return per-request logits of every sampled step and final tokens.

    stagger > 0 adds the requests `stagger` at a time, one group per step, so prefills of some adapters
    share forward passes with decodes of others."""
    engine.runner.keep_logits = True
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    pending = list(zip(prompts, adapters))
    group = stagger or len(pending)
    ids = []
    mixed_steps = []  # steps where some adapters prefilled while others decoded
    steps: dict[str, list[torch.Tensor]] = {}
    done = {}
    while pending or engine.has_unfinished():
        ids += [engine.add_request(p, params, a) for p, a in pending[:group]]
        pending = pending[group:]
        decoding = {s.adapter for s in engine.scheduler.running}
        waiting = list(engine.scheduler.waiting)
        outs = engine.step()
        prefilled = {s.adapter for s in waiting if s.num_computed_tokens > 0}
        if decoding and prefilled and decoding != prefilled:
            mixed_steps.append((decoding, prefilled))
        for row, rid in enumerate(engine.last_rows):
            steps.setdefault(rid, []).append(engine.last_logits[row].clone())
        for o in outs:
            if o.finished:
                done[o.request_id] = o
    assert mixed_steps or not stagger
    return [torch.stack(steps[i]) for i in ids], [done[i].token_ids for i in ids]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_mistral_dir", "tiny_llama3_dir"])
def test_base_model_matches_transformers(fixture, request, hf_reference):
    model_dir = request.getfixturevalue(fixture)
    engine = _engine(model_dir)
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    # long enough for the llama3 fixture's positions to pass its 32-token original context
    max_new = 40 if fixture == "tiny_llama3_dir" else 12
    ref_tokens, ref_logits = hf_reference(model_dir, prompts, max_new)
    logits, tokens = _run_collecting_logits(engine, prompts, [None] * len(prompts), max_new)
    assert tokens == ref_tokens
    for ours, ref in zip(logits, ref_logits):
        assert _rel(ours, ref) < 1e-4


def _mixed_batch(engine: LLMEngine, tiny_adapters):
    for name, path in tiny_adapters.items():
        engine.register_adapter(name, path)
    names = [None, "a4", "b8", "c16"]
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    return prompts, names


def test_mixed_adapter_batch_matches_peft(tiny_llama_dir, tiny_adapters, hf_reference):
    engine = _engine(tiny_llama_dir)
    prompts, names = _mixed_batch(engine, tiny_adapters)
    # every request twice: each adapter has decodes of two sequences interleaved with the others
    prompts, names = prompts + prompts[::-1], names + names[::-1]
    ref_tokens, ref_logits = hf_reference(tiny_llama_dir, prompts, 10, tiny_adapters, names)
    for stagger in (0, 3):
        logits, tokens = _run_collecting_logits(engine, prompts, names, 10, stagger=stagger)
        assert tokens == ref_tokens
        for ours, ref in zip(logits, ref_logits):
            assert _rel(ours, ref) < 1e-4
    # the adapters changed the output (else this test would prove nothing)
    base_tokens, _ = hf_reference(tiny_llama_dir, prompts[1:4], 10)
    assert all(b != t for b, t in zip(base_tokens, ref_tokens[1:4]))


def test_streaming_mixed_batch_matches_peft(tiny_llama_dir, tiny_adapters, hf_reference):
    from engine.async_engine import AsyncLLMEngine

    engine = _engine(tiny_llama_dir)
    prompts, names = _mixed_batch(engine, tiny_adapters)
    ref_tokens, _ = hf_reference(tiny_llama_dir, prompts, 10, tiny_adapters, names)

    async def consume(aengine, prompt, name):
        tokens, text, steps = [], "", 0
        async for out in aengine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=10), name):
            tokens += out.completions[0].delta_token_ids
            text += out.completions[0].delta_text
            steps += 1
        return tokens, text, steps, out

    async def main():
        aengine = AsyncLLMEngine(engine)
        try:
            return await asyncio.gather(*(consume(aengine, p, n) for p, n in zip(prompts, names)))
        finally:
            await aengine.close()

    results = asyncio.run(main())
    for (tokens, text, steps, final), ref in zip(results, ref_tokens):
        assert tokens == ref
        assert steps == len(ref)  # one delta per decoded token: it really streamed
        assert text == final.text == engine.tokenizer.decode(ref)


@pytest.fixture(scope="module")
def smollm2_adapters(tmp_path_factory, smollm2_dir, peft_adapter_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("smollm2-adapters")
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    specs = {"s4": (4, ["q_proj", "v_proj"]), "s8": (8, ["o_proj", "gate_proj", "down_proj"]),
             "s16": (16, ["k_proj", "up_proj"])}
    return {name: peft_adapter_factory(smollm2_dir, root / name, r, t, alpha=2.0 * r, seed=i, std=0.03,
                                       base_model=base)
            for i, (name, (r, t)) in enumerate(specs.items())}


@pytest.mark.slow
def test_smollm2_mixed_batch_matches_peft(smollm2_dir, smollm2_adapters, hf_reference):
    engine = _engine(smollm2_dir, num_kv_blocks=64)
    for name, path in smollm2_adapters.items():
        engine.register_adapter(name, path)
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in
               ("What is the capital of France?", "Name a color.", "Say hello.", "Count to three.")]
    names = [None, "s4", "s8", "s16"]
    ref_tokens, ref_logits = hf_reference(smollm2_dir, prompts, 8, smollm2_adapters, names)
    logits, tokens = _run_collecting_logits(engine, prompts, names, 8)
    assert tokens == ref_tokens
    for ours, ref in zip(logits, ref_logits):
        assert _rel(ours, ref) < 1e-4
    assert len({tuple(t) for t in ref_tokens}) > 1


def test_cancelled_stream_aborts_its_request(tiny_llama_dir):
    from engine.async_engine import AsyncLLMEngine

    engine = _engine(tiny_llama_dir)

    async def main():
        aengine = AsyncLLMEngine(engine)
        stream = aengine.generate("Hello", SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True))
        first = await stream.__anext__()
        await stream.aclose()  # the client hung up
        await aengine.close()
        return first

    first = asyncio.run(main())
    assert len(first.completions[0].token_ids) == 1
    assert not engine.has_unfinished() and engine.block_manager.num_free_blocks == 128
