"""The schema exists only through Alembic revisions; models and revisions never drift apart.
Runs on the run's backend (SQLite by default, PostgreSQL under scripts/with-postgres.sh)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from attribution.db import open_database
from attribution.models import Base
from migrations import alembic_config, downgrade, upgrade

from .ledger_databases import tables


def test_upgrade_then_models_and_migrations_have_no_diff(empty_db_url):
    upgrade(empty_db_url)
    db = open_database(empty_db_url)
    try:
        with db.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True, "render_as_batch": True})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        db.dispose()
    assert diff == [], f"models and migrations differ; write a revision: {diff}"


def test_downgrade_to_base_removes_every_table_and_upgrade_restores_them(empty_db_url):
    upgrade(empty_db_url)
    assert set(Base.metadata.tables) <= tables(empty_db_url)
    downgrade(empty_db_url, "base")
    assert tables(empty_db_url) <= {"alembic_version"}
    upgrade(empty_db_url)
    assert set(Base.metadata.tables) <= tables(empty_db_url)


def test_revision_files_are_named_rev_slug_and_config_is_built_in_code(tmp_path):
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(f"sqlite:///{tmp_path / 'x.db'}"))
    revisions = list(script.walk_revisions())
    assert revisions, "no revisions found through the programmatic config"
    for rev in revisions:
        assert rev.path.endswith(f"/{rev.revision}_{rev.path.rsplit('/', 1)[1].split('_', 1)[1]}")
        assert rev.path.rsplit("/", 1)[1].startswith(f"{rev.revision}_")


def test_drift_check_notices_a_model_change(empty_db_url):
    """The comparison above is not vacuous: a column added only to the models shows up as a diff."""
    from sqlalchemy import Column, Integer, MetaData

    upgrade(empty_db_url)
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["requests"].append_column(Column("extra", Integer, nullable=True))
    db = open_database(empty_db_url)
    try:
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), changed)
    finally:
        db.dispose()
    assert [d[0] for d in diff] == ["add_column"]


def test_the_run_uses_the_backend_it_was_asked_for(empty_db_url):
    """Under scripts/with-postgres.sh every database here is PostgreSQL; otherwise SQLite (no silent fallback)."""
    import os

    from .ledger_databases import ENV

    db = open_database(empty_db_url)
    try:
        with db.engine.connect() as conn:
            name = conn.dialect.name
            if name == "postgresql":
                assert conn.exec_driver_sql("SHOW server_version_num").scalar()
    finally:
        db.dispose()
    assert name == ("postgresql" if os.environ.get(ENV) else "sqlite")
