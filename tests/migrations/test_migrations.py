"""The schema exists only through Alembic revisions; models and revisions never drift apart."""

from __future__ import annotations

import sqlite3

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from attribution.db import open_database
from attribution.models import Base
from migrations import alembic_config, downgrade, upgrade


def test_upgrade_then_models_and_migrations_have_no_diff(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    db = open_database(url)
    try:
        with db.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "render_as_batch": True})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        db.dispose()
    assert diff == [], f"models and migrations differ; write a revision: {diff}"


def test_downgrade_to_base_removes_every_table_and_upgrade_restores_them(tmp_path):
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    downgrade(url, "base")
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables <= {"alembic_version"}
    upgrade(url)
    with sqlite3.connect(path) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert set(Base.metadata.tables) <= tables


def test_revision_files_are_named_rev_slug_and_config_is_built_in_code(tmp_path):
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(f"sqlite:///{tmp_path / 'x.db'}"))
    revisions = list(script.walk_revisions())
    assert revisions, "no revisions found through the programmatic config"
    for rev in revisions:
        assert rev.path.endswith(f"/{rev.revision}_{rev.path.rsplit('/', 1)[1].split('_', 1)[1]}")
        assert rev.path.rsplit("/", 1)[1].startswith(f"{rev.revision}_")


def test_drift_check_notices_a_model_change(tmp_path):
    """The comparison above is not vacuous: a column added only to the models shows up as a diff."""
    from sqlalchemy import Column, Integer, MetaData

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["requests"].append_column(Column("extra", Integer, nullable=True))
    db = open_database(url)
    try:
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), changed)
    finally:
        db.dispose()
    assert [d[0] for d in diff] == ["add_column"]
