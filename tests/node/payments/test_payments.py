"""Vouchers, escrow and reservations against a real anvil and a real SQLite ledger."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json

import pytest
from eth_account import Account

from attribution.eip712 import Domain
from attribution.ledger import FinishedRequest
from attribution.payers import latest_voucher
from node.errors import PaymentRequired
from node.payments import (
    decode_voucher_header,
    encode_voucher_header,
    sign_voucher,
)


def addr(key: str) -> str:
    return Account.from_key(key).address.lower()


def run(coro):
    return asyncio.run(coro)


def record(ledger, payer: str, rid: str, prompt: int, completion: int):
    now = dt.datetime.now(dt.UTC)
    return ledger.record(FinishedRequest(rid, payer, ledger.config.node_id, (), prompt, completion, now, now))


def test_voucher_header_round_trips_and_garbage_is_a_402(ledger, chain):
    key = chain.payer()
    sv = sign_voucher(ledger.domain, key, chain.node_id, 2**200)
    back = decode_voucher_header(encode_voucher_header(sv))
    assert back == sv and back.voucher.cumulative_value == 2**200
    for bad in ("not base64!!", base64.b64encode(b"[1,2]").decode(),
                base64.b64encode(json.dumps({"voucher": {"payer": "0x12", "nodeId": 1, "cumulativeValue": 1,
                                                         "timestamp": 1}, "signature": "0x"}).encode()).decode()):
        with pytest.raises(PaymentRequired) as e:
            decode_voucher_header(bad)
        assert e.value.status_code == 402


def test_reserve_with_voucher_stores_it_and_counts_the_reservation(gate, ledger, chain):
    key = chain.payer(deposit=1000)
    r = run(gate.reserve(addr(key), 300, sign_voucher(ledger.domain, key, chain.node_id, 300)))
    assert r.amount == 300 and gate.reserved(addr(key)) == 300
    assert latest_voucher(ledger.db, addr(key), chain.node_id).voucher.cumulative_value == 300
    bal = run(gate.balance(addr(key)))
    assert (bal.escrow, bal.reserved, bal.available) == (1000, 300, 700)
    run(gate.release(r))
    run(gate.release(r))  # idempotent
    assert gate.reserved(addr(key)) == 0


def test_voucher_signed_by_someone_else_is_refused_and_nothing_is_stored(gate, ledger, chain):
    key, thief = chain.payer(deposit=1000), chain.payer()
    sv = sign_voucher(ledger.domain, thief, chain.node_id, 500)
    forged = type(sv)(type(sv.voucher)(addr(key), chain.node_id, 500, sv.voucher.timestamp), sv.signature)
    with pytest.raises(PaymentRequired, match="does not recover to the payer"):
        run(gate.reserve(addr(key), 100, forged))
    assert gate.reserved(addr(key)) == 0
    from attribution.errors import NotFound
    with pytest.raises(NotFound):
        latest_voucher(ledger.db, addr(key), chain.node_id)


def test_voucher_for_another_contract_or_node_is_refused(gate, ledger, chain):
    key = chain.payer(deposit=1000)
    other = Domain(chain.chain_id, chain.token.address)
    with pytest.raises(PaymentRequired, match="verifyingContract"):
        run(gate.reserve(addr(key), 10, sign_voucher(other, key, chain.node_id, 100)))
    with pytest.raises(PaymentRequired, match="for node 7"):
        run(gate.reserve(addr(key), 10, sign_voucher(ledger.domain, key, 7, 100)))


def test_voucher_must_cover_billed_plus_reserved_plus_this_request(gate, ledger, chain):
    key = chain.payer(deposit=10_000)
    p = addr(key)
    r = run(gate.reserve(p, 100, sign_voucher(ledger.domain, key, chain.node_id, 100)))
    # the second request needs the cumulative value to cover both maxima
    with pytest.raises(PaymentRequired, match="needed at least 200"):
        run(gate.reserve(p, 100, sign_voucher(ledger.domain, key, chain.node_id, 150)))
    assert gate.reserved(p) == 100
    assert latest_voucher(ledger.db, p, chain.node_id).voucher.cumulative_value == 100  # the refused one changed nothing
    r2 = run(gate.reserve(p, 100, sign_voucher(ledger.domain, key, chain.node_id, 200)))
    # booking the first at its actual cost (40) frees 60 of voucher headroom
    rec = run(gate.book(r, lambda: record(ledger, p, "req-a", 10, 10)))
    assert rec.cost == 10 * 1 + 10 * 2 + 0 and gate.reserved(p) == 100
    bal = run(gate.balance(p))
    assert bal.billed == 30 and bal.voucher_headroom == 200 - 30 - 100
    run(gate.release(r2))


def test_lower_voucher_than_the_accepted_one_is_refused(gate, ledger, chain):
    key = chain.payer(deposit=10_000)
    run(gate.release(run(gate.reserve(addr(key), 10, sign_voucher(ledger.domain, key, chain.node_id, 500)))))
    with pytest.raises(PaymentRequired, match="below the latest accepted 500"):
        run(gate.reserve(addr(key), 10, sign_voucher(ledger.domain, key, chain.node_id, 400)))
    # without a new voucher the stored cap still pays
    run(gate.release(run(gate.reserve(addr(key), 10))))


def test_short_escrow_is_402_and_a_deposit_fixes_it(gate, ledger, chain):
    key = chain.payer(deposit=50)
    sv = sign_voucher(ledger.domain, key, chain.node_id, 1000)
    with pytest.raises(PaymentRequired, match="insufficient escrow: available 50") as e:
        run(gate.reserve(addr(key), 100, sv))
    assert e.value.code == "insufficient_escrow" and gate.reserved(addr(key)) == 0
    chain.deposit(key, 50)
    run(gate.release(run(gate.reserve(addr(key), 100, sv))))


def test_no_escrow_at_all_is_402(gate, ledger, chain):
    key = chain.payer()
    with pytest.raises(PaymentRequired, match="insufficient escrow"):
        run(gate.reserve(addr(key), 1, sign_voucher(ledger.domain, key, chain.node_id, 10)))


def test_thawing_escrow_is_not_spendable(gate, ledger, chain):
    from chainkit import send
    key = chain.payer(deposit=1000)
    send(chain.w3, key, chain.settlement.functions.requestWithdrawal(chain.node_id, 600))
    bal = run(gate.balance(addr(key)))
    assert bal.available == 400
    with pytest.raises(PaymentRequired, match="available 400"):
        run(gate.reserve(addr(key), 401, sign_voucher(ledger.domain, key, chain.node_id, 1000)))


def test_unsettled_spend_counts_against_escrow(gate, ledger, chain):
    key = chain.payer(deposit=100)
    p = addr(key)
    sv = sign_voucher(ledger.domain, key, chain.node_id, 10_000)
    r = run(gate.reserve(p, 90, sv))
    run(gate.book(r, lambda: record(ledger, p, "spend-1", 30, 30)))  # cost 30 + 60 = 90
    with pytest.raises(PaymentRequired, match=r"available 10 .*unsettled 90"):
        run(gate.reserve(p, 20))


def test_concurrent_requests_never_overdraw(gate, ledger, chain):
    """40 requests of max cost 30 race for an escrow of 300: exactly 10 get through, the ledger bills
    at most the escrow, and after all are booked nothing is left reserved."""
    key = chain.payer(deposit=300)
    p = addr(key)
    run(gate.reserve(p, 0, sign_voucher(ledger.domain, key, chain.node_id, 10**9))).done = True
    gate._reserved.clear()

    async def one(i: int):
        try:
            r = await gate.reserve(p, 30)
        except PaymentRequired:
            return None
        await asyncio.sleep(0.01)  # the engine runs while others try to reserve
        return await gate.book(r, lambda: record(ledger, p, f"race-{i}", 10, 10))  # actual cost 30

    async def main():
        return await asyncio.gather(*(one(i) for i in range(40)))

    results = run(main())
    served = [r for r in results if r is not None]
    assert len(served) == 10
    bal = run(gate.balance(p))
    assert bal.billed == 300 and bal.reserved == 0 and bal.available == 0
