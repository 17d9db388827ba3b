"""LLMEngine end to end on the tiny model: batching shapes never change tokens, resources come back,
sampling features do what they promise, bad requests change nothing."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.errors import AdapterNotFound, CapacityError, RequestError
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.conftest import record_schedules

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
PROMPTS = ["The quick brown fox jumps over the lazy dog and keeps running", "Hello", "1, 2, 3, 4, 5, 6,",
           "A long time ago in a galaxy far, far away there lived"]


_ASYNC = {"on": False}


@pytest.fixture(autouse=True, params=[False, True], ids=["one_step_at_a_time", "async_steps"])
def async_steps(request):
    """Every test here runs twice: steps one at a time (the CPU default) and launched ahead (the CUDA default,
    EngineConfig.async_steps; tests/engine/test_async_steps.py compares the two directly)."""
    _ASYNC["on"] = request.param
    yield request.param
    _ASYNC["on"] = False


def _engine(model_dir, **kw) -> LLMEngine:
    cfg = dict(num_kv_blocks=64, block_size=4, num_lora_slots=3, max_lora_rank=16, async_steps=_ASYNC["on"])
    cfg.update(kw)
    return LLMEngine(model_dir, EngineConfig(**cfg))


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """Greedy tokens with a roomy engine, one request at a time."""
    eng = _engine(tiny_llama_dir, num_kv_blocks=128)
    return [eng.generate([p], GREEDY)[0].token_ids for p in PROMPTS]


def test_batched_generation_equals_one_at_a_time(tiny_llama_dir, reference):
    outs = _engine(tiny_llama_dir).generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == reference


def test_chunked_prefill_gives_the_same_tokens(tiny_llama_dir, reference):
    eng = _engine(tiny_llama_dir, max_num_batched_tokens=5)
    assert [o.token_ids for o in eng.generate(PROMPTS, GREEDY)] == reference


def test_preemption_by_recompute_gives_the_same_tokens(tiny_llama_dir, reference):
    eng = _engine(tiny_llama_dir, num_kv_blocks=14)  # cannot hold all four sequences at full length
    ids = [eng.add_request(p, GREEDY) for p in PROMPTS]
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.token_ids
    assert [done[i] for i in ids] == reference
    assert eng.block_manager.num_free_blocks == 14


def test_preemption_happens_with_a_small_cache(tiny_llama_dir):
    eng = _engine(tiny_llama_dir, num_kv_blocks=14)
    seqs = []
    for p in PROMPTS:
        rid = eng.add_request(p, GREEDY)
        seqs += eng.requests[rid].seqs
    while eng.has_unfinished():
        eng.step()
    assert sum(s.num_preemptions for s in seqs) > 0


def test_repeated_prompt_reuses_prefix_blocks_and_keeps_tokens(tiny_llama_dir, reference):
    eng = _engine(tiny_llama_dir)
    first = eng.generate([PROMPTS[0]], GREEDY)[0]
    again = eng.generate([PROMPTS[0]], GREEDY)[0]
    assert first.cached_tokens == 0 and again.cached_tokens >= 8
    assert again.token_ids == first.token_ids == reference[0]


def test_abort_frees_blocks_at_once_and_others_continue(tiny_llama_dir, reference):
    eng = _engine(tiny_llama_dir)
    keep = eng.add_request(PROMPTS[0], GREEDY)
    drop = eng.add_request(PROMPTS[3], GREEDY)
    eng.step()
    free_before = eng.block_manager.num_free_blocks
    assert eng.abort(drop)
    assert eng.block_manager.num_free_blocks > free_before
    assert not eng.abort(drop)  # already gone
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert {o.request_id for o in outs} == {keep} and outs[-1].token_ids == reference[0]
    assert eng.block_manager.num_free_blocks == 64


def test_seed_reproduces_the_same_sample_whatever_the_batch(tiny_llama_dir):
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=10, ignore_eos=True)
    alone = _engine(tiny_llama_dir).generate([PROMPTS[1]], p)[0].token_ids
    crowd = _engine(tiny_llama_dir).generate(PROMPTS, [SamplingParams(temperature=1.0, max_tokens=10)] * 1 +
                                             [p] + [SamplingParams(temperature=0.7, max_tokens=6)] * 2)
    other_seed = _engine(tiny_llama_dir).generate([PROMPTS[1]], SamplingParams(
        temperature=1.0, top_p=0.9, top_k=50, seed=99, max_tokens=10, ignore_eos=True))[0].token_ids
    assert crowd[1].token_ids == alone
    assert other_seed != alone


def test_top_k_one_is_greedy(tiny_llama_dir, reference):
    p = SamplingParams(temperature=0.8, top_k=1, max_tokens=12, ignore_eos=True)
    assert _engine(tiny_llama_dir).generate([PROMPTS[0]], p)[0].token_ids == reference[0]


def test_n_completions_and_logprobs(tiny_llama_dir):
    eng = _engine(tiny_llama_dir)
    eng.runner.keep_logits = True
    p = SamplingParams(temperature=1.0, n=3, seed=7, max_tokens=5, logprobs=3, ignore_eos=True)
    rid = eng.add_request(PROMPTS[1], p)
    logits = None
    while eng.has_unfinished():
        outs = eng.step()
        if logits is None and eng.last_logits is not None:  # the first step read back (a step late when async)
            logits = eng.last_logits[0]
    out = outs[-1]
    assert out.finished and len(out.completions) == 3 and out.completion_tokens == 15
    assert len({tuple(c.token_ids) for c in out.completions}) > 1  # different seeds per completion
    first = out.completions[0]
    lp, alts = first.logprobs[0]
    ref = torch.log_softmax(logits, -1)
    assert lp == pytest.approx(float(ref[first.token_ids[0]]), abs=1e-5)
    assert [i for i, _ in alts] == ref.topk(3).indices.tolist()
    assert len(first.logprobs) == 5


def test_n_completions_prefill_the_prompt_once(tiny_llama_dir, reference):
    eng = _engine(tiny_llama_dir)
    steps = record_schedules(eng)
    prompt_len = len(eng.tokenizer.encode(PROMPTS[0]))
    p = SamplingParams(temperature=0.0, n=3, max_tokens=12, ignore_eos=True)
    out = eng.generate([PROMPTS[0]], p)[0]
    assert [c.token_ids for c in out.completions] == [reference[0]] * 3
    # siblings 1 and 2 found the prompt's full blocks cached: only its last partial block is computed again
    shared = (prompt_len - 1) // 4 * 4
    assert shared >= 8 and out.cached_tokens == shared
    assert sum(o.num_batched_tokens for o in steps) == prompt_len + 2 * (prompt_len - shared) + 3 * 11
    assert eng.block_manager.num_free_blocks == 64


def test_step_without_streaming_emits_only_finished_requests(tiny_llama_dir, reference):
    """step(stream=False), as generate() runs it: no output for a request still running, and the final output
    carries the whole text and tokens, the same as a streamed run's deltas add up to."""
    eng = _engine(tiny_llama_dir)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (3, 12)]
    ids = [eng.add_request(p, sp) for p, sp in zip(PROMPTS[:2], params)]
    seen = []
    while eng.has_unfinished():
        outs = eng.step(stream=False)
        assert all(o.finished for o in outs)
        seen += outs
    finals = {o.request_id: o for o in seen}
    assert sorted(finals) == sorted(ids) and len(seen) == 2
    streamed = _engine(tiny_llama_dir)
    sids = [streamed.add_request(p, sp) for p, sp in zip(PROMPTS[:2], params)]
    text = {r: "" for r in sids}
    toks = {r: [] for r in sids}
    while streamed.has_unfinished():
        for o in streamed.step():
            text[o.request_id] += o.completions[0].delta_text
            toks[o.request_id] += o.completions[0].delta_token_ids
    for rid, sid, n in zip(ids, sids, (3, 12)):
        assert finals[rid].token_ids == toks[sid] == reference[ids.index(rid)][:n]
        assert finals[rid].text == text[sid]


