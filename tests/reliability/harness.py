"""Shared parts of the reliability tests: the fault log (rows of docs/reliability.md), a paid node run as
a real `openlora serve` subprocess (so it can be killed with SIGKILL), a fault-injecting JSON-RPC proxy in
front of anvil, and ledger/chain invariant readers.

Rows are keyed by (fault, injected) and replaced on every run, so the JSON file describes the last run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
LOG = Path(os.environ.get("OPENLORA_RELIABILITY_JSON", ROOT / "docs" / "reliability.json"))
PASSWORD = "reliability password"


def record(area: str, fault: str, injected: str, outcome: str, test: str | None = None) -> None:
    """Append (or replace) one row of the reliability table; called after the test's asserts pass."""
    LOG.parent.mkdir(parents=True, exist_ok=True)
    test = test or os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    with open(Path(tempfile.gettempdir()) / "openlora-reliability.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(LOG.read_text()) if LOG.exists() else []
        rows = [r for r in rows if (r["fault"], r["injected"]) != (fault, injected)]
        rows.append({"area": area, "fault": fault, "injected": injected, "outcome": outcome, "test": test,
                     "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        tmp = LOG.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        os.replace(tmp, LOG)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


# -- a paid node as a subprocess --------------------------------------------------------------------

def node_env(chain, root: Path, tiny_llama_dir: Path, rpc_url: str | None = None, **overrides) -> dict:
    """OPENLORA_* settings of a paid node on `chain` (keystore and deployment written under root)."""
    from node import keys

    root.mkdir(parents=True, exist_ok=True)
    if not (root / "node-key.json").exists():
        keys.create_keystore(root / "node-key.json", PASSWORD, private_key=chain.node_key)
        chain.extra["deployment"].save(root / "deployment.json")
        (root / "store").mkdir(exist_ok=True)
    s = dict(model=str(tiny_llama_dir), served_model_name="smollm2-135m-instruct", adapter_dir=root / "store",
             device="cpu", data_dir=root, node_id=chain.node_id, rpc_url=rpc_url or chain.anvil.url,
             deployment_file=root / "deployment.json", keystore_file=root / "node-key.json",
             settle_confirmations=1, settle_interval_s=3600, registry_sync_s=3600, base_price_per_m_input=1_000_000,
             base_price_per_m_output=2_000_000, escrow_cache_s=0, engine_max_num_seqs=8, engine_num_lora_slots=2,
             engine_max_lora_rank=8, log_json=True, log_level="warning")
    s.update(overrides)
    env = {**os.environ, keys.PASSWORD_ENV: PASSWORD, "XDG_CONFIG_HOME": str(root / "config")}
    env.pop("OPENLORA_CONFIG", None)
    env.update({f"OPENLORA_{k.upper()}": str(v) for k, v in s.items()})
    return env


class NodeProcess:
    """`python -m node.cli serve` on a free port; kill9() is a real SIGKILL."""

    def __init__(self, env: dict, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--port", str(self.port)], cwd=ROOT,
                                     env=env, stdout=self.log, stderr=self.log, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> "NodeProcess":
        def ready():
            assert self.proc.poll() is None, f"node exited with {self.proc.returncode}"
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(self.url + "/readyz", timeout=2).status_code == 200
            return False
        wait_for(ready, timeout, "the node to become ready", 0.2)
        return self

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()
        return self.proc.returncode


# -- a JSON-RPC proxy that injects faults -------------------------------------------------------------

class RpcProxy:
    """Loopback HTTP proxy to an anvil. mode: ok | down (connection closed, no answer) | slow (delay each
    call by `delay` s) | error (HTTP 503) | rpc_error (JSON-RPC error object). `calls` counts requests."""

    def __init__(self, upstream: str):
        self.upstream, self.mode, self.delay, self.calls = upstream, "ok", 0.0, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                proxy.calls += 1
                mode = proxy.mode
                if mode == "down":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if mode == "slow":
                    time.sleep(proxy.delay)
                if mode == "error":
                    return self._answer(503, b'{"error":"upstream unavailable"}')
                if mode == "rpc_error":
                    doc = json.loads(body)
                    err = {"jsonrpc": "2.0", "id": doc.get("id") if isinstance(doc, dict) else None,
                           "error": {"code": -32603, "message": "internal error (injected)"}}
                    return self._answer(200, json.dumps(err).encode())
                try:
                    r = httpx.post(proxy.upstream, content=body, headers={"Content-Type": "application/json"}, timeout=30)
                    self._answer(r.status_code, r.content)
                except httpx.TransportError:
                    self.close_connection = True

            def _answer(self, status, data):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# -- invariants -------------------------------------------------------------------------------------

def ledger_rows(db_path: Path) -> dict:
    """Receipts, batch memberships, batch states and credits, read with plain sqlite3."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        q = lambda sql: con.execute(sql).fetchall()  # noqa: E731
        return {
            "receipts": q("SELECT request_id, payer, cost FROM receipts"),
            "requests": q("SELECT id FROM requests"),
            "memberships": q("SELECT request_id, batch_id FROM batch_receipts"),
            "batches": dict(q("SELECT id, status FROM settlement_batches")),
            "credits": q("SELECT payee, amount FROM request_credits"),
            "payouts": q("SELECT p.payee, p.amount, b.status FROM batch_payouts p JOIN settlement_batches b ON b.id = p.batch_id"),
        }
    finally:
        con.close()


def check_settled_books(chain, rows: dict, payers: list[str]) -> dict:
    """Every receipt in exactly one confirmed batch; on-chain collected == ledger billed per payer; on-chain
    claimable == ledger credits per payee. Returns the totals compared."""
    from collections import Counter, defaultdict

    ids = [r[0] for r in rows["receipts"]]
    assert len(ids) == len(set(ids)) == len(rows["requests"])
    member = Counter(r[0] for r in rows["memberships"])
    assert set(member) == set(ids), f"receipts outside any batch: {set(ids) - set(member)}"
    assert all(n == 1 for n in member.values())
    assert all(rows["batches"][b] == "confirmed" for _, b in rows["memberships"]), rows["batches"]
    billed = defaultdict(int)
    for _, payer, cost in rows["receipts"]:
        billed[payer.lower()] += int(cost)
    w3 = chain.w3
    for p in payers:
        addr = w3.to_checksum_address(p)
        assert chain.settlement.functions.collected(addr, chain.node_id).call() == billed[p.lower()], p
    credited = defaultdict(int)
    for payee, amount in rows["credits"]:
        credited[payee.lower()] += int(amount)
    for payee, amount in credited.items():
        assert chain.settlement.functions.claimable(w3.to_checksum_address(payee)).call() == amount, payee
    return {"receipts": len(ids), "batches": len(set(rows["batches"])), "billed": sum(billed.values()),
            "credited": sum(credited.values())}
