"""The paid node over HTTP: a real uvicorn server with the tiny model, a real anvil, a real SQLite ledger.

Sign in, deposit, paid chat completions (streaming and not) through the official openai client with the
voucher helper, 402 on a short balance, an adapter pulled from the registry on first use and verified, a
tampered one refused, settlement on chain, receipts with Merkle proofs, rewards queried and claimed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time

import httpx
import openai
import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from attribution.receipts import verify_signed_json
from chainkit import BASE_MODEL, send
from node import keys
from node.app import create_app
from node.client import VoucherAuth
from node.config import Settings
from node.payments import VOUCHER_HEADER, encode_voucher_header, sign_voucher
from node.registry import pack_adapter
from paidnode import make_lora

PASSWORD = "test password"
MESSAGES = [{"role": "user", "content": "Say hello"}]


class Server:
    def __init__(self, app):
        import socket

        import uvicorn

        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 180
        with httpx.Client(base_url=self.url) as c:
            while True:
                assert time.monotonic() < deadline and self.thread.is_alive(), "node did not become ready"
                if self.server.started and c.get("/readyz").status_code == 200:
                    break
                assert app.state.node.load_error is None, app.state.node.load_error
                time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def node(chain, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("paid-node")
    os.environ[keys.PASSWORD_ENV] = PASSWORD
    keys.create_keystore(root / "node-key.json", PASSWORD, private_key=chain.node_key)
    chain.extra["deployment"].save(root / "deployment.json")
    owner = chain.anvil.funded_key()
    pub = root / "published"
    pub.mkdir()
    sha = pack_adapter(make_lora(tiny_llama_dir, root / "src" / "pirate", 1), pub / "pirate.tar.gz")
    send(chain.w3, owner, chain.adapters.functions.registerAdapter(
        ("pirate", BASE_MODEL, bytes.fromhex(sha), (pub / "pirate.tar.gz").as_uri(), 0, 1_000_000, 3_000_000, 8000, 0, 2000)))
    pack_adapter(make_lora(tiny_llama_dir, root / "src" / "forged", 2), pub / "forged.tar.gz")
    send(chain.w3, owner, chain.adapters.functions.registerAdapter(
        ("forged", BASE_MODEL, hashlib.sha256(b"registered content").digest(), (pub / "forged.tar.gz").as_uri(), 0,
         1, 1, 10000, 0, 0)))
    (root / "store").mkdir()
    settings = Settings(model=str(tiny_llama_dir), served_model_name=BASE_MODEL, adapter_dir=root / "store", dev=False,
                        device="cpu", data_dir=root, node_id=chain.node_id, rpc_url=chain.anvil.url,
                        deployment_file=root / "deployment.json", keystore_file=root / "node-key.json",
                        settle_confirmations=1, settle_interval_s=3600, registry_sync_s=3600,
                        base_price_per_m_input=1_000_000, base_price_per_m_output=2_000_000, escrow_cache_s=0,
                        engine_max_num_seqs=8, engine_num_lora_slots=2, engine_max_lora_rank=8, log_json=False)
    server = Server(create_app(settings))
    try:
        yield server, owner
    finally:
        server.stop()
        os.environ.pop(keys.PASSWORD_ENV, None)


def paying_client(server, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(auth=VoucherAuth(key), timeout=120))


def test_openai_client_pays_per_request_streaming_and_not(node, chain):
    server, _owner = node
    payer = chain.payer(deposit=10**9)
    client = paying_client(server, payer)
    # first use of 'pirate' pulls it from the registry (cold start) and verifies its sha256
    r = client.chat.completions.create(model="pirate", messages=MESSAGES, max_tokens=6)
    rid = r.model_extra["receipt_id"]
    doc = httpx.get(f"{server.url}/v1/receipts/{rid}").json()
    v = verify_signed_json(doc)
    assert v.signer == Account.from_key(chain.node_key).address.lower() == doc["signer"]
    assert v.receipt.payer == Account.from_key(payer).address.lower()
    assert v.receipt.cost == r.usage.prompt_tokens * 1 + r.usage.completion_tokens * 3
    assert doc["settlement"] is None
    chunks = list(client.chat.completions.create(model="pirate", messages=MESSAGES, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    srid = next(c.model_extra.get("receipt_id") for c in reversed(chunks) if c.model_extra.get("receipt_id"))
    assert srid != rid and httpx.get(f"{server.url}/v1/receipts/{srid}").status_code == 200
    bal = httpx.get(f"{server.url}/v1/payers/{Account.from_key(payer).address}").json()
    assert int(bal["reserved"]) == 0 and int(bal["billed"]) > 0
    assert int(bal["voucher_cumulative_value"]) >= int(bal["billed"])


def test_short_balance_and_bad_vouchers_are_402(node, chain):
    server, _ = node
    domain = httpx.get(f"{server.url}/v1/payers/{Account.create().address}").json()["eip712_domain"]
    from attribution.eip712 import Domain
    dom = Domain(domain["chainId"], domain["verifyingContract"])
    poor = chain.payer(deposit=3)
    hdr = encode_voucher_header(sign_voucher(dom, poor, chain.node_id, 10**9))
    body = {"model": BASE_MODEL, "messages": MESSAGES, "max_tokens": 8}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={VOUCHER_HEADER: hdr}, timeout=60)
    assert r.status_code == 402 and "insufficient escrow: available 3" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={VOUCHER_HEADER: "bm9wZQ=="}, timeout=60)
    assert r.status_code == 402 and "must be base64 of a JSON voucher" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 401
    with pytest.raises(openai.APIStatusError) as e:  # the helper learns the price, the escrow still refuses
        paying_client(server, poor).chat.completions.create(model=BASE_MODEL, messages=MESSAGES, max_tokens=8)
    assert e.value.status_code == 402 and e.value.body["code"] == "insufficient_escrow"
    rich = chain.payer(deposit=10**9)
    limited = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                            http_client=httpx.Client(auth=VoucherAuth(rich, max_cumulative=5), timeout=60))
    with pytest.raises(openai.APIConnectionError):  # it never promises past its own limit
        limited.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, max_tokens=8)
    bal = httpx.get(f"{server.url}/v1/payers/{Account.from_key(rich).address}").json()
    assert bal["voucher_cumulative_value"] == "0" and bal["billed"] == "0"


def test_tampered_adapter_is_never_served(node, chain):
    server, _ = node
    payer = chain.payer(deposit=10**6)
    with pytest.raises(openai.NotFoundError):
        paying_client(server, payer).chat.completions.create(model="forged", messages=MESSAGES, max_tokens=4)
    assert not (server.app.state.node.settings.resolved_adapter_dir / "forged").exists()


def test_sign_in_gives_an_api_key_that_pays(node, chain):
    server, _ = node
    payer = chain.payer(deposit=10**9)
    addr = Account.from_key(payer).address
    with httpx.Client(base_url=server.url, timeout=120) as c:
        ch = c.post("/v1/auth/challenge", json={"address": addr}).json()
        assert f"Nonce: {ch['nonce']}" in ch["message"] and addr in ch["message"]
        sig = Account.sign_message(encode_defunct(text=ch["message"]), payer).signature.hex()
        d = ch["eip712_domain"]
        from attribution.eip712 import Domain
        sv = sign_voucher(Domain(d["chainId"], d["verifyingContract"]), payer, ch["node_id"], 10**6)
        login = {"message": ch["message"], "signature": "0x" + sig.removeprefix("0x"), "voucher": sv.to_json()}
        wrong = c.post("/v1/auth/login", json={**login, "signature": "0x" + "11" * 65})
        assert wrong.status_code == 401
        r = c.post("/v1/auth/login", json=login)
        assert r.status_code == 200, r.text
        key = r.json()["api_key"]
        assert c.post("/v1/auth/login", json=login).status_code == 401  # a challenge is single-use
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    out = client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, max_tokens=4)
    assert out.model_extra["receipt_id"].startswith("rcpt-")
    u = httpx.get(f"{server.url}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert u["requests"] == 1 and int(u["cost"]) == out.usage.prompt_tokens + 2 * out.usage.completion_tokens


def test_settlement_receipt_proof_rewards_and_claim(node, chain):
    server, owner = node
    payer = chain.payer(deposit=10**9)
    r = paying_client(server, payer).chat.completions.create(model="pirate", messages=MESSAGES, max_tokens=4)
    rid = r.model_extra["receipt_id"]
    # the answer is booked just after its body is sent; fetching the receipt waits for that booking
    assert httpx.get(f"{server.url}/v1/receipts/{rid}").status_code == 200
    money = server.app.state.node.extras["money"]
    states = money.settler.settle_now(timeout_s=60)
    assert states and all(s == "confirmed" for s in states.values())
    st = httpx.get(f"{server.url}/v1/settlements").json()
    assert st["unbatched_receipts"] == 0 and {b["status"] for b in st["batches"]} == {"confirmed"}
    doc = httpx.get(f"{server.url}/v1/receipts/{rid}").json()
    s = doc["settlement"]
    assert s["settled"] is True
    msg = doc["typedData"]["message"]
    args = (bytes.fromhex(msg["requestId"][2:]), msg["payer"], msg["nodeId"], msg["adapterIds"], msg["inputTokens"],
            msg["outputTokens"], msg["cost"], bytes.fromhex(msg["attributionDigest"][2:]), msg["timestamp"])
    assert chain.settlement.functions.verifyReceipt(chain.node_id, bytes.fromhex(s["batch_id"][2:]), args,
                                                    bytes.fromhex(doc["signature"][2:]),
                                                    [bytes.fromhex(p[2:]) for p in s["proof"]]).call()
    owner_addr = Account.from_key(owner).address
    rw = httpx.get(f"{server.url}/v1/rewards/{owner_addr}").json()
    assert int(rw["pending"]) == 0 and int(rw["settled"]) > 0 and rw["claimable_on_chain"] == rw["settled"]
    earned = httpx.get(f"{server.url}/v1/usage/adapters/1").json()
    assert earned["requests"] >= 1 and int(earned["cost"]) > 0
    before = chain.token.functions.balanceOf(owner_addr).call()
    send(chain.w3, owner, chain.settlement.functions.claim())
    assert chain.token.functions.balanceOf(owner_addr).call() == before + int(rw["settled"])
    assert httpx.get(f"{server.url}/v1/rewards/{owner_addr}").json()["claimable_on_chain"] == "0"
