"""Settlement end to end on a real anvil: build, persist, send, confirm, and every way a send can go wrong."""

from __future__ import annotations

import asyncio
import datetime as dt
import time

from eth_account import Account

from attribution import models as m
from attribution.batches import build_batch, receipt_proof
from attribution.ledger import AdapterUse, FinishedRequest
from attribution.receipts import ReceiptData
from chainkit import send
from node.payments import sign_voucher
from node.settlement import SettlementConfig, Settler
from node.settlement import status as settlement_status


def mine(chain, n: int = 1) -> None:
    for _ in range(n):
        chain.w3.provider.make_request("evm_mine", [])


def rpc(chain, method, *params):
    return chain.w3.provider.make_request(method, list(params))["result"]


def serve(ledger, gate, chain, key: str, n: int, prefix: str) -> int:
    """n paid requests on adapter 1 (10 in + 10 out tokens: cost 40 each); returns the total cost."""
    payer = Account.from_key(key).address.lower()
    asyncio.run(gate.release(asyncio.run(gate.reserve(payer, 0, sign_voucher(ledger.domain, key, chain.node_id, 10**6)))))
    total = 0
    for i in range(n):
        now = dt.datetime.now(dt.UTC)
        total += ledger.record(FinishedRequest(f"{prefix}-{i}", payer, chain.node_id, (AdapterUse(1),), 10, 10, now, now)).cost
    return total


def settler(ledger, chain, tmp_path, **cfg) -> Settler:
    base = dict(confirmations=2, wait_poll_s=0.05, stuck_after_s=600)
    base.update(cfg)
    return Settler(ledger.db, chain.node_id, chain.settlement, chain.node_key, tmp_path / "journal", SettlementConfig(**base))


def signer_nonce(chain) -> int:
    return chain.w3.eth.get_transaction_count(Account.from_key(chain.node_key).address, "latest")


def claimable(chain, address: str) -> int:
    return chain.settlement.functions.claimable(chain.w3.to_checksum_address(address)).call()


def batch_row(ledger, batch_id):
    with ledger.db.reader.begin() as s:
        return s.get(m.SettlementBatch, batch_id)


def test_settle_now_pays_every_payee_once_and_receipts_verify_on_chain(ledger, gate, chain, adapter, tmp_path):
    key = chain.payer(deposit=10_000)
    total = serve(ledger, gate, chain, key, 3, "ok")
    s = settler(ledger, chain, tmp_path)
    states = s.settle_now(timeout_s=30, mine=lambda: mine(chain))
    (bid, state), = states.items()
    assert state == "confirmed" and batch_row(ledger, bid).status == "confirmed"
    operator = Account.from_key(chain.operator).address
    assert claimable(chain, adapter) + claimable(chain, operator) == total == 120
    assert claimable(chain, adapter) == 96  # 80% owner split
    payer = chain.w3.to_checksum_address(Account.from_key(key).address)
    assert chain.settlement.functions.collected(payer, chain.node_id).call() == total
    # a receipt of the batch verifies against the contract with its Merkle proof
    p = receipt_proof(ledger.db, "ok-1")
    with ledger.db.reader.begin() as ss:
        rc = ss.get(m.Receipt, "ok-1")
    r = ReceiptData(bytes.fromhex(rc.request_hash[2:]), rc.payer, rc.node_id, (1,), rc.input_tokens, rc.output_tokens,
                    rc.cost, bytes.fromhex(rc.attribution_digest[2:]), rc.timestamp)
    args = (r.request_id, chain.w3.to_checksum_address(r.payer), r.node_id, list(r.adapter_ids), r.input_tokens,
            r.output_tokens, r.cost, r.attribution_digest, r.timestamp)
    assert chain.settlement.functions.verifyReceipt(chain.node_id, bytes.fromhex(bid[2:]), args,
                                                    bytes.fromhex(rc.signature[2:]),
                                                    [bytes.fromhex(x[2:]) for x in p.proof]).call()
    # nothing left: a second pass sends nothing
    before = signer_nonce(chain)
    assert s.settle_now(timeout_s=5) == {}
    assert signer_nonce(chain) == before
    st = settlement_status(ledger.db, chain.node_id)
    assert st["unbatched_receipts"] == 0 and st["batches"][0]["status"] == "confirmed"


def test_crash_between_persist_and_broadcast_sends_the_journaled_transaction(ledger, gate, chain, adapter, tmp_path):
    key = chain.payer(deposit=10_000)
    serve(ledger, gate, chain, key, 2, "crash")
    first = settler(ledger, chain, tmp_path)
    plan = build_batch(ledger.db, chain.node_id)
    attempt = first.prepare(plan.batch_id)  # signed and persisted ... and then the process dies
    assert batch_row(ledger, plan.batch_id).status == "submitted"
    nonce0 = signer_nonce(chain)
    assert not first._known(attempt.tx_hash)
    second = settler(ledger, chain, tmp_path)
    assert second.settle_now(timeout_s=30, mine=lambda: mine(chain)) == {plan.batch_id: "confirmed"}
    row = batch_row(ledger, plan.batch_id)
    assert row.tx_hash == attempt.tx_hash.lower() and signer_nonce(chain) == nonce0 + 1
    assert chain.w3.eth.get_transaction_receipt(attempt.tx_hash)["status"] == 1


