"""Ledger query benchmark: builds a ledger of 1,000,000 requests and times each reward and usage query.

    .venv/bin/python benchmarks/ledger_queries.py [--requests N] [--reuse] [--db PATH]

The schema comes from the real migrations; rows are bulk-inserted with executemany in one transaction
(requests, per-adapter usage, hourly rollups, payee balances, 120 settlement batches with payouts; receipts,
credits and influence rows are not generated because no timed query reads them). Each query runs 3
times to warm the cache, then 25 times; the table shows the median and p95. JSON goes to
benchmarks/out/ledger_queries.json. Target: every query under 50 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import sqlite3
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution.db import open_database  # noqa: E402
from attribution.queries import rewards, usage_by_adapter, usage_by_datanet, usage_by_payer  # noqa: E402
from migrations import upgrade  # noqa: E402

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAYS = 30
ADAPTERS, DATANETS, PAYERS, CONTRIBUTORS, BATCHES = 200, 20, 5_000, 2_000, 120
OPERATOR = "0x" + "0e" * 20
FMT = "%Y-%m-%d %H:%M:%S.%f"  # SQLAlchemy's SQLite DATETIME storage format


def addr(kind: int, i: int) -> str:
    return "0x" + f"{kind:02x}" + f"{i:038x}"


def build(path: Path, n: int) -> None:
    path.unlink(missing_ok=True)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    upgrade(f"sqlite:///{path}")
    rng = random.Random(42)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    now = T0.strftime(FMT)
    conn.executemany("INSERT INTO datanets (id, owner, name, metadata_uri, synced_block) VALUES (?, ?, '', '', 0)",
                     [(d, addr(0xD0, d)) for d in range(1, DATANETS + 1)])
    datanet_of = {a: (a % DATANETS + 1 if a % 5 else None) for a in range(1, ADAPTERS + 1)}
    conn.executemany(
        "INSERT INTO adapters (id, owner, datanet_id, name, content_hash, price_per_m_input, price_per_m_output,"
        " owner_bps, contributors_bps, operator_bps, active, synced_block) VALUES (?, ?, ?, '', '', ?, ?, 5000, 3000, 2000, 1, 0)",
        [(a, addr(0xA0, a % 50), datanet_of[a], str(10**15 * (1 + a % 7)), str(3 * 10**15 * (1 + a % 5))) for a in datanet_of])
    conn.executemany("INSERT INTO payers (id, address, created_at) VALUES (?, ?, ?)",
                     [(p, addr(0xB0, p), now) for p in range(1, PAYERS + 1)])
    # Zipf-like popularity: a few adapters and payers get most traffic, as in a real long tail
    adapter_w = [1 / (a ** 1.1) for a in range(1, ADAPTERS + 1)]
    payer_w = [1 / (p ** 0.8) for p in range(1, PAYERS + 1)]
    adapters = rng.choices(range(1, ADAPTERS + 1), adapter_w, k=n)
    payers = rng.choices(range(1, PAYERS + 1), payer_w, k=n)
    span = DAYS * 86400
    credited: dict[str, int] = {}
    rollups: dict[tuple[str, int, str], list[int]] = {}
    requests, usage = [], []

    def roll(scope: str, sid: int, hour: str, pt: int, ct: int, cost: int) -> None:
        acc = rollups.setdefault((scope, sid, hour), [0, 0, 0, 0])
        acc[0] += 1
        acc[1] += pt
        acc[2] += ct
        acc[3] += cost

    t_start = time.perf_counter()
    for i in range(n):
        when = T0 + dt.timedelta(seconds=span * i / n)
        t = when.strftime(FMT)
        hour = when.replace(minute=0, second=0, microsecond=0).strftime(FMT)
        a, p = adapters[i], payers[i]
        pin, pout = rng.randint(20, 2000), rng.randint(1, 500)
        fused = i % 10 == 0
        mix = [(a, 5000), ((a % ADAPTERS) + 1, 5000)] if fused else [(a, 10_000)]
        cost = 0
        parts = []
        for ad, w in mix:
            value = w * (pin * 10**15 * (1 + ad % 7) + pout * 3 * 10**15 * (1 + ad % 5)) // (10_000 * 10**6)
            parts.append((ad, w, value))
            cost += value
        requests.append((f"req-{i}", p, 1, json.dumps([[ad, w] for ad, w, _ in parts]), pin, pout, t, t, t,
                         str(10**15), str(3 * 10**15), str(cost), "completed", "0x" + "00" * 32))
        roll("payer", p, hour, pin, pout, cost)
        for ad, w, value in parts:
            usage.append((f"req-{i}", ad, datanet_of[ad], w, str(value), pin, pout, t))
            roll("adapter", ad, hour, pin, pout, value)
            if datanet_of[ad]:
                roll("datanet", datanet_of[ad], hour, pin, pout, value)
            owner = addr(0xA0, ad % 50)
            credited[owner] = credited.get(owner, 0) + value // 2
            credited[OPERATOR] = credited.get(OPERATOR, 0) + value - value // 2 - value * 3 // 10
            if datanet_of[ad]:
                for c in (rng.randrange(CONTRIBUTORS), rng.randrange(CONTRIBUTORS)):
                    credited[addr(0xC0, c)] = credited.get(addr(0xC0, c), 0) + value * 3 // 20
        if len(requests) >= 100_000:
            _flush(conn, requests, usage)
            print(f"  {i + 1:>9,} requests  {time.perf_counter() - t_start:6.1f}s", flush=True)
    _flush(conn, requests, usage)
    # 120 batches (every 6 hours), the last 10 not yet confirmed; every payee appears in each batch
    batched = {k: v * 9 // 10 for k, v in credited.items()}
    payees = sorted(batched)
    for b in range(BATCHES):
        bid = "0x" + f"{b + 1:064x}"
        status = "confirmed" if b < BATCHES - 10 else ("submitted" if b % 2 else "pending")
        conn.execute("INSERT INTO settlement_batches (id, node_id, merkle_root, receipt_count, total_amount, status, attempts,"
                     " created_at, updated_at) VALUES (?, 1, ?, 0, '0', ?, 1, ?, ?)", (bid, bid, status, now, now))
        conn.executemany("INSERT INTO batch_payouts (batch_id, payee, amount) VALUES (?, ?, ?)",
                         [(bid, pe, str(batched[pe] // BATCHES + (batched[pe] % BATCHES if b == 0 else 0))) for pe in payees])
    conn.executemany("INSERT INTO payee_balances (payee, credited, batched) VALUES (?, ?, ?)",
                     [(k, str(v), str(batched[k])) for k, v in credited.items()])
    conn.executemany("INSERT INTO usage_rollups (scope, scope_id, hour, requests, prompt_tokens, completion_tokens, cost)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)", [(*k, a, b, c, str(d)) for k, (a, b, c, d) in rollups.items()])
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    print(f"built {n:,} requests in {time.perf_counter() - t_start:.1f}s -> {path} ({path.stat().st_size / 2**20:.0f} MiB)")


def _flush(conn, requests, usage) -> None:
    conn.executemany(
        "INSERT INTO requests (id, payer_id, node_id, adapter_mix, prompt_tokens, completion_tokens, received_at,"
        " first_token_at, finished_at, price_per_m_input, price_per_m_output, cost, status, content_hash)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", requests)
    conn.executemany(
        "INSERT INTO adapter_usage (request_id, adapter_id, datanet_id, weight_bps, cost_share, prompt_tokens,"
        " completion_tokens, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", usage)
    requests.clear()
    usage.clear()


def time_query(fn, runs: int = 25) -> dict:
    for _ in range(3):
        result = fn()
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        result = fn()
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    return {"median_ms": statistics.median(samples), "p95_ms": samples[int(0.95 * (len(samples) - 1))],
            "result": result}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--db", type=Path, default=ROOT / "benchmarks" / "out" / "ledger_bench.db")
    ap.add_argument("--reuse", action="store_true", help="reuse an existing benchmark database")
    args = ap.parse_args()
    args.db.parent.mkdir(parents=True, exist_ok=True)
    if not (args.reuse and args.db.exists()):
        build(args.db, args.requests)
    db = open_database(f"sqlite:///{args.db}")
    # ranges that do not start or end on the hour, so both the rollups and the raw edges are read
    day = (T0 + dt.timedelta(days=10, minutes=17), T0 + dt.timedelta(days=11, minutes=43))
    month = (T0 + dt.timedelta(minutes=29), T0 + dt.timedelta(days=DAYS, minutes=-13))
    queries = {
        "rewards(contributor)": lambda: rewards(db, addr(0xC0, 17)),
        "rewards(top adapter owner)": lambda: rewards(db, addr(0xA0, 1)),
        "rewards(operator)": lambda: rewards(db, OPERATOR),
        "usage_by_adapter(top, 1 day)": lambda: usage_by_adapter(db, 1, *day),
        "usage_by_adapter(top, 30 days)": lambda: usage_by_adapter(db, 1, *month),
        "usage_by_adapter(tail, 30 days)": lambda: usage_by_adapter(db, 150, *month),
        "usage_by_datanet(top, 1 day)": lambda: usage_by_datanet(db, 2, *day),
        "usage_by_datanet(top, 30 days)": lambda: usage_by_datanet(db, 2, *month),
        "usage_by_payer(top, 30 days)": lambda: usage_by_payer(db, addr(0xB0, 1), *month),
        "usage_by_payer(tail, 30 days)": lambda: usage_by_payer(db, addr(0xB0, 4000), *month),
    }
    out = {}
    print(f"\n{'query':34} {'median ms':>10} {'p95 ms':>8} {'rows/requests':>14}")
    for name, fn in queries.items():
        r = time_query(fn)
        res = r.pop("result")
        rows = getattr(res, "requests", None)
        out[name] = {**r, "rows": rows}
        print(f"{name:34} {r['median_ms']:10.2f} {r['p95_ms']:8.2f} {rows if rows is not None else '-':>14}")
    db.dispose()
    worst = max(v["p95_ms"] for v in out.values())
    doc = {"requests": args.requests, "sqlite": sqlite3.sqlite_version, "python": platform.python_version(),
           "machine": platform.machine(), "queries": out, "worst_p95_ms": worst, "target_ms": 50}
    (ROOT / "benchmarks" / "out").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "out" / "ledger_queries.json").write_text(json.dumps(doc, indent=2))
    print(f"\nworst p95 {worst:.2f} ms (target 50 ms); wrote benchmarks/out/ledger_queries.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
