"""Request ids, /healthz, /metrics (requests, tokens, TTFT, inter-token latency, queue depth, adapter
cache, payments gauges) and structured logs without key material."""

from __future__ import annotations

import json
import logging
import re
import time

from node.logging import JsonFormatter, redact


def _metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", re.M)
    for m in pattern.finditer(text):
        got = (m.group(1) or "").strip("{}")
        if all(f'{k}="{v}"' in got for k, v in labels.items()) or (not want and not got):
            return float(m.group(2))
    raise AssertionError(f"{name}{{{want}}} not in metrics")


def test_request_ids_are_ours_and_the_clients_comes_back_beside_them(dev_node):
    with dev_node.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        r = c.get("/healthz", headers={"X-Request-ID": "abc-123"})
        # the id keys ledger rows and receipts: never the client's choice, which is echoed separately
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
        assert r.headers["x-client-request-id"] == "abc-123"
        ids = {c.get("/healthz", headers={"X-Request-ID": "same"}).headers["x-request-id"] for _ in range(3)}
        assert len(ids) == 3
        # a client id that could inject into logs or headers is dropped
        bad = c.get("/healthz", headers={"X-Request-ID": "x" * 100})
        assert "x-client-request-id" not in bad.headers
        # errors carry ids too
        err = c.get("/nope", headers={"X-Request-ID": "err-1"})
        assert err.status_code == 404 and err.headers["x-client-request-id"] == "err-1"
        assert re.fullmatch(r"[0-9a-f]{32}", err.headers["x-request-id"])


def test_metrics_count_requests_tokens_and_latencies(dev_node):
    with dev_node.client() as c:
        before = c.get("/metrics").text
        body = {"model": "beta", "prompt": "Hello", "max_tokens": 6, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            list(r.iter_lines())
        assert c.post("/v1/completions", json={"model": "zzz", "prompt": "x"}).status_code == 404
        dev_node.node.metrics.pending_receipts.set(7)
        dev_node.node.metrics.settlement_lag.set(42.5)
        after = c.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text

    def delta(name, **labels):
        try:
            old = _metric(before, name, **labels)
        except AssertionError:
            old = 0.0
        return _metric(text, name, **labels) - old

    assert delta("openlora_requests_total", route="/v1/completions", status="200") == 1
    assert delta("openlora_requests_total", route="/v1/completions", status="404") == 1
    assert delta("openlora_completion_tokens_total") == 6
    assert delta("openlora_prompt_tokens_total") >= 1
    assert delta("openlora_time_to_first_token_seconds_count") == 1
    assert delta("openlora_inter_token_latency_seconds_count") >= 1
    assert _metric(text, "openlora_queue_depth", state="waiting") == 0
    assert _metric(text, "openlora_adapter_cache_misses_total", tier="disk_to_host") >= 1
    assert _metric(text, "openlora_adapter_load_ms_total", tier="host_to_device") > 0
    assert _metric(text, "openlora_pending_receipts") == 7
    assert _metric(text, "openlora_settlement_lag_seconds") == 42.5


def test_logs_are_json_with_request_id_and_no_keys(dev_node, caplog):
    secret = "sk-live-abcdefghijklmnop1234"
    with caplog.at_level(logging.INFO, logger="openlora"), dev_node.client() as c:
        r = c.post("/v1/chat/completions", headers={"Authorization": f"Bearer {secret}", "X-Request-ID": "log-7"},
                   json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        # the access line is written once the response has gone out: give the server thread a moment
        deadline = time.monotonic() + 10
        while not any(getattr(rec, "request_id", None) == rid for rec in caplog.records):
            assert time.monotonic() < deadline, "no access log line for the request"
            time.sleep(0.02)
    lines = [JsonFormatter().format(rec) for rec in caplog.records]
    access = [json.loads(line) for line in lines if '"path": "/v1/chat/completions"' in line]
    assert access and access[-1]["request_id"] == rid and access[-1]["status"] == 200
    assert access[-1]["client_request_id"] == "log-7"
    assert all(secret not in line for line in lines)
    # the formatter masks anything shaped like a key even if a message carries one by mistake
    assert secret not in redact(f"Authorization: Bearer {secret}")
    assert "0x" + "ab" * 32 not in redact("key 0x" + "ab" * 32)
