"""Async steps (EngineConfig.async_steps): step k is launched before step k-1's tokens are read back, and the
tokens step k consumes come from step k-1's sampler output on the device. On CPU nothing overlaps, but the
bookkeeping is the same as on the GPU, so these tests hold it to the one-step-at-a-time engine: same tokens,
text, logprobs, finish reasons and influence, nothing leaked, and the launches really run ahead."""

from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import PENDING
from tests.engine.conftest import record_schedules, warm_adapters

PROMPTS = ["The quick brown fox jumps over the lazy dog and keeps running", "Hello", "1, 2, 3, 4, 5, 6,",
           "A long time ago in a galaxy far, far away there lived", "Once upon a time", "Q: what is 2+2? A:"]


def _engine(model_dir, adapters=None, async_steps=True, graphs=False, **kw) -> LLMEngine:
    cfg = dict(num_kv_blocks=64, block_size=4, num_lora_slots=3, max_lora_rank=16, async_steps=async_steps,
               adapter_admit_wait_ms=0.0)
    cfg.update(kw)
    eng = LLMEngine(model_dir, EngineConfig(**cfg))
    for name, path in (adapters or {}).items():
        eng.register_adapter(name, path)
    if graphs:
        eng.runner.enable_cuda_graphs(8, eng.max_model_len, emulate=True, max_tokens=2048)
    return eng


def _params(stop_text: str, stop_token: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, top_k=20, seed=11, max_tokens=9, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=14, stop=[stop_text]),
        SamplingParams(temperature=0.0, max_tokens=14, stop_token_ids=[stop_token], ignore_eos=True),
        SamplingParams(temperature=0.7, top_p=0.9, n=2, seed=3, max_tokens=6, logprobs=1, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=3, min_tokens=2),
    ]


def _same(got, want):
    assert [o.request_id for o in got] == [o.request_id for o in want]
    for g, w in zip(got, want):
        assert g.prompt_tokens == w.prompt_tokens and g.completion_tokens == w.completion_tokens
        for cg, cw in zip(g.completions, w.completions, strict=True):
            assert cg.token_ids == cw.token_ids
            assert cg.text == cw.text
            assert (cg.finish_reason, cg.stop_reason) == (cw.finish_reason, cw.stop_reason)
            if cw.logprobs is None:
                assert cg.logprobs is None
                continue
            assert len(cg.logprobs) == len(cw.logprobs) == len(cw.token_ids)
            for (lg, ag), (lw, aw) in zip(cg.logprobs, cw.logprobs):
                assert lg == pytest.approx(lw, abs=1e-5)
                assert [t for t, _ in ag] == [t for t, _ in aw]
        assert g.influence.keys() == w.influence.keys()
        for name in w.influence:
            assert g.influence[name]["tokens"] == w.influence[name]["tokens"]
            assert g.influence[name]["delta_ratio"] == pytest.approx(w.influence[name]["delta_ratio"], rel=1e-5)


