"""`openlora db upgrade|downgrade|current`: the ledger schema, changed only through Alembic revisions.

The database is `OPENLORA_DATABASE_URL` / `database_url` in the config file, else
sqlite:///<data_dir>/ledger.db (Settings.resolved_database_url). SQLite and PostgreSQL URLs both work.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("db", help="migrate the ledger database", description="Migrate the ledger database (Alembic).")
    dsub = p.add_subparsers(dest="db_command", metavar="ACTION")
    dsub.required = True
    up = dsub.add_parser("upgrade", help="upgrade the schema (default: to the latest revision)")
    up.add_argument("revision", nargs="?", default="head", help="target revision (default: head)")
    up.set_defaults(func=_upgrade)
    down = dsub.add_parser("downgrade", help="downgrade the schema (default: one revision)")
    down.add_argument("revision", nargs="?", default="-1", help="target revision, e.g. -1 or base (default: -1)")
    down.set_defaults(func=_downgrade)
    cur = dsub.add_parser("current", help="show the database's revision and the latest one")
    cur.set_defaults(func=_current)


def _run(command_name: str, url: str, revision: str) -> None:
    from alembic import command
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from attribution.errors import DatabaseError
    from migrations import alembic_config

    try:
        getattr(command, command_name)(alembic_config(url), revision)
    except (CommandError, SQLAlchemyError) as exc:
        raise DatabaseError(f"db {command_name} {revision} failed: {str(exc).splitlines()[0]}") from None


def _upgrade(args, settings) -> int:
    url = settings.resolved_database_url
    _run("upgrade", url, args.revision)
    print(f"database at revision {_current_revision(url)} ({_safe(url)})")
    return 0


def _downgrade(args, settings) -> int:
    url = settings.resolved_database_url
    _run("downgrade", url, args.revision)
    print(f"database at revision {_current_revision(url) or 'base (empty)'} ({_safe(url)})")
    return 0


def _current(args, settings) -> int:
    from alembic.script import ScriptDirectory

    from migrations import alembic_config

    url = settings.resolved_database_url
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    current = _current_revision(url)
    state = "up to date" if current == head else "run `openlora db upgrade`"
    print(f"current {current or 'base (empty)'}, head {head}: {state} ({_safe(url)})")
    return 0


def _current_revision(url: str) -> str | None:
    from alembic.migration import MigrationContext
    from sqlalchemy.exc import SQLAlchemyError

    from attribution.db import open_database
    from attribution.errors import DatabaseError

    db = open_database(url)
    try:
        with db.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the schema revision of {_safe(url)}: {str(exc).splitlines()[0]}") from None
    finally:
        db.dispose()


def _safe(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)
