"""The Accountant (authorize / complete / cancel) on a real ledger and a real anvil escrow."""

from __future__ import annotations

import asyncio

import pytest
from eth_account import Account
from sqlalchemy import func, select
from starlette.requests import Request

from attribution import models as m
from attribution.payers import create_api_key
from attribution.receipts import recover_signer
from node.accounting import LedgerAccountant
from node.errors import NotFound, PaymentRequired, Unauthorized
from node.payments import VOUCHER_HEADER, encode_voucher_header, sign_voucher
from node.serving_types import AdapterUsage, MaxCostInput, Usage


def http_request(headers: dict[str, str]) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions",
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})


def usage(rid: str, prompt: int, completion: int, adapters=()) -> Usage:
    return Usage(request_id=rid, model="pirate", prompt_tokens=prompt, completion_tokens=completion, ttft_s=0.01,
                 total_s=0.05, adapters=tuple(AdapterUsage(a) for a in adapters))


def count(db, table) -> int:
    with db.reader.begin() as s:
        return s.scalar(select(func.count()).select_from(table))


@pytest.fixture
def accountant(ledger, gate):
    return LedgerAccountant(ledger, gate)


def test_paid_request_with_voucher_books_cost_and_a_node_signed_receipt(accountant, ledger, chain, adapter):
    key = chain.payer(deposit=10_000)
    # max cost: 100 prompt * 1 + 50 output * 3 = 250
    hdr = encode_voucher_header(sign_voucher(ledger.domain, key, chain.node_id, 250))
    hint = MaxCostInput(prompt_tokens=100, max_output_tokens=50, adapters=("pirate",))

    async def go():
        t = await accountant.authorize(http_request({VOUCHER_HEADER: hdr}), model="pirate", adapters=["pirate"],
                                       max_cost_hint=hint)
        assert t.max_cost == 250 and accountant.gate.reserved(t.payer) == 250
        rid = await accountant.complete(t, usage("chatcmpl-1", 100, 20, ["pirate"]))
        return t, rid

    t, rid = asyncio.run(go())
    assert rid == t.receipt_id and rid.startswith("rcpt-") and accountant.gate.reserved(t.payer) == 0
    with ledger.db.reader.begin() as s:
        rc = s.get(m.Receipt, rid)
        req = s.get(m.Request, rid)
        assert req.cost == 100 + 60 and rc.cost == 160 and rc.payer == t.payer
        assert recover_signer(bytes.fromhex(rc.digest[2:]), rc.signature) == Account.from_key(chain.node_key).address.lower()
        assert rc.adapter_ids == "[1]"


def test_cancel_releases_and_records_nothing(accountant, ledger, chain, adapter):
    key = chain.payer(deposit=10_000)
    hdr = encode_voucher_header(sign_voucher(ledger.domain, key, chain.node_id, 10_000))

    async def go():
        t = await accountant.authorize(http_request({VOUCHER_HEADER: hdr}), model="pirate", adapters=["pirate"],
                                       max_cost_hint=MaxCostInput(10, 10, ("pirate",)))
        await accountant.cancel(t)
        return t

    t = asyncio.run(go())
    assert accountant.gate.reserved(t.payer) == 0 and count(ledger.db, m.Request) == 0


def test_no_credentials_is_401_and_bad_key_is_401(accountant, adapter):
    hint = MaxCostInput(1, 1, ())
    with pytest.raises(Unauthorized, match="X-OpenLoRA-Voucher"):
        asyncio.run(accountant.authorize(http_request({}), model="base", adapters=[], max_cost_hint=hint))
    with pytest.raises(Unauthorized, match="unknown or revoked"):
        asyncio.run(accountant.authorize(http_request({"Authorization": "Bearer olk_nope"}), model="base", adapters=[],
                                         max_cost_hint=hint))


def test_unknown_adapter_is_404_and_reserves_nothing(accountant, ledger, chain):
    key = chain.payer(deposit=100)
    hdr = encode_voucher_header(sign_voucher(ledger.domain, key, chain.node_id, 100))
    with pytest.raises(NotFound, match="'ghost'"):
        asyncio.run(accountant.authorize(http_request({VOUCHER_HEADER: hdr}), model="ghost", adapters=["ghost"],
                                         max_cost_hint=MaxCostInput(1, 1, ("ghost",))))
    assert accountant.gate.reserved(Account.from_key(key).address.lower()) == 0


def test_api_key_pays_within_the_stored_voucher_cap(accountant, ledger, chain, adapter):
    key = chain.payer(deposit=10_000)
    payer = Account.from_key(key).address.lower()
    api_key = create_api_key(ledger.db, payer)
    # a cap of 30: one base-model request of max cost 10 * 1 + 10 * 2 = 30 fits, the second does not
    asyncio.run(accountant.gate.release(asyncio.run(accountant.gate.reserve(
        payer, 0, sign_voucher(ledger.domain, key, chain.node_id, 30)))))
    req = http_request({"Authorization": f"Bearer {api_key}"})

    async def go():
        t = await accountant.authorize(req, model="base", adapters=[], max_cost_hint=MaxCostInput(10, 10))
        with pytest.raises(PaymentRequired, match="needed at least 60"):
            await accountant.authorize(req, model="base", adapters=[], max_cost_hint=MaxCostInput(10, 10))
        return await accountant.complete(t, usage("k-1", 10, 5))

    rid = asyncio.run(go())
    with ledger.db.reader.begin() as s:
        assert s.get(m.Request, rid).cost == 20
