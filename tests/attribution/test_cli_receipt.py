"""`openlora receipt verify FILE` on a receipt the ledger really signed, and `receipt show`."""

from __future__ import annotations

import json

from eth_account import Account

from attribution.ledger import signed_receipt_json
from node.cli import main

from .conftest import NODE_KEY, make_request


def test_receipt_verify_prints_the_node_signer_and_rejects_tampering(ledger, db, db_url, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OPENLORA_DATABASE_URL", db_url)
    monkeypatch.setenv("OPENLORA_CONFIG", str(tmp_path / "none.toml"))
    (tmp_path / "none.toml").write_text("")
    ledger.record(make_request(1))
    signer = Account.from_key(NODE_KEY).address.lower()
    assert main(["receipt", "show", "req-1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == signed_receipt_json(db, "req-1")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    assert main(["receipt", "verify", str(path), "--signer", signer]) == 0
    assert f"signer  {signer}" in capsys.readouterr().out
    assert main(["receipt", "verify", str(path), "--signer", "0x" + "11" * 20]) == 1
    assert "not by 0x1111" in capsys.readouterr().err
    doc["typedData"]["message"]["outputTokens"] += 1
    path.write_text(json.dumps(doc))
    assert main(["receipt", "verify", str(path)]) == 1
    assert "does not match" in capsys.readouterr().err
    path.write_text("{not json")
    assert main(["receipt", "verify", str(path)]) == 1
    assert main(["receipt", "show", "req-missing"]) == 1
