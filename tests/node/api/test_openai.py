"""The OpenAI-compatible API, spoken by the official `openai` client and by raw HTTP, against a real
uvicorn server with the tiny model and two PEFT adapters (dev mode)."""

from __future__ import annotations

import json
import time

import openai
import pytest

MSG = [{"role": "user", "content": "Tell me about the sea."}]


def _settled(acc, timeout: float = 5.0) -> None:
    """Wait until every authorized request is booked or released (answers are booked after being sent)."""
    deadline = time.monotonic() + timeout
    while acc.authorized != acc.booked + acc.cancelled:
        assert time.monotonic() < deadline, (acc.authorized, acc.booked, acc.cancelled)
        time.sleep(0.01)


@pytest.fixture(scope="module")
def oai(dev_node):
    client = openai.OpenAI(base_url=dev_node.base_url + "/v1", api_key="dev-has-no-keys", max_retries=0, timeout=60)
    yield client
    client.close()


def test_models_list_base_and_every_adapter_folder(oai, dev_node):
    models = {m.id: m for m in oai.models.list().data}
    assert set(models) == {dev_node.node.model_id, "alpha", "beta"}
    alpha = models["alpha"].model_dump()
    assert alpha["parent"] == dev_node.node.model_id
    assert alpha["openlora"]["rank"] == 4 and alpha["openlora"]["kind"] == "adapter"
    assert oai.models.retrieve("beta").id == "beta"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gamma")


def test_models_carry_registry_metadata_when_the_node_has_it(dev_node):
    calls = []

    async def adapter_metadata(name):  # the registry sync's hook: on-chain id, owner, prices
        calls.append(name)
        return {"adapter_id": 11, "owner": "0x" + "1" * 40} if name == "alpha" else None

    dev_node.app.state.adapter_metadata = adapter_metadata
    try:
        with dev_node.client() as c:
            cards = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    finally:
        del dev_node.app.state.adapter_metadata
    assert sorted(calls) == ["alpha", "beta"]
    assert cards["alpha"]["openlora"]["registry"] == {"adapter_id": 11, "owner": "0x" + "1" * 40}
    assert "registry" not in cards["beta"]["openlora"]


def test_chat_completion_with_base_model_reports_usage_and_receipt(oai, dev_node):
    raw = oai.chat.completions.with_raw_response.create(model=dev_node.node.model_id, messages=MSG,
                                                        max_tokens=7, temperature=0)
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert len(resp.choices) == 1 and resp.choices[0].message.role == "assistant"
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert 1 <= resp.usage.completion_tokens <= 7
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    rid = raw.headers["x-request-id"]
    assert raw.headers["x-openlora-receipt"] == f"dev-{rid}" == resp.model_extra["receipt_id"]
    assert resp.id == f"chatcmpl-{rid}"


def test_adapter_changes_the_answer_and_is_reproducible(oai, dev_node):
    def greedy(model):
        return oai.completions.create(model=model, prompt="The sea is", max_tokens=12, temperature=0).choices[0].text

    base, alpha, beta = greedy(dev_node.node.model_id), greedy("alpha"), greedy("beta")
    assert alpha != base and beta != base and alpha != beta
    assert greedy("alpha") == alpha  # same request, same tokens


