"""kill -9 of a real paid node (`openlora serve` subprocess, real anvil, real SQLite) at random moments while
it serves streaming clients and settles in the background, and of `openlora settle --now` mid-settlement;
after restarts the books must balance: every completed request has exactly one receipt, every receipt is in
exactly one confirmed batch, on-chain collected/claimable equal the ledger, and no receipt exists for a
request whose client did not receive the whole answer."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx
from eth_account import Account

from harness import ROOT, NodeProcess, check_settled_books, ledger_rows, node_env, record
from node.payments import VOUCHER_HEADER, encode_voucher_header, sign_voucher

ROUNDS = 3
CLIENTS = 4


class Client(threading.Thread):
    """Streams requests until the node dies; notes per request what it received."""

    def __init__(self, url: str, header: str, seen: dict, lock: threading.Lock, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.header, self.seen, self.lock, self.stop = url, header, seen, lock, stop

    def run(self):
        body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "count to ten"}],
                "max_tokens": 12, "stream": True, "temperature": 0}
        with httpx.Client(timeout=30) as c:
            while not self.stop.is_set():
                if self.plain:
                    self.one_plain(c, {**body, "stream": False})
                    continue
                rid, delivered, receipt = None, False, None
                try:
                    with c.stream("POST", self.url + "/v1/chat/completions", json=body,
                                  headers={VOUCHER_HEADER: self.header}) as r:
                        if r.status_code != 200:
                            time.sleep(0.05)
                            continue
                        rid = r.headers["x-openlora-receipt"]
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            ev = json.loads(line[6:])
                            if any(ch.get("finish_reason") for ch in ev.get("choices", [])):
                                delivered = True
                            receipt = ev.get("receipt_id") or receipt
                except httpx.TransportError:
                    pass
                if rid:
                    with self.lock:
                        self.seen[rid] = {"delivered": delivered, "receipt": receipt}
                if rid and not receipt:  # the node died under this request
                    return

    plain = False

    def one_plain(self, c: httpx.Client, body: dict) -> None:
        """A non-streaming request: its answer (with the receipt id) is sent before it is booked, so a kill
        in between leaves an answered request without a receipt (the node's loss), never the reverse."""
        try:
            r = c.post(self.url + "/v1/chat/completions", json=body, headers={VOUCHER_HEADER: self.header})
        except httpx.TransportError:
            time.sleep(0.05)
            return
        if r.status_code != 200:
            time.sleep(0.05)
            return
        rid = r.headers["x-openlora-receipt"]
        assert r.json()["receipt_id"] == rid and r.json()["choices"][0]["finish_reason"]
        with self.lock:
            self.seen[rid] = {"delivered": True, "receipt": None, "answered": rid}


class PlainClient(Client):
    plain = True


def _settle_cli(env, timeout):
    return subprocess.Popen([sys.executable, "-m", "node.cli", "settle", "--now", "--timeout", str(timeout)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_kill9_while_serving_and_settling_keeps_the_books_exact(chain, tiny_llama_dir, tmp_path):
    rng = random.Random(int(os.environ.get("RELIABILITY_SEED", time.time())))
    root = tmp_path / "node"
    payer_key = chain.payer(deposit=10**12)
    payer = Account.from_key(payer_key).address.lower()
    from attribution.eip712 import Domain

    dom = Domain(chain.chain_id, chain.settlement.address)
    header = encode_voucher_header(sign_voucher(dom, payer_key, chain.node_id, 10**12))
    # the node settles in the background every second while it serves: kills land in both
    env = node_env(chain, root, tiny_llama_dir, settle_interval_s=1, settle_batch_size=3)
    seen: dict[str, dict] = {}
    lock = threading.Lock()
    kills = []
    for rnd in range(ROUNDS):
        node = NodeProcess(env, tmp_path / f"node-{rnd}.log").wait_ready()
        stop = threading.Event()
        # half stream, half ask for plain (non-streaming) answers
        clients = [(PlainClient if i % 2 else Client)(node.url, header, seen, lock, stop) for i in range(CLIENTS)]
        for c in clients:
            c.start()
        delay = rng.uniform(1.0, 4.0)
        time.sleep(delay)
        node.kill9()
        kills.append(round(delay, 2))
        stop.set()
        for c in clients:
            c.join(60)
            assert not c.is_alive()

    # kill `openlora settle --now` in the middle of its work, then let a last run finish it
    cut = _settle_cli(env, 60)
    time.sleep(rng.uniform(2.0, 5.0))
    if cut.poll() is None:
        os.killpg(cut.pid, signal.SIGKILL)
    cut.wait(30)
    done = subprocess.run([sys.executable, "-m", "node.cli", "settle", "--now", "--timeout", "120"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr

    rows = ledger_rows(root / "ledger.db")
    ledger_ids = {r[0] for r in rows["receipts"]}
    completed = {rid for rid, v in seen.items() if v["receipt"]}
    assert completed, "no request completed before the kills"
    # every completed request: exactly one receipt, under the id it was given
    assert all(v["receipt"] == rid for rid, v in seen.items() if v["receipt"])
    assert completed <= ledger_ids
    # no receipt for a request whose client did not receive every token (its finish_reason)
    undelivered = {rid for rid, v in seen.items() if not v["delivered"]}
    assert not (ledger_ids & undelivered), ledger_ids & undelivered
    # a receipt only for an answer a client received: a plain answer is booked after it was sent, so a
    # kill between answer and booking may lose the node that receipt, never charge an unanswered request
    assert ledger_ids <= set(seen), "a receipt for a request no client received"
    answered = {rid for rid, v in seen.items() if v.get("answered")}
    totals = check_settled_books(chain, rows, [payer])
    bal = chain.settlement.functions.escrowOf(chain.w3.to_checksum_address(payer), chain.node_id).call()
    assert bal[0] == 10**12 - totals["billed"]
    assert answered, "no plain answer before the kills"
    interrupted = len([v for v in seen.values() if not v["receipt"] and not v.get("answered")])
    unbooked = len(answered - ledger_ids)
    record("crash", "kill -9 of the node while serving and settling",
           f"{ROUNDS} SIGKILLs at random times ({', '.join(map(str, kills))} s) under {CLIENTS // 2} streaming and "
           f"{CLIENTS - CLIENTS // 2} non-streaming clients, background settlement every 1 s",
           f"{len(completed)} streams and {len(answered)} plain answers completed, {interrupted} streams cut off; "
           f"{totals['receipts']} receipts in {totals['batches']} batches, each in exactly one confirmed batch; "
           f"on-chain collected = ledger billed ({totals['billed']}); claimable = ledger credits; no receipt for "
           f"an undelivered answer ({unbooked} plain answers delivered but killed before booking: not charged)")
    record("crash", "kill -9 of `openlora settle --now`",
           "SIGKILL 2-5 s into a settlement run, then a second run",
           "second run confirmed every batch; no batch sent twice (contract refuses duplicates; chain totals equal the ledger)")
