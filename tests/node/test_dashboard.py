"""The operator dashboard, end to end: a real SQLite ledger (Alembic migrations) with recorded
requests, contributor shares and a confirmed settlement batch; the node's app under uvicorn on
loopback with the tiny model and a PEFT adapter; the page rendered by headless Chromium, and what its
DOM shows compared with the ledger's own queries.

The node runs in dev mode (no chain) with the real ledger handed to it as the payment services do
(`extras["money"]`): the dashboard reads only the ledger side of those services, and a chain is not
needed to record, batch or confirm in the ledger. Requests sent through the API are free in dev mode,
so the ledger's rows are written with `Ledger.record`, with costs known in advance.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from attribution import queries
from attribution.batches import build_batch, mark_confirmed, mark_submitted
from attribution.db import open_database
from attribution.ledger import AdapterInfo, AdapterUse, FinishedRequest, Ledger, LedgerConfig
from attribution.payers import store_voucher
from attribution.receipts import VoucherData, sign_digest
from attribution.shares import ContributorShare
from node.accounting import Money
from node.api.dashboard import Sampler, read_totals
from node.app import create_app
from node.config import Settings
from node.errors import ConfigError
from node.metrics import Metrics
from node.serving import DevAccountant

NODE_ID = 3
NODE_KEY = "0x" + "5d" * 32
OPERATOR = "0x" + "0e" * 20
OWNER_ALPHA = "0x" + "a1" * 20
OWNER_BETA = "0x" + "a2" * 20
DATANET_OWNER = "0x" + "d0" * 20
CONTRIB_X = "0x" + "c1" * 20
CONTRIB_Y = "0x" + "c2" * 20
PAYER = Account.from_key("0x" + "77" * 32)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
# prices per 1M tokens chosen so every split below is exact (no rounding to reason about)
ALPHA_PRICES = (100 * 10**6, 200 * 10**6)  # 100 and 200 base units per input / output token
BETA_PRICES = (10 * 10**6, 30 * 10**6)
TX = "0x" + "ab" * 32


# ------------------------------------------------------------------------------------ helpers

def chromium_dom(url: str) -> str:
    """The DOM after the page's scripts ran, as headless Chromium prints it."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.fail("chromium is not installed: run scripts/ensure-chromium.sh (the dashboard test drives a real browser)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        proc = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
             "--dump-dom", url],
            capture_output=True, text=True, timeout=45)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    assert "<body" in proc.stdout, f"chromium printed no DOM: {proc.stderr[-2000:]}"
    return proc.stdout


class TestIds(HTMLParser):
    """Text and attributes of every element carrying a data-testid, from a dumped DOM."""

    __test__ = False  # not a pytest class

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.text: dict[str, str] = {}
        self.attrs: dict[str, dict[str, str | None]] = {}
        self.body: dict[str, str | None] = {}
        self._open: list[tuple[str, str | None]] = []  # (tag, testid) of the open elements
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        tid = a.get("data-testid")
        if tid is not None:
            self.attrs[tid] = a
            self.text.setdefault(tid, "")
        if tag not in ("br", "img", "input", "meta", "link", "hr", "circle", "path", "line", "rect"):
            self._open.append((tag, tid))

    def handle_startendtag(self, tag, attrs):
        tid = dict(attrs).get("data-testid")
        if tid is not None:
            self.attrs[tid] = dict(attrs)
            self.text.setdefault(tid, "")

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                return

    def handle_data(self, data):
        for _, tid in self._open:
            if tid is not None:
                self.text[tid] += data

    def __getitem__(self, tid: str) -> str:
        assert tid in self.text, f"no element with data-testid={tid!r} in the page"
        return self.text[tid].strip()


@contextlib.contextmanager
def serve(app):
    """uvicorn in a thread on a free loopback port (bound here first, so no port race)."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def ledger_services(ledger: Ledger):
    """Services for create_app: dev accounting for API requests, and the real ledger for the
    dashboard, where the paid node's services put it."""

    @contextlib.asynccontextmanager
    async def services(settings, app):
        app.state.node.accountant = DevAccountant()
        app.state.node.extras["money"] = Money(ledger=ledger, gate=None, accountant=None, signin=None,
                                               settlement_contract=None)
        try:
            yield
        finally:
            app.state.node.extras.pop("money", None)

    return services