def test_crash_after_broadcast_never_sends_again(ledger, gate, chain, adapter, tmp_path):
    key = chain.payer(deposit=10_000)
    total = serve(ledger, gate, chain, key, 2, "sent")
    first = settler(ledger, chain, tmp_path)
    states = first.tick()
    (bid, state), = states.items()
    assert state == "sent"  # mined by anvil, not yet confirmed: the process dies here
    nonce0 = signer_nonce(chain)
    owner_before = claimable(chain, adapter)
    second = settler(ledger, chain, tmp_path)
    assert second.settle_now(timeout_s=30, mine=lambda: mine(chain)) == {bid: "confirmed"}
    assert signer_nonce(chain) == nonce0  # no second transaction
    assert claimable(chain, adapter) == owner_before  # paid once, by the first transaction
    assert owner_before == total * 8 // 10


def test_stuck_transaction_is_replaced_with_the_same_nonce_and_higher_fees(ledger, gate, chain, adapter, tmp_path):
    key = chain.payer(deposit=10_000)
    serve(ledger, gate, chain, key, 1, "stuck")
    s = settler(ledger, chain, tmp_path, stuck_after_s=0, confirmations=1)
    rpc(chain, "evm_setAutomine", False)
    try:
        (bid, state), = s.tick().items()
        assert state == "sent"
        assert s.advance(bid) == "sent"  # still pending: replaced
        j = s.journal.load(bid)
        assert len(j.attempts) == 2 and j.attempts[0].nonce == j.attempts[1].nonce
        assert j.attempts[1].max_fee_per_gas > j.attempts[0].max_fee_per_gas
        assert j.attempts[1].max_priority_fee_per_gas > j.attempts[0].max_priority_fee_per_gas
        mine(chain)
    finally:
        rpc(chain, "evm_setAutomine", True)
    assert s.advance(bid) == "confirmed"
    row = batch_row(ledger, bid)
    assert row.tx_hash == j.attempts[1].tx_hash.lower() and row.attempts == 2
    assert chain.w3.eth.get_transaction_receipt(j.attempts[1].tx_hash)["status"] == 1


def test_reorg_that_drops_the_settlement_is_noticed_and_the_batch_resent(ledger, gate, chain, adapter, tmp_path):
    key = chain.payer(deposit=10_000)
    serve(ledger, gate, chain, key, 2, "reorg")
    s = settler(ledger, chain, tmp_path, confirmations=3)
    snap = rpc(chain, "evm_snapshot")
    (bid, state), = s.tick().items()
    assert state == "sent" and s.settled_on_chain(bid)
    assert s.advance(bid) == "confirming"
    rpc(chain, "evm_revert", snap)  # the block with the settlement is gone
    assert not s.settled_on_chain(bid)
    assert s.advance(bid) == "sent"  # re-broadcast the journaled transaction
    assert s.settled_on_chain(bid)
    mine(chain, 2)
    assert s.advance(bid) == "confirmed"
    assert batch_row(ledger, bid).status == "confirmed"


def test_a_batch_the_contract_would_refuse_fails_without_spending_gas(ledger, gate, chain, adapter, tmp_path):
    key = chain.payer(deposit=100)
    serve(ledger, gate, chain, key, 2, "broke")  # 80 owed
    send(chain.w3, key, chain.settlement.functions.requestWithdrawal(chain.node_id, 100))
    rpc(chain, "evm_increaseTime", 61)
    mine(chain)
    send(chain.w3, key, chain.settlement.functions.withdraw(chain.node_id))
    nonce0 = signer_nonce(chain)
    s = settler(ledger, chain, tmp_path)
    (bid, state), = s.tick().items()
    row = batch_row(ledger, bid)
    assert state == "failed" and row.status == "failed"
    assert row.last_error.startswith("InsufficientEscrow(") and "requested=80" in row.last_error
    assert signer_nonce(chain) == nonce0
    # the receipts stay in their batch: a later pass does not build a second batch over them
    assert s.unbatched() == 0


def test_scheduler_settles_in_the_background(ledger, gate, chain, adapter, tmp_path):
    key = chain.payer(deposit=10_000)
    serve(ledger, gate, chain, key, 1, "bg")
    s = settler(ledger, chain, tmp_path, confirmations=1, interval_s=0.2, check_every_s=0.2)
    s.start()
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            st = settlement_status(ledger.db, chain.node_id)
            if st["batches"] and st["batches"][0]["status"] == "confirmed":
                break
            time.sleep(0.1)
    finally:
        s.stop()
    assert st["batches"][0]["status"] == "confirmed" and st["unbatched_receipts"] == 0
