"""Throwaway ledger databases for the ledger and migration tests, on the backend the run chose.

By default every database is a real SQLite file under pytest's temporary directory. When
OPENLORA_TEST_DATABASE_URL names a PostgreSQL server (scripts/with-postgres.sh starts one and sets it),
every database is a real PostgreSQL database on that server, created by `new` and dropped by `drop`.
A server that cannot be reached is a test failure, never a skip.

`new(template=url)` gives a copy of an existing database (a file copy on SQLite, CREATE DATABASE ...
TEMPLATE on PostgreSQL), so the migrations run once per session and each test starts from a clean
copy of the migrated schema.

The fixtures at the bottom are imported by tests/attribution/conftest.py and tests/migrations/conftest.py.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

ENV = "OPENLORA_TEST_DATABASE_URL"
_numbers = itertools.count()  # one sequence for every factory in the process: names never collide


class SqliteDatabases:
    backend = "sqlite"

    def __init__(self, root: Path) -> None:
        self.root = root

    def new(self, template: str | None = None) -> str:
        # in a sub-directory that does not exist yet: open_database must create it
        path = self.root / f"db{next(_numbers)}" / "ledger.db"
        if template is not None:
            path.parent.mkdir(parents=True)
            shutil.copy(make_url(template).database, path)
        return f"sqlite:///{path}"

    def drop(self, url: str) -> None:
        Path(make_url(url).database).unlink(missing_ok=True)

    def close(self) -> None:
        pass


class PostgresDatabases:
    backend = "postgresql"

    def __init__(self, server_url: str) -> None:
        self.server = make_url(server_url)
        if self.server.get_backend_name() != "postgresql":
            raise pytest.UsageError(f"{ENV} must be a postgresql+psycopg:// URL, got {server_url!r}")
        # CREATE / DROP DATABASE cannot run inside a transaction block
        self.admin = create_engine(self.server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with self.admin.connect() as conn:  # fails the run here when the server is not there
            conn.execute(text("SELECT 1"))

    def new(self, template: str | None = None) -> str:
        name = f"openlora_test_{os.getpid()}_{next(_numbers)}"
        sql = f'CREATE DATABASE "{name}"'
        if template is not None:
            sql += f' TEMPLATE "{make_url(template).database}"'
        with self.admin.connect() as conn:
            conn.execute(text(sql))
        return self.server.set(database=name).render_as_string(hide_password=False)

    def drop(self, url: str) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))

    def close(self) -> None:
        self.admin.dispose()


def tables(url: str) -> set[str]:
    """Names of the tables in the database at `url` (any backend)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def ledger_databases(tmp_path_factory):
    """The run's database factory: SQLite files, or PostgreSQL databases when OPENLORA_TEST_DATABASE_URL is set."""
    url = os.environ.get(ENV)
    dbs = PostgresDatabases(url) if url else SqliteDatabases(tmp_path_factory.mktemp("ledger-dbs"))
    yield dbs
    dbs.close()


@pytest.fixture(scope="session")
def migrated_template(ledger_databases) -> str:
    """A database migrated to head with the project's Alembic revisions, once per session."""
    from migrations import upgrade

    url = ledger_databases.new()
    upgrade(url)
    yield url
    ledger_databases.drop(url)


@pytest.fixture
def db_url(ledger_databases, migrated_template) -> str:
    """A fresh copy of the migrated schema for one test, dropped afterwards."""
    url = ledger_databases.new(template=migrated_template)
    yield url
    ledger_databases.drop(url)


@pytest.fixture
def empty_db_url(ledger_databases) -> str:
    """A fresh database with no tables at all (for migration tests), dropped afterwards."""
    url = ledger_databases.new()
    yield url
    ledger_databases.drop(url)
