"""`make demo`'s flow (node/demo.py) on the tiny model with 3 training steps, run twice in one data dir.

Real parts throughout: anvil from npm, the `openlora` CLI, `openlora serve` as a subprocess, the openai
client, the SQLite ledger. The first run does every step; the second reuses the chain state, the node
registration, the Datanets and the trained and published adapters instead of failing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = ["setup", "chain", "register", "datanets", "train", "publish", "serve", "payer", "chat", "settle",
         "rewards", "claim"]


def run_demo(model_dir: Path, data_dir: Path) -> tuple[dict, str]:
    cmd = [sys.executable, "-m", "node.demo", "--model", str(model_dir), "--steps", "3", "--data-dir", str(data_dir),
           "--max-tokens", "12", "--max-len", "64", "--examples", "12"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    return json.loads((data_dir / "demo-result.json").read_text()), out


@pytest.mark.timeout(900)
def test_demo_runs_every_step_then_reuses(tiny_llama_dir, tmp_path):
    data_dir = tmp_path / "demo"
    first, out = run_demo(tiny_llama_dir, data_dir)
    assert first["exit_code"] == 0 and first["steps"] == STEPS, out[-4000:]
    assert first["deployed_now"] and first["node_registered_now"]
    assert all(d["created_now"] for d in first["datanets"].values()) and len(first["datanets"]) == 2
    assert all(a["trained_now"] and a["published_now"] for a in first["adapters"].values())
    assert len(first["answers"]) == 5 and all(a["cost"] > 0 for a in first["answers"])
    # per-request attribution reached the ledger for the adapters' requests
    assert any(a["shares"] for a in first["answers"]), out[-4000:]
    # ledger and chain agree for every payee, and some contributor earned in this run
    rows = first["rewards"]
    assert rows and all(r["agree"] and r["ledger"] == r["chain"] for r in rows)
    assert any(r["this_run"] > 0 for r in rows if r["label"].startswith("contributor"))
    claim = first["claim"]
    assert claim and claim["amount"] > 0 and claim["balance_after"] == claim["balance_before"] + claim["amount"]
    assert "==> Chat requests" in out and "==> Rewards" in out

    second, out2 = run_demo(tiny_llama_dir, data_dir)
    assert second["exit_code"] == 0 and second["steps"] == STEPS, out2[-4000:]
    assert not second["deployed_now"] and not second["node_registered_now"]
    assert not any(d["created_now"] for d in second["datanets"].values())
    assert {k: d["id"] for k, d in second["datanets"].items()} == {k: d["id"] for k, d in first["datanets"].items()}
    assert not any(a["trained_now"] or a["published_now"] for a in second["adapters"].values())
    assert {k: a["id"] for k, a in second["adapters"].items()} == {k: a["id"] for k, a in first["adapters"].items()}
    assert "cached from an earlier run" in out2 and "already deployed" in out2
    assert all(r["agree"] for r in second["rewards"])
    # anvil and the node were stopped at the end of each run
    assert not (data_dir / "chain" / "anvil.pid").exists()
