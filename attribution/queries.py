"""Read side: rewards of a payee and usage by adapter, Datanet or payer over a time range.

Every query is one index range scan (see the indexes in models.py and benchmarks/ledger_queries.py):
- rewards: pending = payee_balances.credited - batched (O(1)); in batch / settled from batch_payouts
  by payee joined to the batch status. `claimable` is what confirmed batches credited; withdrawals
  happen on chain (UsageSettlement.claim), so the chain client subtracts what was already claimed.
- usage: whole hours from usage_rollups (kept by Ledger.record), the partial hours at the edges of
  the range from adapter_usage by (adapter_id | datanet_id, finished_at) or requests by
  (payer_id, finished_at). Time ranges are half-open [start, end).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select

from attribution import models as m
from attribution.db import Database, amount_sum
from attribution.eip712 import normalize_address
from attribution.errors import InvalidInput


@dataclass(frozen=True)
class Rewards:
    payee: str
    pending: int  # credited by recorded requests, not yet in a batch
    in_batch: int  # in a batch that is pending, submitted or failed (awaiting the chain)
    settled: int  # in confirmed batches
    claimable: int  # = settled: claimable on chain, less what the payee already claimed there

    @property
    def total(self) -> int:
        return self.pending + self.in_batch + self.settled


@dataclass(frozen=True)
class Usage:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: int  # base units (for an adapter or Datanet: its part of the cost of fused requests)


def rewards(db: Database, payee: str) -> Rewards:
    payee = normalize_address(payee, "payee")
    with db.reader.begin() as s:
        bal = s.get(m.PayeeBalance, payee)
        pending = 0 if bal is None else bal.credited - bal.batched
        in_batch = settled = 0
        rows = s.execute(select(m.SettlementBatch.status, amount_sum(s, m.BatchPayout.amount))
                         .join(m.SettlementBatch, m.SettlementBatch.id == m.BatchPayout.batch_id)
                         .where(m.BatchPayout.payee == payee).group_by(m.SettlementBatch.status))
        for status, amount in rows:
            if status == "confirmed":
                settled += amount or 0
            else:
                in_batch += amount or 0
    return Rewards(payee, pending, in_batch, settled, settled)


def _range(start: dt.datetime, end: dt.datetime) -> None:
    for t in (start, end):
        if not isinstance(t, dt.datetime) or t.tzinfo is None:
            raise InvalidInput(f"time range bounds must be timezone-aware datetimes, got {t!r}")
    if end < start:
        raise InvalidInput("time range ends before it starts")


def _hour_floor(t: dt.datetime) -> dt.datetime:
    return t.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)


def _usage(db: Database, scope: str, table, key_col, key, start, end, cost_col) -> Usage:
    """Whole hours inside [start, end) from usage_rollups; the partial hours at the edges from raw rows."""
    _range(start, end)
    first_hour = _hour_floor(start)
    if first_hour < start:
        first_hour += dt.timedelta(hours=1)
    last_hour = _hour_floor(end)  # exclusive
    if last_hour <= first_hour:
        raw_spans, whole = [(start, end)], None
    else:
        raw_spans, whole = [(start, first_hour), (last_hour, end)], (first_hour, last_hour)
    total = [0, 0, 0, 0]
    with db.reader.begin() as s:
        for lo, hi in raw_spans:
            if lo >= hi:
                continue
            row = s.execute(select(func.count(), func.sum(table.prompt_tokens), func.sum(table.completion_tokens),
                                   amount_sum(s, cost_col))
                            .where(key_col == key, table.finished_at >= lo, table.finished_at < hi)).one()
            _add(total, row)
        if whole is not None:
            r = m.UsageRollup
            row = s.execute(select(func.sum(r.requests), func.sum(r.prompt_tokens), func.sum(r.completion_tokens),
                                   amount_sum(s, r.cost))
                            .where(r.scope == scope, r.scope_id == key, r.hour >= whole[0], r.hour < whole[1])).one()
            _add(total, row)
    return Usage(*total)


def _add(total: list[int], row) -> None:
    for i, v in enumerate(row):
        total[i] += int(v or 0)


def usage_by_adapter(db: Database, adapter_id: int, start: dt.datetime, end: dt.datetime) -> Usage:
    return _usage(db, "adapter", m.AdapterUsage, m.AdapterUsage.adapter_id, adapter_id, start, end, m.AdapterUsage.cost_share)


def usage_by_datanet(db: Database, datanet_id: int, start: dt.datetime, end: dt.datetime) -> Usage:
    return _usage(db, "datanet", m.AdapterUsage, m.AdapterUsage.datanet_id, datanet_id, start, end, m.AdapterUsage.cost_share)


def usage_by_payer(db: Database, payer: str, start: dt.datetime, end: dt.datetime) -> Usage:
    payer = normalize_address(payer, "payer")
    with db.reader.begin() as s:
        payer_id = s.scalar(select(m.Payer.id).where(m.Payer.address == payer))
    if payer_id is None:
        _range(start, end)
        return Usage(0, 0, 0, 0)
    return _usage(db, "payer", m.Request, m.Request.payer_id, payer_id, start, end, m.Request.cost)
