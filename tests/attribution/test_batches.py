"""Settlement batches: deterministic, voucher-backed, provable, never double-including a receipt."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from attribution import models as m
from attribution.batches import (
    batches_to_send, build_batch, mark_confirmed, mark_failed, mark_submitted, plan_batch, receipt_proof, settle_args,
)
from attribution.db import open_database
from attribution.eip712 import to_bytes32
from attribution.errors import BatchStateError, NotFound, SignatureError, VoucherError
from attribution.merkle import batch_id_of, leaf_of, verify
from attribution.payers import create_api_key, latest_voucher, payer_for_api_key, revoke_api_key, store_voucher
from attribution.queries import rewards
from attribution.receipts import VoucherData, sign_digest

from .conftest import NODE_ID, OPERATOR, OWNER, make_request, payer_account

TX = "0x" + "ab" * 32


def give_voucher(ledger, acct, value, ts=1):
    v = VoucherData(acct.address, NODE_ID, value, ts)
    return store_voucher(ledger.db, ledger.domain, v, sign_digest(v.digest(ledger.domain), acct.key))


def record_many(ledger, payers, n):
    costs = {}
    for i in range(n):
        acct = payers[i % len(payers)]
        r = ledger.record(make_request(i, payer=acct.address))
        costs.setdefault(acct.address.lower(), []).append(r.cost)
    return costs


def test_batch_root_proofs_debits_and_credits(ledger, db):
    alice, bob = payer_account(1), payer_account(2)
    costs = record_many(ledger, [alice, bob], 9)
    give_voucher(ledger, alice, sum(costs[alice.address.lower()]))
    give_voucher(ledger, bob, sum(costs[bob.address.lower()][:2]) + 1)  # covers bob's first two receipts only
    plan = build_batch(db, NODE_ID)
    assert len(plan.leaves) == 5 + 2
    assert {d.payer: d.amount for d in plan.debits} == {alice.address.lower(): sum(costs[alice.address.lower()]),
                                                        bob.address.lower(): sum(costs[bob.address.lower()][:2])}
    assert sum(d.amount for d in plan.debits) == sum(a for _, a in plan.credits) == plan.total
    assert plan.batch_id == "0x" + batch_id_of(NODE_ID, to_bytes32(plan.root, "r")).hex()
    for leaf, rid in plan.leaves:
        proof = receipt_proof(db, rid)
        with db.reader.begin() as s:
            digest = s.get(m.Receipt, rid).digest
        assert proof.leaf == leaf == "0x" + leaf_of(to_bytes32(digest, "d")).hex()
        assert verify([to_bytes32(p, "p") for p in proof.proof], to_bytes32(plan.root, "r"), to_bytes32(leaf, "l"))
    args = settle_args(db, plan.batch_id)
    assert args["receiptCount"] == 7 and len(args["debits"]) == 2
    # the remaining receipts of bob wait for a bigger voucher; nothing else is settleable now
    assert build_batch(db, NODE_ID) is None
    give_voucher(ledger, bob, sum(costs[bob.address.lower()]), ts=2)
    second = build_batch(db, NODE_ID)
    assert len(second.leaves) == 2 and second.batch_id != plan.batch_id


def test_same_unsettled_receipts_give_the_same_batch(ledger, db, db_url, ledger_databases):
    alice = payer_account(1)
    costs = record_many(ledger, [alice], 5)
    give_voucher(ledger, alice, sum(costs[alice.address.lower()]))
    db.dispose()  # no open connection while the database is copied
    copy = ledger_databases.new(template=db_url)
    other = open_database(copy)
    try:
        with db.reader.begin() as s1, other.reader.begin() as s2:
            assert plan_batch(s1, NODE_ID) == plan_batch(s2, NODE_ID)
        assert build_batch(db, NODE_ID) == build_batch(other, NODE_ID)
    finally:
        other.dispose()
        ledger_databases.drop(copy)


def test_database_refuses_a_receipt_in_two_batches(ledger, db):
    alice = payer_account(1)
    costs = record_many(ledger, [alice], 2)
    give_voucher(ledger, alice, sum(costs[alice.address.lower()]))
    plan = build_batch(db, NODE_ID)
    with pytest.raises(IntegrityError):
        with db.writer.begin() as s:
            now = s.get(m.SettlementBatch, plan.batch_id).created_at
            s.add(m.SettlementBatch(id="0x" + "ee" * 32, node_id=NODE_ID, merkle_root="0x" + "ee" * 32, receipt_count=1,
                                    total_amount=0, status="pending", attempts=0, created_at=now, updated_at=now))
            s.flush()
            s.add(m.BatchReceipt(request_id=plan.leaves[0][1], batch_id="0x" + "ee" * 32, leaf_index=0, leaf=plan.leaves[0][0]))
    with db.reader.begin() as s:
        assert s.get(m.SettlementBatch, "0x" + "ee" * 32) is None


def test_state_machine_and_rewards_follow_the_batch(ledger, db):
    alice = payer_account(1)
    costs = record_many(ledger, [alice], 3)
    give_voucher(ledger, alice, sum(costs[alice.address.lower()]))
    before = rewards(db, OWNER)
    assert before.pending > 0 and before.in_batch == before.settled == 0
    plan = build_batch(db, NODE_ID)
    mid = rewards(db, OWNER)
    assert mid.pending == 0 and mid.in_batch == before.pending
    with pytest.raises(BatchStateError):
        mark_confirmed(db, plan.batch_id, 10)  # not submitted yet
    assert batches_to_send(db, NODE_ID) == [plan.batch_id]
    mark_submitted(db, plan.batch_id, TX)
    failed = mark_failed(db, plan.batch_id, "rpc timeout")
    assert failed.status == "failed" and failed.last_error == "rpc timeout"
    retried = mark_submitted(db, plan.batch_id, TX)
    assert retried.attempts == 2 and retried.status == "submitted"
    done = mark_confirmed(db, plan.batch_id, 1234)
    assert done.block_number == 1234 and batches_to_send(db, NODE_ID) == []
    with pytest.raises(BatchStateError):
        mark_submitted(db, plan.batch_id, TX)
    after = rewards(db, OWNER)
    assert after.settled == after.claimable == before.pending and after.pending == after.in_batch == 0
    assert rewards(db, OPERATOR).settled > 0
    with pytest.raises(NotFound):
        mark_submitted(db, "0x" + "00" * 32, TX)


def test_vouchers_must_be_signed_by_the_payer_and_never_decrease(ledger, db):
    alice, mallory = payer_account(1), payer_account(2)
    give_voucher(ledger, alice, 100, ts=5)
    v = VoucherData(alice.address, NODE_ID, 500, 6)
    with pytest.raises(SignatureError):
        store_voucher(db, ledger.domain, v, sign_digest(v.digest(ledger.domain), mallory.key))
    with pytest.raises(VoucherError):
        give_voucher(ledger, alice, 99, ts=7)
    assert latest_voucher(db, alice.address, NODE_ID).voucher.cumulative_value == 100


def test_api_keys_are_stored_hashed_and_can_be_revoked(ledger, db):
    alice = payer_account(1)
    key = create_api_key(db, alice.address, "laptop")
    assert payer_for_api_key(db, key) == alice.address.lower()
    with db.reader.begin() as s:
        stored = s.scalars(select(m.ApiKey.key_hash)).all()
    assert key not in stored and all(len(h) == 64 for h in stored)
    revoke_api_key(db, key)
    with pytest.raises(NotFound):
        payer_for_api_key(db, key)