@pytest.fixture(scope="module")
def stops(tiny_llama_dir):
    """A stop string and a stop token that really occur in the greedy continuations (so they end requests)."""
    eng = _engine(tiny_llama_dir, async_steps=False)
    outs = eng.generate(PROMPTS[2:4], SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True))
    text = outs[0].text
    return text[len(text) // 2:len(text) // 2 + 2], outs[1].token_ids[4]


@pytest.mark.parametrize("setup", ["plain", "chunked_preempting", "graphs"])
def test_async_steps_give_what_one_step_at_a_time_gives(tiny_llama_dir, tiny_adapters, stops, setup):
    """Mixed sampling (greedy, seeded, top-k/p, logprobs, n=2, stop strings and tokens, min_tokens), adapters of
    different ranks next to the base model; also with a small token budget and KV cache (chunked prefills,
    preemptions) and on the padded CUDA-graph path (emulated)."""
    kw = {"plain": {}, "chunked_preempting": dict(max_num_batched_tokens=8, num_kv_blocks=14),
          "graphs": dict(graphs=True)}[setup]
    names = ["a4", "b8", None, None, "c16", "a4"]  # 2 and 3 on the base model, as `stops` found them
    params = _params(*stops)
    runs = []
    for async_steps in (False, True):
        eng = _engine(tiny_llama_dir, tiny_adapters, async_steps=async_steps, **kw)
        warm_adapters(eng, names)  # admission, and so every batch, the same in both engines
        steps = record_schedules(eng)
        runs.append(eng.generate(PROMPTS, params, adapters=names))
        assert any(o.preempted for o in steps) == (setup == "chunked_preempting")
        assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
        assert all(s.refcount == 0 for s in eng.adapters.pool.slots)
        assert not eng.has_unfinished()
    _same(runs[1], runs[0])
    # the stop string and the stop token really ended requests (the dropped extra step is invisible)
    assert runs[0][2].completions[0].finish_reason == "stop"
    assert runs[0][3].completions[0].stop_reason == stops[1]


def test_steps_are_launched_ahead_and_read_their_tokens_on_the_device(tiny_llama_dir):
    """Step k is launched before step k-1 is collected, and its decode rows take their input ids from step k-1's
    sampled ids (PENDING on the host at launch)."""
    eng = _engine(tiny_llama_dir)
    calls, pending_rows = [], []
    launch, collect = eng.runner.launch, eng.runner.collect

    def launching(out, prev_ids=None):
        pending_rows.append(sum(s.seq.token_ids[s.seq.num_computed_tokens] == PENDING for s in out.scheduled
                                if s.num_new_tokens == 1))
        step = launch(out, prev_ids)
        calls.append(("launch", id(step)))
        return step

    def collecting(step):
        calls.append(("collect", id(step)))
        return collect(step)

    eng.runner.launch, eng.runner.collect = launching, collecting
    out = eng.generate(PROMPTS[:3], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert [len(o.token_ids) for o in out] == [8, 8, 8]
    launches = [i for i, (kind, _) in enumerate(calls) if kind == "launch"]
    assert len(launches) == 8  # one prefill, seven decode steps
    for k in range(1, len(launches)):
        prev = calls[launches[k - 1]][1]
        # step k-1 was collected only after step k was launched
        assert calls.index(("collect", prev)) > launches[k]
    assert pending_rows[0] == 0 and all(n == 3 for n in pending_rows[1:])


def test_a_sequence_that_stops_gets_one_dropped_step_and_length_ends_get_none(tiny_llama_dir, stops):
    """A stop token is only known a step late, so one more step is computed for it (dropped); a sequence whose
    token in flight is its last by max_tokens is not scheduled again."""
    eng = _engine(tiny_llama_dir)
    steps = record_schedules(eng)
    prompt = eng.tokenizer.encode(PROMPTS[0])
    eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    assert sum(o.num_batched_tokens for o in steps) == len(prompt) + 5  # like one step at a time: the 6th token is never an input
    steps.clear()
    ref = _engine(tiny_llama_dir, async_steps=False).generate(
        [PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True))[0].token_ids
    tok = stops[1]
    out = eng.generate([PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=14, stop_token_ids=[tok],
                                                    ignore_eos=True))[0]
    n_out = ref.index(tok) + 1
    assert out.token_ids == ref[:n_out]
    prompt_len = len(eng.tokenizer.encode(PROMPTS[3]))
    assert sum(o.num_batched_tokens for o in steps) == prompt_len + n_out  # one step more than needed, its token dropped
    assert eng.block_manager.num_free_blocks == 64


def test_penalties_run_one_step_at_a_time_and_match(tiny_llama_dir):
    """Presence/frequency penalties count every earlier token on the host: the step in flight is collected
    before the next is scheduled, and the tokens are those of the plain engine."""
    p = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, frequency_penalty=1.5),
         SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, presence_penalty=0.8)]
    want = _engine(tiny_llama_dir, async_steps=False).generate(PROMPTS[:2], p)
    eng = _engine(tiny_llama_dir)
    order = []
    launch, collect = eng.runner.launch, eng.runner.collect
    eng.runner.launch = lambda out, prev_ids=None: order.append("launch") or launch(out, prev_ids)
    eng.runner.collect = lambda step: order.append("collect") or collect(step)
    got = eng.generate(PROMPTS[:2], p)
    _same(got, want)
    assert order[:4] == ["launch", "collect", "launch", "collect"]


def test_streamed_deltas_and_abort_with_a_step_in_flight(tiny_llama_dir):
    """Streaming: deltas add up to the final text and tokens (no PENDING id ever shows); an abort while the
    request's step is in flight frees its blocks at once and the step's result for it is dropped."""
    eng = _engine(tiny_llama_dir)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    keep = eng.add_request(PROMPTS[0], params)
    drop = eng.add_request(PROMPTS[3], params)
    toks = {keep: [], drop: []}
    text = {keep: "", drop: ""}
    final = {}
    for _ in range(3):
        for o in eng.step():
            toks[o.request_id] += o.completions[0].delta_token_ids
            text[o.request_id] += o.completions[0].delta_text
    assert eng.step_in_flight and any(e.seq.request_id == drop for e in eng._in_flight.out.scheduled)
    free = eng.block_manager.num_free_blocks
    assert eng.abort(drop)
    assert eng.block_manager.num_free_blocks > free
    while eng.has_unfinished():
        for o in eng.step():
            assert o.request_id == keep and PENDING not in o.completions[0].delta_token_ids
            toks[keep] += o.completions[0].delta_token_ids
            text[keep] += o.completions[0].delta_text
            if o.finished:
                final = o
    ref = _engine(tiny_llama_dir, async_steps=False).generate([PROMPTS[0]], params)[0]
    assert toks[keep] == final.token_ids == ref.token_ids
    assert text[keep] == final.text == ref.text
    assert eng.block_manager.num_free_blocks == 64


def test_async_steps_is_checked(tiny_llama_dir):
    from engine.errors import EngineConfigError

    with pytest.raises(EngineConfigError, match="async_steps"):
        _engine(tiny_llama_dir, async_steps="yes")
    assert _engine(tiny_llama_dir, async_steps=None).async_steps is False  # CPU default: one at a time


def test_a_failed_launch_leaves_no_token_in_flight(tiny_llama_dir):
    """If launching step k raises, step k-1 is still read back: no sequence keeps a PENDING token, and the
    engine goes on (the failed step's tokens are scheduled again)."""
    eng = _engine(tiny_llama_dir)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    rid = eng.add_request(PROMPTS[0], params)
    eng.step()
    eng.step()
    launch = eng.runner.launch

    def failing(out, prev_ids=None):
        raise RuntimeError("device lost")

    eng.runner.launch = failing
    with pytest.raises(RuntimeError, match="device lost"):
        eng.step()
    seq = eng.requests[rid].seqs[0]
    assert not seq.has_pending and PENDING not in seq.token_ids and len(seq.output_ids) == 2
    assert not eng.step_in_flight
    eng.runner.launch = launch
    final = None
    while eng.has_unfinished():
        for o in eng.step():
            final = o
    ref = _engine(tiny_llama_dir, async_steps=False).generate([PROMPTS[0]], params)[0]
    assert final.token_ids == ref.token_ids