def no_engine(settings):
    raise ConfigError("this test runs the node without a model")


def write_peft_adapter(out: Path, model_dir: Path, *, seed: int, rank: int = 4) -> Path:
    """A PEFT LoRA adapter (q_proj, v_proj) for the tiny model, written as PEFT lays it out on disk."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model_dir / "config.json").read_text())
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    outs = {"q_proj": heads * head_dim, "v_proj": cfg["num_key_value_heads"] * head_dim}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, n_out in outs.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, h, generator=gen) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=gen) * 0.1
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(outs), "bias": "none",
        "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}))
    return out


# ------------------------------------------------------------------------------------ the ledger

def new_ledger(tmp_path: Path) -> Ledger:
    from migrations import upgrade

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    cfg = LedgerConfig(node_id=NODE_ID, operator=OPERATOR, chain_id=31337,
                       settlement_contract="0x5fbdb2315678afecb367f032d93f642f64180aa3")
    ledger = Ledger(open_database(url), cfg, NODE_KEY)
    ledger.upsert_datanet(7, DATANET_OWNER, name="recipes")
    ledger.upsert_adapter(AdapterInfo(1, OWNER_ALPHA, *ALPHA_PRICES, owner_bps=5000, contributors_bps=3000,
                                      operator_bps=2000, datanet_id=7, name="alpha"))
    ledger.upsert_adapter(AdapterInfo(2, OWNER_BETA, *BETA_PRICES, owner_bps=8000, contributors_bps=0,
                                      operator_bps=2000, name="beta"))
    return ledger


def request(i: int, adapter_id: int, prompt: int, completion: int, shares=None) -> FinishedRequest:
    start = T0 + dt.timedelta(minutes=i)
    return FinishedRequest(request_id=f"dash-{i}", payer=PAYER.address, node_id=NODE_ID,
                           adapters=(AdapterUse(adapter_id),), prompt_tokens=prompt, completion_tokens=completion,
                           received_at=start, first_token_at=start + dt.timedelta(milliseconds=30),
                           finished_at=start + dt.timedelta(seconds=1), contributor_shares=shares)


@pytest.fixture
def busy_ledger(tmp_path):
    """Three requests on alpha (contributors x 60% / y 40%), one on beta; the first three settled in a
    confirmed batch, the last one still pending. Returns (ledger, expected figures)."""
    ledger = new_ledger(tmp_path)
    shares = {1: [ContributorShare(CONTRIB_X, 0.9, 6000), ContributorShare(CONTRIB_Y, 0.6, 4000)]}
    recorded = [ledger.record(request(0, 1, 100, 50, shares)),  # 100*100 + 50*200 = 20000
                ledger.record(request(1, 1, 40, 10, shares)),  # 4000 + 2000 = 6000
                ledger.record(request(2, 2, 1000, 100))]  # 10000 + 3000 = 13000
    assert [r.cost for r in recorded] == [20000, 6000, 13000]
    voucher = VoucherData(PAYER.address, NODE_ID, sum(r.cost for r in recorded), 1)
    store_voucher(ledger.db, ledger.domain, voucher, sign_digest(voucher.digest(ledger.domain), PAYER.key))
    plan = build_batch(ledger.db, NODE_ID)
    assert plan is not None and plan.total == 39000
    mark_submitted(ledger.db, plan.batch_id, TX)
    mark_confirmed(ledger.db, plan.batch_id, 1234)
    late = ledger.record(request(3, 1, 10, 5, shares))  # 1000 + 1000 = 2000, not batched
    assert late.cost == 2000
    # what each payee must have earned, from the adapters' splits (exact with these prices):
    # alpha 26000 settled + 2000 pending: owner 50%, operator 20%, contributors 30% as 60/40
    # beta 13000 settled: owner 80%, operator 20%
    expected = {
        OWNER_ALPHA: {"settled": 13000, "pending": 1000},
        OPERATOR: {"settled": 5200 + 2600, "pending": 400},
        CONTRIB_X: {"settled": 4680, "pending": 360},
        CONTRIB_Y: {"settled": 3120, "pending": 240},
        OWNER_BETA: {"settled": 10400, "pending": 0},
    }
    try:
        yield ledger, plan, expected
    finally:
        ledger.db.dispose()


# ------------------------------------------------------------------------------------ tests

def test_sampler_turns_metric_totals_into_rates_and_interval_means():
    metrics = Metrics()
    sampler = Sampler(window=3, min_interval_s=1.0)
    sampler.observe(read_totals(metrics, now=100.0))
    metrics.completion_tokens.inc(40)
    for v in (0.1, 0.3):
        metrics.ttft.observe(v)
        metrics.e2e.observe(1.0)
    metrics.itl.observe(0.02)
    sampler.observe(read_totals(metrics, now=102.0))
    sampler.observe(read_totals(metrics, now=102.5))  # within the minimum interval: dropped
    assert sampler.points() == [{"t": 102.0, "tokens_per_s": 20.0, "requests_per_s": 1.0, "ttft_ms": 200.0,
                                 "itl_ms": 20.0}]
    # an interval without finished requests has no latency to show (None, not 0)
    sampler.observe(read_totals(metrics, now=104.0))
    assert sampler.points()[-1] == {"t": 104.0, "tokens_per_s": 0.0, "requests_per_s": 0.0, "ttft_ms": None,
                                    "itl_ms": None}
    for t in (106.0, 108.0, 110.0):
        sampler.observe(read_totals(metrics, now=t))
    assert [p["t"] for p in sampler.points()] == [106.0, 108.0, 110.0]  # a rolling window of 3 intervals


def test_dashboard_shows_the_ledgers_usage_rewards_and_batches(busy_ledger, tmp_path, tiny_llama_dir):
    ledger, plan, expected = busy_ledger
    adapter_dir = tmp_path / "adapters"
    write_peft_adapter(adapter_dir / "alpha", tiny_llama_dir, seed=1)
    write_peft_adapter(adapter_dir / "beta", tiny_llama_dir, seed=2)
    settings = Settings(model=str(tiny_llama_dir), adapter_dir=adapter_dir, data_dir=tmp_path / "data", dev=True,
                        device="cpu", engine_max_num_seqs=4, engine_num_lora_slots=2, engine_max_lora_rank=8,
                        log_json=False)
    app = create_app(settings, services_factory=ledger_services(ledger))
    with serve(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        deadline = time.monotonic() + 40
        while client.get("/readyz").status_code != 200:
            assert app.state.node.load_error is None, app.state.node.load_error
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        r = client.post("/v1/completions", json={"model": "alpha", "prompt": "Hello", "max_tokens": 4,
                                                 "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text

        # -- the JSON the page polls, against the ledger's own queries
        summary = client.get("/v1/dashboard/summary").json()
        end = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        usage = {u["adapter_id"]: u for u in summary["ledger"]["usage_by_adapter"]}
        assert set(usage) == {1, 2}
        for aid in (1, 2):
            q = queries.usage_by_adapter(ledger.db, aid, EPOCH, end)
            assert (usage[aid]["requests"], usage[aid]["prompt_tokens"], usage[aid]["completion_tokens"],
                    usage[aid]["cost"]) == (q.requests, q.prompt_tokens, q.completion_tokens, str(q.cost))
        assert (usage[1]["requests"], usage[1]["cost"], usage[2]["cost"]) == (3, "28000", "13000")
        rewards = {r["payee"]: r for r in summary["ledger"]["rewards"]}
        assert set(rewards) == set(expected)
        for payee, want in expected.items():
            q = queries.rewards(ledger.db, payee)
            got = rewards[payee]
            assert (got["settled"], got["pending"], got["in_batch"]) == (str(q.settled), str(q.pending), "0")
            assert (int(got["settled"]), int(got["pending"])) == (want["settled"], want["pending"])
        assert rewards[CONTRIB_X]["roles"] == ["contributor"] and rewards[OPERATOR]["roles"] == ["operator"]
        # every base unit paid by the payer is credited to someone, shown or not
        assert sum(int(r["total"]) for r in rewards.values()) == 20000 + 6000 + 13000 + 2000
        [batch] = summary["ledger"]["settlement"]["batches"]
        assert (batch["batch_id"], batch["status"], batch["receipt_count"], batch["total"], batch["block_number"]) == \
            (plan.batch_id, "confirmed", 3, "39000", 1234)
        assert summary["ledger"]["settlement"]["unbatched_receipts"] == 1
        tiers = {a["name"]: a for a in summary["adapters"] if a["kind"] == "adapter"}
        assert tiers["alpha"]["tier"] == "device" and tiers["alpha"]["slot"] is not None
        assert tiers["beta"]["tier"] == "disk" and tiers["beta"]["slot"] is None
        assert summary["live"]["totals"]["completion_tokens"] == 4 and summary["live"]["totals"]["requests"] == 1
        assert summary["live"]["totals"]["ttft_mean_ms"] > 0

        # -- the page, as a browser renders it
        page = client.get("/dashboard")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        # self-contained: the only URL in it is the SVG namespace name, which is never fetched
        offline = page.text.replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in offline and "https://" not in offline and "//cdn" not in offline
        dom = TestIds(chromium_dom(f"{base}/dashboard"))

    assert dom.body.get("data-loaded") == "1", "the page's script did not render the summary"
    assert dom["errors"] == "", f"JS errors on the page: {dom['errors']}"
    for payee, want in expected.items():
        q = queries.rewards(ledger.db, payee)
        assert dom[f"reward-{payee}"] == str(q.total) == str(want["settled"] + want["pending"])
        assert dom[f"reward-settled-{payee}"] == str(q.settled)
        assert dom[f"reward-pending-{payee}"] == str(q.pending)
        assert f"reward-bar-{payee}" in dom.attrs  # one bar per payee in the chart
    for aid in (1, 2):
        q = queries.usage_by_adapter(ledger.db, aid, EPOCH, dt.datetime.now(dt.UTC))
        assert dom[f"usage-requests-{aid}"] == str(q.requests)
        assert dom[f"usage-cost-{aid}"] == str(q.cost)
        assert dom[f"usage-prompt-tokens-{aid}"] == str(q.prompt_tokens)
        assert f"usage-bar-{aid}" in dom.attrs
    assert dom[f"batch-status-{plan.batch_id}"] == "confirmed"
    assert dom[f"batch-total-{plan.batch_id}"] == "39000"
    assert dom["adapter-tier-alpha"] == "device" and dom["adapter-tier-beta"] == "disk"
    assert dom["live-requests-total"] == "1" and dom["live-tokens-total"] == "4"
    assert dom["unbatched-receipts"] == "1"
    # bars are drawn to scale: the largest payee's bar is the longest
    widths = {p: float(dom.attrs[f"reward-bar-{p}"]["width"]) for p in expected}
    assert max(widths, key=widths.get) == OWNER_ALPHA


def test_dashboard_renders_an_empty_node_without_errors(tmp_path):
    ledger = new_ledger(tmp_path)
    settings = Settings(model="none", data_dir=tmp_path / "data", dev=True, log_json=False)
    app = create_app(settings, engine_factory=no_engine, services_factory=ledger_services(ledger))
    try:
        with serve(app) as base:
            summary = httpx.get(f"{base}/v1/dashboard/summary", timeout=30).json()
            assert summary["adapters"] == [] and summary["cache"] is None
            assert summary["ledger"]["usage_by_adapter"] == [] and summary["ledger"]["rewards"] == []
            assert summary["ledger"]["settlement"] == {"unbatched_receipts": 0, "batches": []}
            assert summary["live"]["totals"]["requests"] == 0 and summary["live"]["totals"]["ttft_mean_ms"] is None
            dom = TestIds(chromium_dom(f"{base}/dashboard"))
    finally:
        ledger.db.dispose()
    assert dom.body.get("data-loaded") == "1"
    assert dom["errors"] == ""
    assert dom["usage-empty"] == "no requests yet"
    assert dom["rewards-empty"] == "no rewards yet"
    assert dom["batches-empty"] == "no settlement batches yet"
    assert dom["adapters-empty"] == "engine not loaded"
    assert dom["live-requests-total"] == "0" and dom["live-ttft-ms"] == "–"
    assert dom["live-tokens-total"] == "0" and dom["cache-slots"] == "–"
