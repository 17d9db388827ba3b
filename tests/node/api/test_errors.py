"""Refusals: OpenAI-shaped error bodies with the right status, no traces, and nothing changed by them;
and the OpenAPI schema declares what the routes answer."""

from __future__ import annotations

import time

import pytest

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def _snapshot(node):
    acc, eng = node.accountant, node.engine
    return (acc.authorized, acc.booked, acc.cancelled, eng.in_flight, eng.engine.block_manager.num_free_blocks)


def _assert_openai_error(r, status, *, param=None, code=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and isinstance(body["error"]["type"], str)
    assert "Traceback" not in r.text and 'File "' not in r.text
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def _settle(node, before, timeout=5.0):
    # a refused request must leave the counters exactly where they were
    deadline = time.monotonic() + timeout
    while _snapshot(node) != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _snapshot(node) == before


BAD_REQUESTS = [
    # (body, status, param)
    ({"model": "alpha"}, 422, "messages"),
    ({"model": "alpha", "messages": MSG, "temperature": 5}, 422, "temperature"),
    ({"model": "alpha", "messages": MSG, "n": 0}, 422, "n"),
    ({"model": "alpha", "messages": [{"role": "wizard", "content": "x"}]}, 422, "messages.0.role"),
    ({"model": "alpha", "messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": "alpha", "messages": MSG, "max_tokens": 10_000}, 400, "max_tokens"),
    ({"model": "nope", "messages": MSG}, 404, "model"),
    ({"model": "../alpha", "messages": MSG}, 404, "model"),
    ({"model": "alpha", "messages": [{"role": "user", "content": "sea " * 600}]}, 413, "messages"),
    ({"model": "alpha", "messages": MSG, "fusion": "ties"}, 400, "fusion"),
    ({"model": "alpha", "messages": MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 422, None),
    ({"model": "alpha", "messages": MSG, "response_format": {"type": "json_object"}}, 422, None),
]


@pytest.mark.parametrize("body,status,param", BAD_REQUESTS, ids=[f"{b[1]}-{b[2]}" for b in BAD_REQUESTS])
def test_bad_chat_requests_get_openai_errors_and_change_nothing(dev_node, body, status, param):
    before = _snapshot(dev_node.node)
    with dev_node.client() as c:
        _assert_openai_error(c.post(CHAT, json=body), status, param=param)
    _settle(dev_node.node, before)


def test_malformed_json_and_wrong_method_and_unknown_path(dev_node):
    with dev_node.client() as c:
        _assert_openai_error(c.post(CHAT, content=b"{not json", headers={"content-type": "application/json"}), 422)
        _assert_openai_error(c.get(CHAT), 405)
        _assert_openai_error(c.get("/v1/nothing-here"), 404)


def test_body_over_the_limit_is_413_declared_or_streamed(dev_node):
    before = _snapshot(dev_node.node)
    huge = {"model": "alpha", "messages": [{"role": "user", "content": "x" * (dev_node.settings.max_request_bytes + 10)}]}
    with dev_node.client() as c:
        _assert_openai_error(c.post(CHAT, json=huge), 413, code="request_too_large")

        def chunks():  # no Content-Length: the limit is enforced while the body arrives
            yield b'{"model": "alpha", "messages": [{"role": "user", "content": "'
            for _ in range(dev_node.settings.max_request_bytes // 65536 + 2):
                yield b"y" * 65536
            yield b'"}]}'

        _assert_openai_error(c.post(CHAT, content=chunks(), headers={"content-type": "application/json"}), 413)
    _settle(dev_node.node, before)


def test_openapi_schema_declares_what_is_served(dev_node):
    """For a few endpoints: each status code we provoke is declared in app.openapi() for that route,
    with the OpenAI error schema on error statuses."""
    schema = dev_node.app.openapi()
    paths = schema["paths"]
    with dev_node.client() as c:
        observed = {
            ("post", "/v1/chat/completions"): {
                c.post(CHAT, json={"model": "alpha", "messages": MSG, "max_tokens": 2}).status_code,
                c.post(CHAT, json={"model": "alpha"}).status_code,
                c.post(CHAT, json={"model": "zzz", "messages": MSG}).status_code,
                c.post(CHAT, json={"model": "alpha", "messages": MSG, "max_tokens": 10_000}).status_code,
            },
            ("post", "/v1/completions"): {
                c.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2}).status_code,
                c.post("/v1/completions", json={"model": "alpha", "prompt": "sea " * 600}).status_code,
            },
            ("get", "/v1/models"): {c.get("/v1/models").status_code},
            ("get", "/v1/models/{model_id}"): {c.get("/v1/models/alpha").status_code,
                                               c.get("/v1/models/zzz").status_code},
            ("get", "/readyz"): {c.get("/readyz").status_code},
        }
    assert observed[("post", "/v1/chat/completions")] == {200, 422, 404, 400}
    assert observed[("post", "/v1/completions")] == {200, 413}
    for (method, path), statuses in observed.items():
        declared = paths[path][method]["responses"]
        for status in statuses:
            assert str(status) in declared, f"{method.upper()} {path} answers {status} but does not declare it"
            if status >= 400:
                ref = declared[str(status)]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse") or ref.endswith("/HTTPValidationError")
    # validation errors are served in the OpenAI shape: the schema must say so too
    v422 = paths["/v1/chat/completions"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert v422["$ref"].endswith("/ErrorResponse")
    stream = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert "text/event-stream" in stream and "application/json" in stream
