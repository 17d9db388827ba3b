"""Settlement batches: a deterministic builder, receipt proofs, and the batch state machine.

Builder: the node's receipts not yet in a batch, in (timestamp, request id) order; per payer, receipts
are taken in that order while the payer's latest voucher covers them (cumulativeValue minus what earlier
batches already debit); the first receipt that does not fit stops that payer (FIFO, so a later voucher
settles the rest). Same unsettled receipts and vouchers -> same leaves, root and batch id.
Debits (per payer) and credits (per payee) both sum the batch's receipts, so they are equal.

State machine:   pending ──submit──▶ submitted ──confirm──▶ confirmed
                    │                    │   ▲
                    └──fail──▶ failed ◀──┘   └──submit (retry, attempts + 1)── failed
A batch's receipts never leave it (batch_receipts.request_id is UNIQUE), so a retry resends the same
batch id and root, and a crash between send and confirm can never pay a receipt twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from attribution import models as m
from attribution.db import Database, utcnow
from attribution.eip712 import hex32, to_bytes32
from attribution.errors import BatchStateError, InvalidInput, NotFound
from attribution.ledger import add_to_balances
from attribution.merkle import batch_id_of, leaf_of, proof_for, root_of, sorted_leaves

MAX_RECEIPTS = 2**32 - 1  # receiptCount is a uint32 on chain


@dataclass(frozen=True)
class Debit:
    payer: str
    amount: int
    voucher_cumulative_value: int
    voucher_timestamp: int
    voucher_signature: str


@dataclass(frozen=True)
class BatchPlan:
    batch_id: str
    node_id: int
    root: str
    leaves: tuple[tuple[str, str], ...]  # (leaf, request id), sorted by leaf
    debits: tuple[Debit, ...]  # by payer address
    credits: tuple[tuple[str, int], ...]  # (payee, amount), by payee address
    total: int


def plan_batch(s: Session, node_id: int, *, max_receipts: int = 10_000) -> BatchPlan | None:
    """The batch that would be built now (reads only). None when nothing is settleable."""
    if not 0 < max_receipts <= MAX_RECEIPTS:
        raise InvalidInput(f"max_receipts must be in 1..{MAX_RECEIPTS}")
    vouchers = {r.address: r for r in s.execute(
        select(m.Payer.address, m.Payer.id, m.PayerVoucher.cumulative_value, m.PayerVoucher.timestamp, m.PayerVoucher.signature)
        .join(m.PayerVoucher, m.PayerVoucher.payer_id == m.Payer.id).where(m.PayerVoucher.node_id == node_id))}
    already = {}
    for payer_id, amount in s.execute(select(m.BatchDebit.payer_id, m.BatchDebit.amount)
                                      .join(m.SettlementBatch, m.SettlementBatch.id == m.BatchDebit.batch_id)
                                      .where(m.SettlementBatch.node_id == node_id)):
        already[payer_id] = already.get(payer_id, 0) + amount
    budget = {a: v.cumulative_value - already.get(v.id, 0) for a, v in vouchers.items()}

    unsettled = s.execute(
        select(m.Receipt.request_id, m.Receipt.digest, m.Receipt.payer, m.Receipt.cost)
        .outerjoin(m.BatchReceipt, m.BatchReceipt.request_id == m.Receipt.request_id)
        .where(m.BatchReceipt.request_id.is_(None), m.Receipt.node_id == node_id)
        .order_by(m.Receipt.timestamp, m.Receipt.request_id))
    chosen: list[tuple[str, bytes]] = []
    debit: dict[str, int] = {}
    stopped: set[str] = set()
    for request_id, digest, payer, cost in unsettled:
        if payer in stopped or payer not in budget:
            continue
        if debit.get(payer, 0) + cost > budget[payer]:
            stopped.add(payer)
            continue
        debit[payer] = debit.get(payer, 0) + cost
        chosen.append((request_id, to_bytes32(digest, "receipt digest")))
        if len(chosen) == max_receipts:
            break
    if not chosen:
        return None

    leaf_to_request = {leaf_of(d): rid for rid, d in chosen}
    leaves = sorted_leaves([d for _, d in chosen])
    root = root_of(leaves)
    credits: dict[str, int] = {}
    ids = [rid for rid, _ in chosen]
    for i in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
        for payee, amount in s.execute(select(m.RequestCredit.payee, m.RequestCredit.amount)
                                       .where(m.RequestCredit.request_id.in_(ids[i:i + 500]))):
            credits[payee] = credits.get(payee, 0) + amount
    total = sum(debit.values())
    assert total == sum(credits.values()), "credits of a request always sum to its cost"
    debits = tuple(Debit(p, a, vouchers[p].cumulative_value, vouchers[p].timestamp, vouchers[p].signature)
                   for p, a in sorted(debit.items()) if a > 0)
    return BatchPlan(batch_id=hex32(batch_id_of(node_id, root)), node_id=node_id, root=hex32(root),
                     leaves=tuple((hex32(l), leaf_to_request[l]) for l in leaves), debits=debits,
                     credits=tuple(sorted((p, a) for p, a in credits.items() if a > 0)), total=total)


def build_batch(db: Database, node_id: int, *, max_receipts: int = 10_000) -> BatchPlan | None:
    """Plan and store a pending batch in one write transaction (None when nothing is settleable)."""
    with db.writer.begin() as s:
        plan = plan_batch(s, node_id, max_receipts=max_receipts)
        if plan is None:
            return None
        now = utcnow()
        s.add(m.SettlementBatch(id=plan.batch_id, node_id=node_id, merkle_root=plan.root, receipt_count=len(plan.leaves),
                                total_amount=plan.total, status="pending", attempts=0, created_at=now, updated_at=now))
        s.flush()
        payer_ids = dict(s.execute(select(m.Payer.address, m.Payer.id).where(m.Payer.address.in_([d.payer for d in plan.debits]))).all())
        s.add_all(m.BatchReceipt(request_id=rid, batch_id=plan.batch_id, leaf_index=i, leaf=leaf)
                  for i, (leaf, rid) in enumerate(plan.leaves))
        s.add_all(m.BatchDebit(batch_id=plan.batch_id, payer_id=payer_ids[d.payer], amount=d.amount,
                               voucher_cumulative_value=d.voucher_cumulative_value, voucher_timestamp=d.voucher_timestamp,
                               voucher_signature=d.voucher_signature) for d in plan.debits)
        s.add_all(m.BatchPayout(batch_id=plan.batch_id, payee=p, amount=a) for p, a in plan.credits)
        s.flush()
        add_to_balances(s, dict(plan.credits), "batched")
    return plan


# -- state machine --------------------------------------------------------------------------------

_ALLOWED = {
    "submitted": {"pending", "failed"},
    "confirmed": {"submitted"},
    "failed": {"pending", "submitted"},
}


def _transition(db: Database, batch_id: str, to: str, **values) -> m.SettlementBatch:
    with db.writer.begin() as s:
        batch = s.get(m.SettlementBatch, batch_id)
        if batch is None:
            raise NotFound(f"no settlement batch {batch_id}")
        if batch.status not in _ALLOWED[to]:
            raise BatchStateError(f"batch {batch_id} is {batch.status}; it cannot become {to}")
        # compare-and-set on the status we read, so two settlers racing on PostgreSQL cannot both move it
        extra = {"attempts": m.SettlementBatch.attempts + 1} if to == "submitted" else {}
        done = s.execute(update(m.SettlementBatch)
                         .where(m.SettlementBatch.id == batch_id, m.SettlementBatch.status == batch.status)
                         .values(status=to, updated_at=utcnow(), **values, **extra)).rowcount
        if done != 1:
            raise BatchStateError(f"batch {batch_id} changed state concurrently")
    with db.reader.begin() as s:
        return s.get(m.SettlementBatch, batch_id)


def mark_submitted(db: Database, batch_id: str, tx_hash: str) -> m.SettlementBatch:
    to_bytes32(tx_hash, "tx hash")
    return _transition(db, batch_id, "submitted", tx_hash=tx_hash.lower(), last_error=None)


def mark_confirmed(db: Database, batch_id: str, block_number: int) -> m.SettlementBatch:
    if isinstance(block_number, bool) or not isinstance(block_number, int) or block_number < 0:
        raise InvalidInput(f"block number must be a non-negative integer, got {block_number!r}")
    return _transition(db, batch_id, "confirmed", block_number=block_number)


def mark_failed(db: Database, batch_id: str, error: str) -> m.SettlementBatch:
    return _transition(db, batch_id, "failed", last_error=str(error)[:2000])


def batches_to_send(db: Database, node_id: int) -> list[str]:
    """Pending and failed batches (oldest first): what the settler should (re)send."""
    with db.reader.begin() as s:
        return list(s.scalars(select(m.SettlementBatch.id).where(
            m.SettlementBatch.node_id == node_id, m.SettlementBatch.status.in_(("pending", "failed")))
            .order_by(m.SettlementBatch.created_at, m.SettlementBatch.id)))


# -- proofs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ReceiptProof:
    request_id: str
    batch_id: str
    root: str
    leaf: str
    proof: tuple[str, ...]
    status: str


def receipt_proof(db: Database, request_id: str) -> ReceiptProof:
    """The Merkle proof that a receipt is under its batch root (what `verifyReceipt` takes)."""
    with db.reader.begin() as s:
        member = s.get(m.BatchReceipt, request_id)
        if member is None:
            raise NotFound(f"receipt of request {request_id!r} is not in a settlement batch yet")
        batch = s.get(m.SettlementBatch, member.batch_id)
        leaves = [to_bytes32(l, "leaf") for l in s.scalars(
            select(m.BatchReceipt.leaf).where(m.BatchReceipt.batch_id == batch.id).order_by(m.BatchReceipt.leaf_index))]
    proof = proof_for(leaves, member.leaf_index)
    return ReceiptProof(request_id, batch.id, batch.merkle_root, member.leaf, tuple(hex32(p) for p in proof), batch.status)


def settle_args(db: Database, batch_id: str) -> dict:
    """Arguments of UsageSettlement.settleBatch for a stored batch, as plain JSON-able data."""
    with db.reader.begin() as s:
        batch = s.get(m.SettlementBatch, batch_id)
        if batch is None:
            raise NotFound(f"no settlement batch {batch_id}")
        debits = s.execute(select(m.Payer.address, m.BatchDebit).join(m.BatchDebit, m.BatchDebit.payer_id == m.Payer.id)
                           .where(m.BatchDebit.batch_id == batch_id).order_by(m.Payer.address)).all()
        credits = s.execute(select(m.BatchPayout.payee, m.BatchPayout.amount).where(m.BatchPayout.batch_id == batch_id)
                            .order_by(m.BatchPayout.payee)).all()
        return {
            "nodeId": batch.node_id, "batchId": batch.id, "root": batch.merkle_root, "receiptCount": batch.receipt_count,
            "debits": [{"voucher": {"payer": a, "nodeId": batch.node_id, "cumulativeValue": d.voucher_cumulative_value,
                                    "timestamp": d.voucher_timestamp}, "signature": d.voucher_signature, "amount": d.amount}
                       for a, d in debits],
            "credits": [{"payee": p, "amount": a} for p, a in credits],
        }


__all__ = ["BatchPlan", "Debit", "ReceiptProof", "batches_to_send", "build_batch", "mark_confirmed", "mark_failed",
           "mark_submitted", "plan_batch", "receipt_proof", "settle_args"]