def test_seed_makes_sampling_reproducible(oai):
    def sample(seed):
        return oai.chat.completions.create(model="alpha", messages=MSG, max_tokens=10, temperature=1.0,
                                           seed=seed).choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_n_choices_and_stop_string(oai):
    resp = oai.completions.create(model="beta", prompt="Once upon a time", max_tokens=6, n=3, temperature=1.0,
                                  seed=3)
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in resp.choices)
    assert len({c.text for c in resp.choices}) > 1  # three samples of one seeded request differ
    assert 3 <= resp.usage.completion_tokens <= 18

    full = oai.completions.create(model="beta", prompt="Once upon a time", max_tokens=12, temperature=0).choices[0]
    # a stop string taken from the middle of the greedy answer cuts it there
    cut = full.text[len(full.text) // 2:][:3]
    assert cut
    stopped = oai.completions.create(model="beta", prompt="Once upon a time", max_tokens=12, temperature=0,
                                     stop=[cut]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:full.text.index(cut)]


def test_logprobs_chat_and_completion(oai):
    chat = oai.chat.completions.create(model="alpha", messages=MSG, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert tok.logprob == pytest.approx(max(t.logprob for t in tok.top_logprobs), abs=1e-5)
    assert "".join(t.token for t in content) == chat.choices[0].message.content

    comp = oai.completions.create(model="alpha", prompt="The sea is", max_tokens=4, temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == comp.choices[0].text


def test_penalties_change_greedy_output(oai):
    plain = oai.completions.create(model="alpha", prompt="the the the", max_tokens=16, temperature=0)
    penalized = oai.completions.create(model="alpha", prompt="the the the", max_tokens=16, temperature=0,
                                       frequency_penalty=2.0, presence_penalty=2.0)
    assert plain.choices[0].text != penalized.choices[0].text


def test_streaming_chat_deltas_add_up_and_end_with_usage(oai, dev_node):
    whole = oai.chat.completions.create(model="beta", messages=MSG, max_tokens=10, temperature=0)
    stream = oai.chat.completions.create(model="beta", messages=MSG, max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == whole.usage.completion_tokens
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    assert last.model_extra["receipt_id"].startswith("dev-")
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_without_include_usage_still_ends_with_usage_raw_sse(dev_node):
    body = {"model": "alpha", "prompt": "Hello there", "max_tokens": 5, "temperature": 0, "stream": True, "n": 2}
    with dev_node.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        receipt = r.headers["x-openlora-receipt"]
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in p for p in payloads[:-1])
    final = payloads[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 10
    assert final["receipt_id"] == receipt
    texts = {0: "", 1: ""}
    for p in payloads[:-1]:
        for ch in p["choices"]:
            texts[ch["index"]] += ch["text"]
    assert all(texts.values())


def test_fused_mix_extension(dev_node):
    base = {"model": dev_node.node.model_id, "prompt": "The sea is", "max_tokens": 10, "temperature": 0}
    with dev_node.client() as c:
        alpha = c.post("/v1/completions", json={**base, "model": "alpha"}).json()["choices"][0]["text"]
        single = c.post("/v1/completions", json={**base, "adapters": [{"name": "alpha"}]}).json()
        assert single["choices"][0]["text"] == alpha
        mixes = {}
        for fusion in ("linear", "ties", "dare"):
            r = c.post("/v1/completions", json={**base, "fusion": fusion,
                                               "adapters": [{"name": "alpha", "weight": 0.7},
                                                            {"name": "beta", "weight": 0.3}]})
            assert r.status_code == 200, r.text
            mixes[fusion] = r.json()["choices"][0]["text"]
        assert mixes["linear"] != alpha
        # fused mixes are served and booked once per request; the dev accountant saw the weights
        _settled(dev_node.node.accountant)  # an answer is booked just after it was sent
        usage = dev_node.node.accountant.completed[-1]
        assert [(a.name, a.weight) for a in usage.adapters] == [("alpha", 0.7), ("beta", 0.3)]
        assert usage.fusion == "dare"
        assert usage.adapters[0].influence["tokens"] > 0

        bad = c.post("/v1/completions", json={**base, "adapters": [{"name": "alpha"}, {"name": "nope"}]})
        assert bad.status_code == 404 and bad.json()["error"]["param"] == "adapters[1].name"
        dup = c.post("/v1/completions", json={**base, "adapters": [{"name": "alpha"}, {"name": "alpha"}]})
        assert dup.status_code == 400
        wrong_model = c.post("/v1/completions", json={**base, "model": "beta", "adapters": [{"name": "alpha"}]})
        assert wrong_model.status_code == 400 and wrong_model.json()["error"]["param"] == "model"
        bad_fusion = c.post("/v1/completions", json={**base, "fusion": "average",
                                                    "adapters": [{"name": "alpha"}]})
        assert bad_fusion.status_code == 422


def test_unknown_model_is_404_in_openai_shape(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="no-such-adapter", messages=MSG, max_tokens=3)
    err = e.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model" and "no-such-adapter" in err["message"]


def test_unknown_adapter_resolved_through_registry_hook(dev_node, tmp_path, tiny_llama_dir, make_adapter):
    """app.state.resolve_unknown (the registry sync's hook) is asked about names the node does not know."""
    asked = []

    async def resolve_unknown(name):
        asked.append(name)
        if name != "gamma":
            return False
        path = make_adapter(tiny_llama_dir, tmp_path / name, seed=5)
        dev_node.node.engine.register_adapter(name, path)
        return True

    dev_node.app.state.resolve_unknown = resolve_unknown
    try:
        with dev_node.client() as c:
            r = c.post("/v1/completions", json={"model": "gamma", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200, r.text
            acc = dev_node.node.accountant
            _settled(acc)
            booked, cancelled = acc.booked, acc.cancelled
            r = c.post("/v1/completions", json={"model": "delta", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            # asked only after authorization; the refusal released the reservation and booked nothing
            assert (acc.booked, acc.cancelled) == (booked, cancelled + 1)
            r = c.post("/v1/completions", json={"model": "gamma", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200
    finally:
        del dev_node.app.state.resolve_unknown
        dev_node.node.engine.adapters.unregister("gamma")
    assert asked == ["gamma", "delta"]  # the second gamma request found it registered


def test_streamed_logprobs_match_the_non_streamed_ones(oai):
    kw = dict(model="beta", messages=MSG, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    whole = oai.chat.completions.create(**kw).choices[0].logprobs.content
    streamed = [t for c in oai.chat.completions.create(**kw, stream=True) if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in whole]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in whole], abs=1e-5)
