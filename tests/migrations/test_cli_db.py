"""`openlora db upgrade|downgrade|current` against a real database chosen by OPENLORA_DATABASE_URL
(a SQLite file in a directory that does not exist yet, or a PostgreSQL database under scripts/with-postgres.sh)."""

from __future__ import annotations

from node.cli import main

from .ledger_databases import tables


def test_db_upgrade_current_downgrade(empty_db_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENLORA_DATABASE_URL", empty_db_url)
    monkeypatch.setenv("OPENLORA_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    assert main(["db", "current"]) == 0
    assert "base (empty)" in capsys.readouterr().out
    assert main(["db", "upgrade"]) == 0
    assert {"requests", "receipts"} <= tables(empty_db_url)
    assert main(["db", "current"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["db", "downgrade", "base"]) == 0
    assert tables(empty_db_url) <= {"alembic_version"}


def test_db_upgrade_to_an_unknown_revision_is_a_one_line_error(empty_db_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENLORA_DATABASE_URL", empty_db_url)
    monkeypatch.setenv("OPENLORA_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    assert main(["db", "upgrade", "nosuchrev"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("openlora: error: db upgrade nosuchrev failed") and err.count("\n") == 1
