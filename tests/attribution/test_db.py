"""Engine set-up: SQLite pragmas on every connection, exact 256-bit amounts, UTC timestamps.
`db` is the run's backend (SQLite, or PostgreSQL under scripts/with-postgres.sh); `sqlite_db` is always SQLite."""

from __future__ import annotations

import datetime as dt

import pytest
from decimal import Decimal

from sqlalchemy import Numeric, String, inspect, select, text

from attribution import models as m
from attribution.db import U256_MAX, Amount, amount_sum, open_database
from attribution.errors import DatabaseError, InvalidInput


def test_sqlite_connections_have_wal_foreign_keys_and_busy_timeout(sqlite_db):
    with sqlite_db.reader.begin() as s:
        assert s.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert s.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert s.execute(text("PRAGMA busy_timeout")).scalar() == 10_000


def test_foreign_keys_are_enforced(db):
    from sqlalchemy.exc import IntegrityError

    with pytest.raises(IntegrityError):
        with db.writer.begin() as s:
            s.add(m.ApiKey(payer_id=999, key_hash="x" * 64, prefix="olk_", label="", created_at=dt.datetime.now(dt.UTC)))


def test_amounts_above_2_pow_63_round_trip_and_sum_exactly(db):
    big = 2**255 + 12345
    with db.writer.begin() as s:
        s.add(m.PayeeBalance(payee="0x" + "11" * 20, credited=big, batched=0))
        s.add(m.PayeeBalance(payee="0x" + "22" * 20, credited=2**64 + 1, batched=U256_MAX))
    with db.reader.begin() as s:
        assert s.get(m.PayeeBalance, "0x" + "11" * 20).credited == big
        assert s.get(m.PayeeBalance, "0x" + "22" * 20).batched == U256_MAX
        assert s.scalar(select(amount_sum(s, m.PayeeBalance.credited))) == big + 2**64 + 1


def test_amount_columns_are_stored_exactly_on_each_backend(db):
    """PostgreSQL: NUMERIC(78, 0); SQLite: a decimal string (its INTEGER is 64-bit, NUMERIC may become REAL)."""
    insp = inspect(db.engine)
    amount_columns = [(t.name, c.name) for t in m.Base.metadata.sorted_tables for c in t.columns
                      if isinstance(c.type, Amount)]
    assert len(amount_columns) >= 15
    for table, column in amount_columns:
        got = {c["name"]: c["type"] for c in insp.get_columns(table)}[column]
        if db.engine.dialect.name == "postgresql":
            assert isinstance(got, Numeric) and (got.precision, got.scale) == (78, 0), (table, column, got)
        else:
            assert isinstance(got, String) and got.length == 78, (table, column, got)
    with db.writer.begin() as s:
        s.add(m.PayeeBalance(payee="0x" + "55" * 20, credited=U256_MAX, batched=2**64 + 7))
    with db.reader.begin() as s:
        raw = s.execute(text("SELECT credited, batched FROM payee_balances")).one()
    # what the driver hands back before the column type converts it: exact, never a float
    assert [type(v) for v in raw] == ([Decimal, Decimal] if db.engine.dialect.name == "postgresql" else [str, str])
    assert [int(v) for v in raw] == [U256_MAX, 2**64 + 7]


@pytest.mark.parametrize("bad", [1.5, -1, 2**256, True, "12"])
def test_amount_column_refuses_non_integers_and_out_of_range(db, bad):
    # the column type is the last line of defence (the ledger validates first); SQLAlchemy wraps it
    from sqlalchemy.exc import StatementError

    with pytest.raises(StatementError) as info:
        with db.writer.begin() as s:
            s.add(m.PayeeBalance(payee="0x" + "33" * 20, credited=bad, batched=0))
            s.flush()
    assert isinstance(info.value.orig, InvalidInput)
    with db.reader.begin() as s:
        assert s.get(m.PayeeBalance, "0x" + "33" * 20) is None


def test_timestamps_come_back_as_aware_utc(db):
    local = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    with db.writer.begin() as s:
        s.add(m.Payer(address="0x" + "44" * 20, created_at=local))
    with db.reader.begin() as s:
        got = s.scalar(select(m.Payer.created_at))
    assert got == local and got.tzinfo == dt.UTC and got.hour == 10


def test_bad_database_url_is_a_ledger_error():
    with pytest.raises(DatabaseError):
        open_database("not a url")
