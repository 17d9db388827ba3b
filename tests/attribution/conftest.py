"""Fixtures: a real ledger database migrated with the real Alembic revisions (migrated once per
session into a template, then copied per test so each test starts clean). SQLite files by default;
PostgreSQL databases when OPENLORA_TEST_DATABASE_URL is set (scripts/with-postgres.sh), see
tests/migrations/ledger_databases.py. `sqlite_db` is always SQLite, for the SQLite-only tests."""

from __future__ import annotations

import datetime as dt

import pytest
from eth_account import Account

from attribution.db import open_database
from attribution.ledger import AdapterInfo, AdapterUse, FinishedRequest, Ledger, LedgerConfig

from ..migrations.ledger_databases import (  # noqa: F401  (fixtures)
    SqliteDatabases,
    db_url,
    ledger_databases,
    migrated_template,
)

NODE_ID = 1
CHAIN_ID = 31337
SETTLEMENT = "0x5fbdb2315678afecb367f032d93f642f64180aa3"
OPERATOR = "0x" + "0e" * 20
OWNER = "0x" + "a1" * 20
PAYER = "0x" + "b2" * 20
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NODE_KEY = "0x" + "4c" * 32  # a fixed test key so receipts are reproducible


@pytest.fixture
def db(db_url):
    database = open_database(db_url)
    yield database
    database.dispose()


@pytest.fixture
def sqlite_db(tmp_path):
    """A migrated SQLite ledger whatever the run's backend (for tests of SQLite-only behaviour)."""
    from migrations import upgrade

    url = SqliteDatabases(tmp_path).new()
    upgrade(url)
    database = open_database(url)
    yield database
    database.dispose()


@pytest.fixture
def config() -> LedgerConfig:
    return LedgerConfig(node_id=NODE_ID, operator=OPERATOR, chain_id=CHAIN_ID, settlement_contract=SETTLEMENT,
                        base_price_per_m_input=1_000, base_price_per_m_output=2_000)


@pytest.fixture
def ledger(db, config) -> Ledger:
    lg = Ledger(db, config, NODE_KEY)
    lg.upsert_datanet(7, OWNER, name="legal")
    # adapter 1 is trained on Datanet 7; adapter 2 has no Datanet
    lg.upsert_adapter(AdapterInfo(1, OWNER, price_per_m_input=3 * 10**15, price_per_m_output=9 * 10**15,
                                  owner_bps=5000, contributors_bps=3000, operator_bps=2000, datanet_id=7))
    lg.upsert_adapter(AdapterInfo(2, "0x" + "a2" * 20, price_per_m_input=10**12, price_per_m_output=7 * 10**12,
                                  owner_bps=7000, contributors_bps=1000, operator_bps=2000))
    return lg


def make_request(i: int, *, payer: str = PAYER, adapters=(AdapterUse(1),), prompt=100, completion=50,
                 shares=None, when: dt.datetime | None = None) -> FinishedRequest:
    start = when or T0 + dt.timedelta(seconds=i)
    return FinishedRequest(request_id=f"req-{i}", payer=payer, node_id=NODE_ID, adapters=tuple(adapters),
                           prompt_tokens=prompt, completion_tokens=completion, received_at=start,
                           first_token_at=start + dt.timedelta(milliseconds=20),
                           finished_at=start + dt.timedelta(milliseconds=500), contributor_shares=shares)


def payer_account(n: int):
    return Account.from_key("0x" + f"{n + 1:064x}")
