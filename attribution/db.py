"""Engines and sessions for the ledger, and the two column types every table shares.

SQLite is the default store (one file, WAL so readers never block the writer); PostgreSQL works by URL
with the same code. Dialect differences live here and nowhere else:

- `Amount`: token base units are unsigned 256-bit integers on chain. PostgreSQL stores them exactly as
  NUMERIC(78, 0) (78 digits hold 2**256 - 1). SQLite has no such type: its INTEGER is 64-bit and a larger
  value under NUMERIC affinity silently becomes a lossy REAL, so on SQLite an amount is a decimal string
  and sums go through `u256_sum`, an exact aggregate registered on every connection. Python sees `int`.
- `UTCDateTime`: timestamps are stored as naive UTC and come back timezone-aware, so SQLite (which has
  no time zones) and PostgreSQL behave the same.
- Write transactions on SQLite start with BEGIN IMMEDIATE: a deferred transaction that reads and then
  writes can fail at once with SQLITE_BUSY when another writer got there first (the busy timeout does
  not apply to that upgrade), whereas IMMEDIATE waits its turn under the busy timeout.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from sqlalchemy import DateTime, Engine, Numeric, String, create_engine, event, func
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from attribution.errors import DatabaseError, InvalidInput

U256_MAX = 2**256 - 1
DEFAULT_BUSY_TIMEOUT_MS = 10_000


class Amount(TypeDecorator):
    """An unsigned 256-bit integer amount (token base units); see the module docstring."""

    impl = Numeric(78, 0)
    cache_ok = True

    def load_dialect_impl(self, dialect):
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(78))
        return dialect.type_descriptor(Numeric(78, 0))

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        value = check_amount(value)
        return str(value) if dialect.name == "sqlite" else Decimal(value)

    def process_result_value(self, value, dialect):
        return None if value is None else int(value)


def check_amount(value, what: str = "amount") -> int:
    """An exact non-negative integer below 2**256; floats and bools are refused (money is never a float)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, Decimal) and value == value.to_integral_value():
            value = int(value)
        else:
            raise InvalidInput(f"{what} must be an integer number of base units, got {value!r}")
    if not 0 <= value <= U256_MAX:
        raise InvalidInput(f"{what} must be between 0 and 2**256-1, got {value}")
    return value


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC in Python, naive UTC in the database."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise InvalidInput(f"timestamps must be timezone-aware, got naive {value!r}")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value, dialect):
        return None if value is None else value.replace(tzinfo=dt.UTC)


class _U256Sum:
    """SQLite aggregate: exact sum of decimal-string amounts (Python ints never overflow)."""

    def __init__(self) -> None:
        self.total: int | None = None

    def step(self, value) -> None:
        if value is not None:
            self.total = (self.total or 0) + int(value)

    def finalize(self):
        return None if self.total is None else str(self.total)


def amount_sum(session: Session, column):
    """SUM of an Amount column that is exact on every dialect (NULL for no rows)."""
    name = session.get_bind().dialect.name
    fn = func.u256_sum if name == "sqlite" else func.sum
    return fn(column, type_=Amount())


@dataclass(frozen=True)
class Database:
    """One engine and its session factories. `writer` sessions take SQLite's write lock up front."""

    engine: Engine
    writer: sessionmaker[Session]
    reader: sessionmaker[Session]

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()


def open_database(url: str, *, busy_timeout_ms: int = DEFAULT_BUSY_TIMEOUT_MS, echo: bool = False) -> Database:
    """Open (never create tables in) the ledger database at `url`; run `openlora db upgrade` for the schema."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseError(f"invalid database URL {url!r}: {exc}") from None
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(parsed, echo=echo, future=True)
    except (SQLAlchemyError, ImportError) as exc:
        raise DatabaseError(f"cannot open database {parsed.render_as_string(hide_password=True)}: {exc}") from None
    if sqlite:
        _configure_sqlite(engine, busy_timeout_ms)
    writer = sessionmaker(engine.execution_options(openlora_write=True), expire_on_commit=False)
    reader = sessionmaker(engine, expire_on_commit=False)
    return Database(engine=engine, writer=writer, reader=reader)


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Take transaction control from the sqlite3 module so BEGIN is ours (see `_on_begin`).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL is durable against application crashes; only an OS crash can lose the last commits.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()
        dbapi_conn.create_aggregate("u256_sum", 1, _U256Sum)

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("openlora_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
