"""`openlora db upgrade|downgrade|current` against a real SQLite file chosen by OPENLORA_DATABASE_URL."""

from __future__ import annotations

import sqlite3

from node.cli import main


def tables(path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_db_upgrade_current_downgrade(tmp_path, monkeypatch, capsys):
    path = tmp_path / "sub" / "ledger.db"
    monkeypatch.setenv("OPENLORA_DATABASE_URL", f"sqlite:///{path}")
    monkeypatch.setenv("OPENLORA_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    assert main(["db", "current"]) == 0
    assert "base (empty)" in capsys.readouterr().out
    assert main(["db", "upgrade"]) == 0
    assert "requests" in tables(path) and "receipts" in tables(path)
    assert main(["db", "current"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["db", "downgrade", "base"]) == 0
    assert tables(path) <= {"alembic_version"}


def test_db_upgrade_to_an_unknown_revision_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENLORA_DATABASE_URL", f"sqlite:///{tmp_path / 'ledger.db'}")
    monkeypatch.setenv("OPENLORA_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    assert main(["db", "upgrade", "nosuchrev"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("openlora: error: db upgrade nosuchrev failed") and err.count("\n") == 1
