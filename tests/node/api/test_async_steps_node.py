"""A node whose engine runs async steps (engine_async_steps=on, the CUDA default) answers exactly as the
one-step-at-a-time node: the same text, usage and logprobs, streamed or not, under concurrent requests for
different adapters; a client that leaves mid-stream is aborted with a step in flight and its KV comes back."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

CHAT = "/v1/chat/completions"
ASKS = [("alpha", "Tell me about the sea."), ("beta", "Name three colours."), (None, "Count to five."),
        ("alpha", "What is a lighthouse?"), ("beta", "Why is the sky blue?"), (None, "Say hello.")]


def _body(model, prompt, **kw):
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 10,
            "temperature": 0, "logprobs": True, "top_logprobs": 2, **kw}


def _answers(served, base_model):
    """Every ask at once from its own thread: (text, finish reason, usage, logprobs) per ask."""
    def ask(item):
        model, prompt = item
        with served.client() as c:
            r = c.post(CHAT, json=_body(model or base_model, prompt))
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        lps = [(t["token"], t["logprob"]) for t in choice["logprobs"]["content"]]
        return choice["message"]["content"], choice["finish_reason"], r.json()["usage"], lps

    with ThreadPoolExecutor(len(ASKS)) as pool:
        return list(pool.map(ask, ASKS))


@pytest.fixture(scope="module")
def async_node(serve_node, node_settings):
    with serve_node(node_settings(engine_async_steps="on")) as served:
        assert served.node.engine.engine.async_steps is True
        yield served


def test_async_node_answers_as_the_one_step_at_a_time_node(async_node, dev_node):
    assert dev_node.node.engine.engine.async_steps is False  # CPU default
    want = _answers(dev_node, dev_node.node.model_id)
    got = _answers(async_node, async_node.node.model_id)
    for (tg, fg, ug, lg), (tw, fw, uw, lw) in zip(got, want):
        assert (tg, fg) == (tw, fw)
        assert ug["completion_tokens"] == uw["completion_tokens"] and ug["prompt_tokens"] == uw["prompt_tokens"]
        assert [t for t, _ in lg] == [t for t, _ in lw]
        # the two nodes batch the concurrent asks differently, so a step may take the native or the torch CPU
        # path on one node and not the other: their float32 sums agree to ~1e-5 (tests/engine/test_native_decoder)
        assert [p for _, p in lg] == pytest.approx([p for _, p in lw], abs=1e-4)


def test_async_node_streams_the_same_text_and_usage(async_node):
    body = _body("beta", "Tell me about the sea.", logprobs=False, top_logprobs=None)
    body.pop("top_logprobs")
    with async_node.client() as c:
        whole = c.post(CHAT, json=body).json()
        text, usage = "", None
        with c.stream("POST", CHAT, json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                text += "".join(ch["delta"].get("content") or "" for ch in event["choices"])
                usage = event.get("usage") or usage
    assert text == whole["choices"][0]["message"]["content"]
    assert usage["completion_tokens"] == whole["usage"]["completion_tokens"]


def test_async_node_client_leaving_mid_stream_is_aborted(async_node):
    node = async_node.node
    engine = node.engine
    free_before = engine.engine.block_manager.num_free_blocks
    cancelled = node.accountant.cancelled
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 300,
            "temperature": 1.0, "seed": 1, "stream": True, "ignore_eos": True}
    with async_node.client() as c, c.stream("POST", CHAT, json=body) as r:
        lines = r.iter_lines()
        for line in lines:  # up to the first generated text: the request is decoding, a step in flight
            if line.startswith("data: ") and '"content":"' in line.replace(" ", ""):
                break
        assert engine.in_flight == 1
    deadline = time.monotonic() + 30
    while engine.in_flight or engine.engine.block_manager.num_free_blocks != free_before:
        assert time.monotonic() < deadline, "the abort did not free the request's KV"
        time.sleep(0.02)
    assert node.accountant.cancelled == cancelled + 1
    assert not engine.engine.requests
