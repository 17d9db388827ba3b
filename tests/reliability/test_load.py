"""Load on the paid node (real uvicorn, tiny model, real anvil and SQLite): 50 concurrent streaming
clients against a queue limit of 12. Refusals must be 429 with Retry-After (never a crash or a 5xx), the
engine must never hold more than the limit, and every stream that completes must carry every token once
(logprobs entries = usage.completion_tokens = max_tokens, text = the tokens' text) and exactly one
receipt, booked once in the ledger. Latency is measured by benchmarks/load.py, not asserted here."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from attribution.eip712 import Domain
from harness import ledger_rows, record
from node.payments import VOUCHER_HEADER, encode_voucher_header, sign_voucher

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "node" / "payments"))
from test_http import Server  # noqa: E402

CLIENTS = 50
LIMIT = 12
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def loaded_node(chain, tiny_llama_dir, tmp_path_factory):
    from node import keys
    from node.app import create_app
    from node.config import Settings

    root = tmp_path_factory.mktemp("load-node")
    os.environ[keys.PASSWORD_ENV] = "pw"
    keys.create_keystore(root / "node-key.json", "pw", private_key=chain.node_key)
    chain.extra["deployment"].save(root / "deployment.json")
    (root / "store").mkdir()
    settings = Settings(model=str(tiny_llama_dir), served_model_name="smollm2-135m-instruct", adapter_dir=root / "store",
                        dev=False, device="cpu", data_dir=root, node_id=chain.node_id, rpc_url=chain.anvil.url,
                        deployment_file=root / "deployment.json", keystore_file=root / "node-key.json",
                        settle_confirmations=1, settle_interval_s=3600, registry_sync_s=3600,
                        base_price_per_m_input=1_000_000, base_price_per_m_output=2_000_000, escrow_cache_s=5,
                        engine_max_num_seqs=8, engine_num_lora_slots=2, engine_max_lora_rank=8, log_json=False,
                        max_queued_requests=LIMIT)
    server = Server(create_app(settings))
    try:
        yield server, root
    finally:
        server.stop()
        os.environ.pop(keys.PASSWORD_ENV, None)


async def one_client(c: httpx.AsyncClient, i: int, hdr: dict, out: dict, deadline: float) -> None:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": f"client {i}: tell a story"}],
            "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True, "logprobs": True, "temperature": 0.7, "seed": i,
            "stream_options": {"include_usage": True}}
    refusals = 0
    while time.monotonic() < deadline:
        async with c.stream("POST", "/v1/chat/completions", json=body, headers=hdr) as r:
            if r.status_code == 429:
                refusals += 1
                await r.aread()
                assert r.json()["error"]["code"] == "queue_full"
                await asyncio.sleep(float(r.headers["retry-after"]) * 0.2)  # bounded by the deadline
                continue
            assert r.status_code == 200, (r.status_code, await r.aread())
            header_receipt = r.headers["x-openlora-receipt"]
            text, tokens, usage, receipts, done = "", [], None, [], False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                ev = json.loads(line[6:])
                assert "error" not in ev, ev
                for ch in ev["choices"]:
                    text += ch["delta"].get("content") or ""
                    tokens += [t["token"] for t in (ch.get("logprobs") or {}).get("content") or []]
                if ev.get("usage"):
                    usage = ev["usage"]
                if ev.get("receipt_id"):
                    receipts.append(ev["receipt_id"])
            out[i] = dict(text=text, tokens=tokens, usage=usage, receipts=receipts, header=header_receipt, done=done,
                          refusals=refusals)
            return
    out[i] = dict(refusals=refusals, timed_out=True)


def test_fifty_concurrent_streams_get_every_token_and_one_receipt_each(loaded_node, chain):
    server, root = loaded_node
    engine = server.app.state.node.engine
    key = chain.payer(deposit=10**12)
    dom = Domain(chain.chain_id, chain.settlement.address)
    hdr = {VOUCHER_HEADER: encode_voucher_header(sign_voucher(dom, key, chain.node_id, 10**12))}
    peak = {"in_flight": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["in_flight"] = max(peak["in_flight"], engine.in_flight)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out: dict[int, dict] = {}

    async def main():
        limits = httpx.Limits(max_connections=CLIENTS + 5, max_keepalive_connections=CLIENTS + 5)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            deadline = time.monotonic() + 150
            await asyncio.gather(*(one_client(c, i, hdr, out, deadline) for i in range(CLIENTS)))

    t0 = time.monotonic()
    asyncio.run(main())
    stop.set()
    sampler.join(5)
    elapsed = time.monotonic() - t0
    assert peak["in_flight"] <= LIMIT, f"engine held {peak['in_flight']} requests, limit {LIMIT}"
    finished = [v for v in out.values() if not v.get("timed_out")]
    assert len(finished) == CLIENTS, f"{CLIENTS - len(finished)} clients never got in"
    refusals = sum(v["refusals"] for v in out.values())
    assert refusals > 0, "50 clients against a limit of 12 were never told to back off"
    for v in finished:
        assert v["done"] and v["usage"]["completion_tokens"] == MAX_TOKENS == len(v["tokens"])
        assert "".join(v["tokens"]) == v["text"]  # no token lost or sent twice between chunks
        assert v["receipts"] == [v["header"]]
    ids = [v["header"] for v in finished]
    assert len(set(ids)) == len(ids)
    rows = ledger_rows(root / "ledger.db")
    booked = Counter(r[0] for r in rows["receipts"])
    assert all(booked[i] == 1 for i in ids) and len(booked) == len(ids)
    money = server.app.state.node.extras["money"]
    assert money.gate.reserved(Account.from_key(key).address.lower()) == 0
    assert engine.in_flight == 0
    record("load", "concurrent streaming clients", f"{CLIENTS} streams (ignore_eos, {MAX_TOKENS} tokens, logprobs) against "
           f"max_queued_requests={LIMIT}",
           f"all {CLIENTS} completed in {elapsed:.0f} s after {refusals} 429s with Retry-After; peak engine in-flight "
           f"{peak['in_flight']} <= {LIMIT}; every token once; {len(ids)} receipts, each booked once; no reservation left")
