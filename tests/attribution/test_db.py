"""Engine set-up: SQLite pragmas on every connection, exact 256-bit amounts, UTC timestamps."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select, text

from attribution import models as m
from attribution.db import U256_MAX, amount_sum, open_database
from attribution.errors import DatabaseError, InvalidInput


def test_sqlite_connections_have_wal_foreign_keys_and_busy_timeout(db):
    with db.reader.begin() as s:
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
