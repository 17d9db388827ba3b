"""Alembic environment: runs revisions against the ledger database with the ledger's own engine
(so SQLite gets the same pragmas as at run time) and `render_as_batch=True` (SQLite alters tables
by copying them)."""

from __future__ import annotations

from alembic import context

from attribution.db import Amount, UTCDateTime, open_database
from attribution.models import Base

config = context.config
target_metadata = Base.metadata


def render_item(type_, obj, autogen_context):
    """Render the ledger's column types as plain SQLAlchemy types so revisions never import the app."""
    if type_ == "type" and isinstance(obj, Amount):
        return 'sa.Numeric(78, 0).with_variant(sa.String(78), "sqlite")'
    if type_ == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime()"
    return False


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        render_item=render_item,
        **kwargs,
    )


def run_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # a caller (tests) handed us an open connection
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")
    db = open_database(url)
    try:
        with db.engine.connect() as conn:
            _configure(connection=conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        db.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
