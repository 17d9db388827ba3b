"""Ledger.record: one transaction per request, idempotent by id, safe with concurrent writers."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import func, select

from attribution import models as m
from attribution.db import open_database
from attribution.eip712 import to_bytes32
from attribution.errors import ConflictError, InvalidInput, NotFound
from attribution.ledger import AdapterUse, Ledger
from attribution.receipts import recover_signer
from attribution.shares import ContributorShare
from eth_account import Account

from .conftest import NODE_KEY, OPERATOR, OWNER, PAYER, make_request

C1, C2 = "0x" + "c1" * 20, "0x" + "c2" * 20


def counts(db) -> dict[str, int]:
    with db.reader.begin() as s:
        return {t: s.scalar(select(func.count()).select_from(m.Base.metadata.tables[t]))
                for t in ("requests", "adapter_usage", "contributor_influence", "request_credits", "receipts")}


def test_record_writes_request_usage_influence_credits_and_signed_receipt(ledger, db):
    shares = {1: [ContributorShare(C1, 0.8, 6000), ContributorShare(C2, 0.5, 4000)]}
    out = ledger.record(make_request(1, shares=shares))
    cost = (100 * 3 * 10**15 + 50 * 9 * 10**15) // 10**6
    assert out.created and out.cost == cost
    assert counts(db) == {"requests": 1, "adapter_usage": 1, "contributor_influence": 2, "request_credits": 4, "receipts": 1}
    credits = {(p, r): a for p, r, _, a in out.credits}
    assert credits[(OWNER, "owner")] == cost // 2 and credits[(OPERATOR, "operator")] == cost // 5
    assert credits[(C1, "contributor")] + credits[(C2, "contributor")] == cost * 3 // 10
    with db.reader.begin() as s:
        receipt = s.get(m.Receipt, "req-1")
        assert receipt.digest == out.receipt_digest and receipt.attribution_digest != "0x" + "00" * 32
        assert recover_signer(to_bytes32(receipt.digest, "d"), receipt.signature) == Account.from_key(NODE_KEY).address.lower()
        assert s.get(m.PayeeBalance, C1).credited == credits[(C1, "contributor")]


def test_recording_the_same_request_twice_returns_the_first_result(ledger, db):
    first = ledger.record(make_request(1))
    again = ledger.record(make_request(1))
    assert again.created is False and again.cost == first.cost and again.receipt_digest == first.receipt_digest
    assert again.credits == first.credits
    assert counts(db)["requests"] == 1 and counts(db)["request_credits"] == len(first.credits)


def test_a_different_request_under_a_used_id_is_a_conflict(ledger, db):
    ledger.record(make_request(1))
    with pytest.raises(ConflictError):
        ledger.record(make_request(1, completion=51))


@pytest.mark.parametrize("bad", [
    dict(adapters=(AdapterUse(99),)),  # unknown adapter
    dict(adapters=(AdapterUse(1, 6000), AdapterUse(2, 3000))),  # weights do not sum to 10000
    dict(payer="not-an-address"),
    dict(prompt=-1),
    dict(shares={2: [ContributorShare(C1, 1.0, 10_000)]}),  # adapter 2 has no Datanet
    dict(shares={1: [ContributorShare(C1, 1.0, 10_001)]}),
])
def test_bad_input_is_a_ledger_error_and_writes_nothing(ledger, db, bad):
    before = counts(db)
    with pytest.raises((InvalidInput, NotFound)):
        ledger.record(make_request(1, **bad))
    assert counts(db) == before
    with db.reader.begin() as s:
        assert s.scalar(select(func.count()).select_from(m.PayeeBalance)) == 0


def test_concurrent_writers_on_one_database_record_each_request_once(ledger, db_url, config):
    # 4 threads, each with its own engine (as separate worker processes would), race on the same ids
    errors: list[BaseException] = []
    results: dict[str, set] = {}
    lock = threading.Lock()

    def worker(k: int) -> None:
        db = open_database(db_url)
        try:
            lg = Ledger(db, config, NODE_KEY)
            for i in range(30):
                r = lg.record(make_request(i, payer=PAYER if i % 2 else "0x" + "b3" * 20))
                with lock:
                    results.setdefault(r.request_id, set()).add((r.cost, r.receipt_digest))
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    db = open_database(db_url)
    try:
        c = counts(db)
        assert c["requests"] == 30 and c["receipts"] == 30
        assert all(len(v) == 1 for v in results.values())  # every thread saw the same result per id
        with db.reader.begin() as s:
            total = sum(s.scalars(select(m.Request.cost)))
            credited = sum(s.scalars(select(m.PayeeBalance.credited)))
        assert credited == total  # balances were updated exactly once per request
    finally:
        db.dispose()
