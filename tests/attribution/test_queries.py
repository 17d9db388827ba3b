"""Usage queries over half-open time ranges, by adapter, Datanet and payer."""

from __future__ import annotations

import datetime as dt

import pytest

from attribution.errors import InvalidInput
from attribution.ledger import AdapterUse
from attribution.queries import Usage, rewards, usage_by_adapter, usage_by_datanet, usage_by_payer

from .conftest import PAYER, T0, make_request


def test_usage_by_adapter_datanet_and_payer(ledger, db):
    other = "0x" + "b9" * 20
    r1 = ledger.record(make_request(1, when=T0))
    r2 = ledger.record(make_request(2, when=T0 + dt.timedelta(hours=1), payer=other,
                                    adapters=(AdapterUse(1, 2500), AdapterUse(2, 7500))))
    r3 = ledger.record(make_request(3, when=T0 + dt.timedelta(days=2), adapters=(AdapterUse(2),)))
    day = (T0, T0 + dt.timedelta(days=1))
    a1 = usage_by_adapter(db, 1, *day)
    assert (a1.requests, a1.prompt_tokens, a1.completion_tokens) == (2, 200, 100)
    a2_all = usage_by_adapter(db, 2, T0, T0 + dt.timedelta(days=3))
    assert a2_all.requests == 2
    assert a1.cost + usage_by_adapter(db, 2, *day).cost == r1.cost + r2.cost  # fused cost split, nothing lost
    assert usage_by_datanet(db, 7, *day) == a1  # adapter 1 is the only adapter of Datanet 7
    assert usage_by_payer(db, PAYER, T0, T0 + dt.timedelta(days=3)) == Usage(2, 200, 100, r1.cost + r3.cost)
    assert usage_by_payer(db, PAYER, T0 + dt.timedelta(days=2, seconds=1), T0 + dt.timedelta(days=3)) == Usage(0, 0, 0, 0)
    assert usage_by_payer(db, "0x" + "77" * 20, *day) == Usage(0, 0, 0, 0)


def test_bad_ranges_and_addresses_are_refused(ledger, db):
    with pytest.raises(InvalidInput):
        usage_by_adapter(db, 1, T0 + dt.timedelta(days=1), T0)
    with pytest.raises(InvalidInput):
        usage_by_adapter(db, 1, dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 2))
    with pytest.raises(InvalidInput):
        rewards(db, "alice")


def test_rollups_plus_edges_equal_a_scan_of_the_raw_log(ledger, db):
    import random

    from sqlalchemy import func, select

    from attribution import models as m

    rng = random.Random(3)
    for i in range(60):
        when = T0 + dt.timedelta(minutes=rng.randrange(0, 6 * 60), seconds=rng.randrange(60))
        mix = rng.choice([(AdapterUse(1),), (AdapterUse(2),), (AdapterUse(1, 3000), AdapterUse(2, 7000))])
        ledger.record(make_request(i, when=when, adapters=mix, prompt=rng.randrange(1, 500), payer=rng.choice([PAYER, "0x" + "b9" * 20])))
    for _ in range(25):
        a = T0 + dt.timedelta(seconds=rng.randrange(0, 7 * 3600))
        b = a + dt.timedelta(seconds=rng.randrange(0, 4 * 3600))
        with db.reader.begin() as s:
            u = m.AdapterUsage
            raw = s.execute(select(func.count(), func.coalesce(func.sum(u.prompt_tokens), 0))
                            .where(u.adapter_id == 1, u.finished_at >= a, u.finished_at < b)).one()
            raw_cost = sum(s.scalars(select(u.cost_share).where(u.adapter_id == 1, u.finished_at >= a, u.finished_at < b)))
        got = usage_by_adapter(db, 1, a, b)
        assert (got.requests, got.prompt_tokens, got.cost) == (raw[0], raw[1], raw_cost)


def test_costs_far_above_2_pow_64_are_recorded_and_summed_exactly(ledger, db):
    """Amounts no 64-bit integer or float holds round-trip through the ledger, its hourly rollups and
    its sums exactly (SQLite: decimal strings + u256_sum; PostgreSQL: NUMERIC(78, 0) + SUM)."""
    from attribution.ledger import AdapterInfo
    from attribution.pricing import request_cost

    price = 10**40 + 7  # per 1M tokens: one request costs about 10**36 base units
    ledger.upsert_adapter(AdapterInfo(3, "0x" + "a3" * 20, price_per_m_input=price, price_per_m_output=3 * price,
                                      owner_bps=6000, contributors_bps=0, operator_bps=4000))
    # three requests in the first hour, one in the second, one in the third: whole hours come from the
    # rollups, the partial edges from the raw log, so both paths carry big numbers
    times = [T0 + dt.timedelta(minutes=5), T0 + dt.timedelta(minutes=30), T0 + dt.timedelta(minutes=59),
             T0 + dt.timedelta(hours=1, minutes=10), T0 + dt.timedelta(hours=2, minutes=1)]
    recorded = [ledger.record(make_request(100 + i, adapters=(AdapterUse(3),), prompt=123 + i, completion=45, when=t))
                for i, t in enumerate(times)]
    costs = [r.cost for r in recorded]
    assert all(c > 2**118 for c in costs) and len(set(costs)) == len(costs)
    assert costs == [request_cost(123 + i, 45, price, 3 * price) for i in range(5)]  # exact integer pricing
    usage = usage_by_adapter(db, 3, T0 + dt.timedelta(minutes=1), T0 + dt.timedelta(hours=2, minutes=30))
    assert usage.requests == 5 and usage.cost == sum(costs)
    whole_hours = usage_by_adapter(db, 3, T0, T0 + dt.timedelta(hours=2))
    assert whole_hours.cost == sum(costs[:4])
    assert usage_by_payer(db, PAYER, T0, T0 + dt.timedelta(hours=3)).cost == sum(costs)
    owner = rewards(db, "0x" + "a3" * 20)
    owner_credits = sum(a for r in recorded for (payee, role, _, a) in r.credits if role == "owner")
    assert owner.pending == owner_credits and owner_credits > 2**64
