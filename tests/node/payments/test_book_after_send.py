"""A non-streaming paid answer is booked only after its body was handed to the server (issue 9: no payer
is charged for a request it did not get), its receipt is fetchable the moment the client has the answer,
and a 402 carries the amount to sign as a field (`error.required`, `error.node_id`).

Real uvicorn, real anvil, real SQLite; faults are injected at the ASGI boundary around the real app: the
`send` of the answer's body raises (the connection died between the answer being ready and going out), or
the body goes out and the server then stalls before it can book (what a client racing the booking sees).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from eth_account import Account

from attribution import models as m
from attribution.eip712 import Domain
from attribution.receipts import verify_signed_json
from chainkit import BASE_MODEL
from node.client import VoucherAuth
from node.payments import VOUCHER_HEADER, encode_voucher_header, sign_voucher
from paidnode import PaidServer, paid_settings

MESSAGES = [{"role": "user", "content": "Say hello"}]
BODY = {"model": BASE_MODEL, "messages": MESSAGES, "max_tokens": 5, "temperature": 0}
STALL_S = 1.0


class Faults:
    """ASGI wrapper. `x-test-fault: fail`: the answer's body `send` raises; `stall`: the body is sent, then
    the server stalls STALL_S inside `send`. Either way it notes whether the request's receipt was already
    in the ledger when the body went out."""

    def __init__(self, app):
        self.app = app
        self.notes: dict[str, dict] = {}  # receipt id -> what was seen

    def has_receipt(self, rid: str) -> bool:
        db = self.app.state.node.extras["money"].db
        with db.reader.begin() as s:
            return s.get(m.Receipt, rid) is not None

    async def __call__(self, scope, receive, send):
        fault = dict(scope.get("headers", [])).get(b"x-test-fault", b"").decode() if scope["type"] == "http" else ""
        if not fault:
            return await self.app(scope, receive, send)
        note: dict = {}

        async def faulty_send(message):
            if message["type"] == "http.response.start":
                rid = dict(message["headers"]).get(b"x-openlora-receipt")
                if rid:
                    note["rid"] = rid.decode()
                    self.notes[note["rid"]] = note
            elif message["type"] == "http.response.body" and "rid" in note:
                note["receipt_before_body"] = await asyncio.to_thread(self.has_receipt, note["rid"])
                if fault == "fail":
                    raise ConnectionResetError("injected: the connection died before the answer went out")
                # Stamped before the send: once `send` hands the body over the client may already read
                # this note, before this coroutine runs again (a stamp after it raced the test in CI).
                note["body_sent_at"] = time.monotonic()
                await send(message)
                await asyncio.sleep(STALL_S)
                return
            await send(message)

        try:
            await self.app(scope, receive, faulty_send)
        except ConnectionResetError:
            note["send_failed"] = True


@pytest.fixture(scope="module")
def paid(chain, tiny_llama_dir, tmp_path_factory):
    server = PaidServer(paid_settings(chain, tiny_llama_dir, tmp_path_factory.mktemp("paid-node")), asgi=Faults)
    try:
        yield server
    finally:
        server.stop()


def _voucher(chain, key, value: int) -> str:
    return encode_voucher_header(sign_voucher(Domain(chain.chain_id, chain.settlement.address), key, chain.node_id, value))


def _balance(paid, key) -> dict:
    return httpx.get(f"{paid.url}/v1/payers/{Account.from_key(key).address}").json()


def test_an_answer_whose_send_fails_is_not_booked_or_charged(paid, chain):
    key = chain.payer(deposit=10**9)
    with pytest.raises(httpx.TransportError):
        httpx.post(f"{paid.url}/v1/chat/completions", json=BODY, timeout=60,
                   headers={VOUCHER_HEADER: _voucher(chain, key, 10**9), "x-test-fault": "fail"})
    fails = [n for n in paid.asgi.notes.values() if n.get("send_failed")]
    assert len(fails) == 1, paid.asgi.notes
    rid = fails[0]["rid"]
    assert fails[0]["receipt_before_body"] is False
    t0 = time.monotonic()
    r = httpx.get(f"{paid.url}/v1/receipts/{rid}", timeout=30)
    assert r.status_code == 404 and time.monotonic() - t0 < 2  # released, nothing in flight to wait for
    bal = _balance(paid, key)
    assert (bal["billed"], bal["reserved"]) == ("0", "0")
    with paid.money.db.reader.begin() as s:
        assert s.get(m.Request, rid) is None and s.get(m.Receipt, rid) is None
    # the same payer's next request is served and charged once
    ok = httpx.post(f"{paid.url}/v1/chat/completions", json=BODY, timeout=60,
                    headers={VOUCHER_HEADER: _voucher(chain, key, 10**9)})
    assert ok.status_code == 200, ok.text
    assert int(_balance(paid, key)["billed"]) == int(verify_signed_json(
        httpx.get(f"{paid.url}/v1/receipts/{ok.json()['receipt_id']}").json()).receipt.cost)


def test_receipt_is_booked_after_the_body_and_fetchable_as_soon_as_the_answer_arrives(paid, chain):
    key = chain.payer(deposit=10**9)
    r = httpx.post(f"{paid.url}/v1/chat/completions", json=BODY, timeout=60,
                   headers={VOUCHER_HEADER: _voucher(chain, key, 10**9), "x-test-fault": "stall"})
    got_at = time.monotonic()
    assert r.status_code == 200, r.text
    rid = r.json()["receipt_id"]
    assert r.headers["x-openlora-receipt"] == rid and rid.startswith("rcpt-")
    note = paid.asgi.notes[rid]
    assert note["receipt_before_body"] is False  # the body went out before anything was booked
    assert got_at - note["body_sent_at"] < STALL_S  # the client had its answer while the server stalled
    doc = httpx.get(f"{paid.url}/v1/receipts/{rid}", timeout=30)  # waits for the booking in flight
    assert doc.status_code == 200, doc.text
    assert time.monotonic() - got_at > 0.3  # it did have to wait for it
    v = verify_signed_json(doc.json())
    usage = r.json()["usage"]
    assert v.receipt.cost == usage["prompt_tokens"] * 1 + usage["completion_tokens"] * 2
    bal = _balance(paid, key)
    assert int(bal["billed"]) == v.receipt.cost and bal["reserved"] == "0"


def test_normal_answers_receipts_are_fetchable_immediately(paid, chain):
    key = chain.payer(deposit=10**9)
    client = openai.OpenAI(base_url=paid.url + "/v1", api_key="unused", max_retries=0,
                           http_client=httpx.Client(auth=VoucherAuth(key), timeout=120))
    costs = 0
    for _ in range(3):
        out = client.chat.completions.create(model=BASE_MODEL, messages=MESSAGES, max_tokens=3)
        doc = httpx.get(f"{paid.url}/v1/receipts/{out.model_extra['receipt_id']}")
        assert doc.status_code == 200, doc.text
        costs += verify_signed_json(doc.json()).receipt.cost
    bal = _balance(paid, key)
    assert int(bal["billed"]) == costs and bal["reserved"] == "0"


def test_402_carries_the_amount_to_sign_and_the_client_reads_it(paid, chain):
    key = chain.payer(deposit=10**9)
    r = httpx.post(f"{paid.url}/v1/chat/completions", json=BODY, timeout=60,
                   headers={VOUCHER_HEADER: _voucher(chain, key, 1)})
    assert r.status_code == 402, r.text
    err = r.json()["error"]
    assert err["code"] == "voucher_too_low" and err["node_id"] == chain.node_id
    need = int(err["required"])
    assert need > 1 and f"at least {need}" in err["message"]
    short = httpx.post(f"{paid.url}/v1/chat/completions", json=BODY, timeout=60,
                       headers={VOUCHER_HEADER: _voucher(chain, key, need - 1)})
    assert short.status_code == 402 and int(short.json()["error"]["required"]) == need
    exact = httpx.post(f"{paid.url}/v1/chat/completions", json=BODY, timeout=60,
                       headers={VOUCHER_HEADER: _voucher(chain, key, need)})
    assert exact.status_code == 200, exact.text
    poor = chain.payer(deposit=3)
    e = httpx.post(f"{paid.url}/v1/chat/completions", json=BODY, timeout=60,
                   headers={VOUCHER_HEADER: _voucher(chain, poor, 10**9)}).json()["error"]
    assert e["code"] == "insufficient_escrow" and e["available"] == "3" and int(e["max_cost"]) > 3
    # the helper signs what `required` says, whatever the prose around it
    req = httpx.Request("POST", paid.url + "/v1/chat/completions")
    said = httpx.Response(402, json={"error": {"message": "sign more", "type": "insufficient_quota", "param": None,
                                               "code": "voucher_too_low", "required": "123456789012345678901"}},
                          request=req)
    assert VoucherAuth._needed(said) == 123456789012345678901
    old = httpx.Response(402, json={"error": {"message": "needed at least 77 (...)", "code": "voucher_too_low"}},
                         request=req)
    assert VoucherAuth._needed(old) == 77
