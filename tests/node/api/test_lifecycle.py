"""Loading (503), a full queue (429), client disconnects (abort at once), and clean start/stop."""

from __future__ import annotations

import json
import threading
import time

from node.app import default_engine_factory

CHAT = "/v1/chat/completions"
LONG = {"model": "alpha", "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 400,
        "temperature": 1.0, "seed": 1, "stream": True, "ignore_eos": True}
SHORT = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _wait_for(predicate, timeout=30.0):  # generous: CI machines are shared
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def _first_token(lines) -> dict:
    """Read up to the first chunk carrying generated text (the engine has run prefill by then).
    The caller keeps `lines` (response.iter_lines()) referenced: a line iterator that is garbage
    collected closes the connection, which the server rightly takes as the client leaving."""
    for line in lines:
        if line.startswith("data: "):
            event = json.loads(line[6:])
            if any(c.get("delta", {}).get("content") for c in event["choices"]):
                return event
    raise AssertionError("stream ended without a token")


def test_503_while_the_model_loads_then_ready(serve_node, node_settings):
    gate = threading.Event()

    def slow_factory(settings):  # the real engine, held back until the test has looked at the loading node
        assert gate.wait(60)
        return default_engine_factory(settings)

    with serve_node(node_settings(), wait_ready=False, engine_factory=slow_factory) as served:
        with served.client() as c:
            assert c.get("/healthz").status_code == 200  # alive while loading
            for r in (c.get("/readyz"), c.get("/v1/models"), c.post(CHAT, json=SHORT)):
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "loading"
                assert int(r.headers["retry-after"]) >= 1
            assert served.node.accountant.authorized == 0
            gate.set()
            _wait_for(lambda: c.get("/readyz").status_code == 200, 60)
            assert c.post(CHAT, json=SHORT).status_code == 200
            engine = served.node.engine
    # leaving the context stopped uvicorn, which ran the lifespan's shutdown: the engine's step loop and
    # the adapter cache's loader thread are gone
    assert engine.async_engine._loop_task is None
    assert not engine.adapters._worker.is_alive()
    assert not served.node.ready


def test_load_failure_is_reported_as_503_with_the_reason(serve_node, node_settings, tmp_path):
    with serve_node(node_settings(model=str(tmp_path)), wait_ready=False) as served, served.client() as c:
        _wait_for(lambda: served.node.load_error is not None)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_load_failed"
        assert "config.json" in r.json()["error"]["message"]


def test_client_disconnect_aborts_and_frees_kv_blocks(dev_node):
    node = dev_node.node
    engine = node.engine
    free_before = engine.engine.block_manager.num_free_blocks
    cancelled_before, booked_before = node.accountant.cancelled, node.accountant.booked
    with dev_node.client() as c, c.stream("POST", CHAT, json=LONG) as r:
        assert r.status_code == 200
        _first_token(lines := r.iter_lines())
        assert engine.in_flight == 1
        assert engine.engine.block_manager.num_free_blocks < free_before  # its KV is allocated
    # the client is gone after a few tokens of 400: the engine must drop the request right away
    _wait_for(lambda: engine.in_flight == 0)
    _wait_for(lambda: engine.engine.block_manager.num_free_blocks == free_before)
    assert not engine.engine.requests
    assert node.accountant.cancelled == cancelled_before + 1
    assert node.accountant.booked == booked_before  # nothing billable recorded


def test_non_streaming_disconnect_aborts_too(dev_node):
    import httpx

    node = dev_node.node
    engine = node.engine
    cancelled_before = node.accountant.cancelled
    body = {**LONG, "stream": False}
    with httpx.Client(base_url=dev_node.base_url, timeout=0.5) as c:
        try:
            c.post(CHAT, json=body)
        except httpx.ReadTimeout:
            pass  # the client gives up and closes the connection while the engine is generating
    _wait_for(lambda: node.accountant.cancelled == cancelled_before + 1)
    _wait_for(lambda: engine.in_flight == 0)


def test_full_queue_is_429_with_retry_after(serve_node, node_settings):
    with serve_node(node_settings(max_queued_requests=1)) as served, served.client() as c:
        with c.stream("POST", CHAT, json=LONG) as r:
            _first_token(lines := r.iter_lines())
            assert served.node.engine.in_flight == 1
            refused = c.post(CHAT, json=SHORT)
            assert refused.status_code == 429
            assert refused.json()["error"]["type"] == "rate_limit_error"
            assert int(refused.headers["retry-after"]) >= 1
            assert served.node.accountant.authorized == 1  # the refused one reserved nothing
        _wait_for(lambda: served.node.engine.in_flight == 0)
        assert c.post(CHAT, json=SHORT).status_code == 200