def test_stop_string_truncates_text_and_stop_token_ends(tiny_llama_dir, reference):
    eng = _engine(tiny_llama_dir)
    full = eng.generate([PROMPTS[0]], GREEDY)[0]
    text = full.text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip()
    out = eng.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12, stop=[stop]))[0]
    assert out.completions[0].finish_reason == "stop" and out.completions[0].stop_reason == stop
    assert out.text == text[: text.index(stop)]
    tok = reference[0][3]
    out = eng.generate([PROMPTS[0]], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[tok]))[0]
    assert out.token_ids == reference[0][: reference[0].index(tok) + 1]
    assert out.completions[0].stop_reason == tok
    assert full.completions[0].finish_reason == "length" and len(full.token_ids) == 12


def test_frequency_penalty_discourages_repeats(tiny_llama_dir, reference):
    # the tiny model's greedy output repeats itself; a strong frequency penalty breaks the loop
    assert len(set(reference[1])) < len(reference[1])
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, frequency_penalty=2.0)
    out = _engine(tiny_llama_dir).generate([PROMPTS[1]], p)[0].token_ids
    assert len(set(out)) > len(set(reference[1]))


def test_bad_requests_are_refused_and_change_nothing(tiny_llama_dir):
    eng = _engine(tiny_llama_dir, num_kv_blocks=8, max_model_len=64)
    bad = [
        (lambda: eng.add_request("hi", SamplingParams(temperature=-1)), RequestError),
        (lambda: eng.add_request("hi", SamplingParams(top_p=0)), RequestError),
        (lambda: eng.add_request([10**9]), RequestError),
        (lambda: eng.add_request([]), RequestError),
        (lambda: eng.add_request(list(range(64))), RequestError),
        (lambda: eng.add_request("hi", SamplingParams(max_tokens=40)), CapacityError),
        (lambda: eng.add_request("hi", adapter="nope"), AdapterNotFound),
    ]
    for call, err in bad:
        with pytest.raises(err):
            call()
    assert not eng.has_unfinished() and not eng.requests
    rid = eng.add_request("hi", request_id="x")
    with pytest.raises(RequestError, match="already in use"):
        eng.add_request("hi", request_id="x")
    assert list(eng.requests) == [rid]
