"""The operator dashboard: `GET /dashboard` (one self-contained page) and `GET /v1/dashboard/summary`
(the JSON that page polls).

    summary ◀── engine  adapters with tier / slot / refcount / pinned (AdapterCache.list), cache stats
            ◀── metrics cumulative tokens, TTFT and inter-token latency; a rolling window of samples
                        kept here turns them into rates and interval means
            ◀── ledger  usage by adapter, rewards by payee (attribution.queries), settlement batches
                        (node.settlement.status), when the node runs with payments (extras["money"])

The page is plain HTML with inline CSS and JS and draws its charts as SVG itself: the node may run
where nothing outside it can be reached, so it fetches nothing but the summary. Every value it shows
carries a `data-testid` so tests (and scrapers) can read it from the DOM. Values from the registry
(adapter names) are untrusted and only ever set as text, never as HTML.

Like /metrics, both routes are public: every figure shown is already public through /metrics,
/v1/rewards/{address} and /v1/usage/adapters/{id}.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from attribution import models as m
from attribution import queries
from node.metrics import Metrics

router = APIRouter(tags=["dashboard"])

EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
WINDOW = 120  # samples kept: with the page polling every 3 s, about six minutes of history
MIN_SAMPLE_INTERVAL_S = 1.0  # several open pages must not shrink the window to a few seconds
MAX_ROWS = 50  # per table: the page stays readable with thousands of adapters or payees
BATCH_ROWS = 20


# -------------------------------------------------------------------------------- live metrics

@dataclass(frozen=True)
class _Totals:
    """Cumulative counters read from the node's Prometheus metrics at one instant."""

    t: float
    prompt_tokens: float
    completion_tokens: float
    finished: float  # requests that reached their last token (count of the end-to-end histogram)
    ttft_sum: float
    ttft_count: float
    itl_sum: float
    itl_count: float


def _sample_value(metric, suffix: str) -> float:
    # collect() is prometheus_client's public read path; the unlabeled series of these metrics
    # has exactly one sample per suffix (_total, _sum, _count)
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix) and not sample.labels:
                return float(sample.value)
    return 0.0


def read_totals(metrics: Metrics, now: float | None = None) -> _Totals:
    return _Totals(
        t=time.time() if now is None else now,
        prompt_tokens=_sample_value(metrics.prompt_tokens, "_total"),
        completion_tokens=_sample_value(metrics.completion_tokens, "_total"),
        finished=_sample_value(metrics.e2e, "_count"),
        ttft_sum=_sample_value(metrics.ttft, "_sum"), ttft_count=_sample_value(metrics.ttft, "_count"),
        itl_sum=_sample_value(metrics.itl, "_sum"), itl_count=_sample_value(metrics.itl, "_count"),
    )


def _mean_ms(dsum: float, dcount: float) -> float | None:
    return round(1000.0 * dsum / dcount, 3) if dcount > 0 else None


class Sampler:
    """A rolling window of metric totals, sampled when the summary is asked for (no background task:
    with nobody watching there is nothing to draw). Rates and means are per interval between samples."""

    def __init__(self, window: int = WINDOW, min_interval_s: float = MIN_SAMPLE_INTERVAL_S) -> None:
        self._samples: deque[_Totals] = deque(maxlen=window + 1)
        self._min_interval_s = min_interval_s
        self._lock = threading.Lock()

    def observe(self, totals: _Totals) -> None:
        with self._lock:
            if self._samples and totals.t - self._samples[-1].t < self._min_interval_s:
                return
            self._samples.append(totals)

    def points(self) -> list[dict]:
        with self._lock:
            samples = list(self._samples)
        out = []
        for a, b in zip(samples, samples[1:]):
            dt_s = b.t - a.t
            if dt_s <= 0:
                continue
            out.append({
                "t": round(b.t, 3),
                "tokens_per_s": round((b.completion_tokens - a.completion_tokens) / dt_s, 3),
                "requests_per_s": round((b.finished - a.finished) / dt_s, 3),
                "ttft_ms": _mean_ms(b.ttft_sum - a.ttft_sum, b.ttft_count - a.ttft_count),
                "itl_ms": _mean_ms(b.itl_sum - a.itl_sum, b.itl_count - a.itl_count),
            })
        return out


def _sampler(request: Request) -> Sampler:
    # one per app (like the metrics registry), so two apps in one process never share a window
    state = request.app.state
    sampler = getattr(state, "dashboard_sampler", None)
    if sampler is None:
        sampler = state.dashboard_sampler = Sampler()
    return sampler


def _live(metrics: Metrics, sampler: Sampler) -> dict:
    totals = read_totals(metrics)
    sampler.observe(totals)
    points = sampler.points()
    return {
        "totals": {"prompt_tokens": int(totals.prompt_tokens), "completion_tokens": int(totals.completion_tokens),
                   "requests": int(totals.finished),
                   "ttft_mean_ms": _mean_ms(totals.ttft_sum, totals.ttft_count),
                   "itl_mean_ms": _mean_ms(totals.itl_sum, totals.itl_count)},
        "current": points[-1] if points else None,
        "samples": points,
    }


# -------------------------------------------------------------------------------- engine

def _adapters(engine) -> tuple[list[dict], dict | None]:
    if engine is None:
        return [], None
    cache = engine.adapters
    rows = []
    for spec, tier, slot, refcount, pinned in cache.list():
        rows.append({"name": spec.name, "kind": "adapter" if spec.path is not None else "mix", "tier": tier,
                     "slot": slot, "refcount": refcount, "pinned": bool(pinned), "rank": spec.rank,
                     "bytes": spec.nbytes})
    stats = cache.stats()
    keep = ("slots_total", "slots_used", "slots_referenced", "host_bytes_used", "host_bytes_capacity",
            "host_entries", "loads_in_flight", "registered", "pinned")
    summary = {k: stats[k] for k in keep if k in stats}
    for move in ("disk_to_host", "host_to_device"):
        counters = stats.get(move)
        if isinstance(counters, dict):
            summary[move] = {k: counters.get(k) for k in ("hits", "misses", "evictions")}
    return rows, summary


# -------------------------------------------------------------------------------- ledger

def _ledger(money) -> dict:
    """Usage by adapter and rewards by payee over all time, and the latest settlement batches.
    Amounts are decimal strings (uint256 does not fit a JSON number)."""
    from node import settlement

    db = money.db
    now = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)  # half-open range: include this second
    with db.reader.begin() as s:
        adapters = s.execute(select(m.Adapter.id, m.Adapter.name, m.Adapter.owner).order_by(m.Adapter.id)).all()
        payees = list(s.scalars(select(m.PayeeBalance.payee)))
        contributors = set(s.scalars(select(m.Contributor.address)))
    owners = {a.owner for a in adapters}
    operator = getattr(getattr(getattr(money, "ledger", None), "config", None), "operator", None)

    usage = []
    for a in adapters:
        u = queries.usage_by_adapter(db, a.id, EPOCH, now)
        usage.append({"adapter_id": a.id, "name": a.name or f"adapter {a.id}", "requests": u.requests,
                      "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "cost": str(u.cost),
                      "_cost": u.cost})
    usage = [u for u in usage if u["requests"] > 0]
    usage.sort(key=lambda u: (-u["_cost"], -u["requests"], u["adapter_id"]))

    rewards = []
    for payee in payees:
        r = queries.rewards(db, payee)
        roles = [role for role, members in (("operator", {operator} if operator else set()), ("owner", owners),
                                            ("contributor", contributors)) if payee in members]
        rewards.append({"payee": r.payee, "roles": roles, "pending": str(r.pending), "in_batch": str(r.in_batch),
                        "settled": str(r.settled), "claimable": str(r.claimable), "total": str(r.total),
                        "_total": r.total})
    rewards.sort(key=lambda r: (-r["_total"], r["payee"]))

    batches = settlement.status(db, money.node_id, limit=BATCH_ROWS)
    for rows in (usage, rewards):
        for row in rows:
            row.pop("_cost", None)
            row.pop("_total", None)
    return {"usage_by_adapter": usage[:MAX_ROWS], "usage_adapters_total": len(usage),
            "rewards": rewards[:MAX_ROWS], "rewards_payees_total": len(rewards),
            "settlement": {"unbatched_receipts": batches["unbatched_receipts"], "batches": batches["batches"]}}


# -------------------------------------------------------------------------------- routes

def build_summary(node, sampler: Sampler) -> dict:
    """Everything the page shows, as one JSON object (blocking: the ledger reads run in a thread)."""
    adapters, cache = _adapters(node.engine)
    money = node.extras.get("money")
    started = node.extras.get("started_at")
    return {
        "generated_at": round(time.time(), 3),
        "node": {"model_id": node.model_id, "ready": node.ready, "load_error": node.load_error,
                 "dev": bool(node.settings.dev), "uptime_s": None if started is None else int(time.time() - started)},
        "adapters": adapters,
        "cache": cache,
        "live": _live(node.metrics, sampler),
        "ledger": None if money is None else _ledger(money),
    }


@router.get("/v1/dashboard/summary", summary="What the operator dashboard shows, as JSON")
async def dashboard_summary(request: Request) -> dict[str, Any]:
    return await asyncio.to_thread(build_summary, request.app.state.node, _sampler(request))


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard_page() -> HTMLResponse:
    return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})


PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>OpenLoRA node dashboard</title>
<style>
  :root { --bg:#f6f7f9; --card:#fff; --ink:#1d2330; --muted:#6b7385; --line:#e2e5eb;
          --a:#2f6fdb; --b:#d9822b; --c:#2e9e6a; --d:#a24bd1; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg); color:var(--ink); }
  header { display:flex; gap:16px; align-items:baseline; padding:14px 20px; background:var(--ink); color:#fff; }
  header h1 { font-size:17px; margin:0; }
  header .meta { color:#b8bfcc; font-size:12px; }
  main { display:grid; grid-template-columns:repeat(auto-fit, minmax(420px, 1fr)); gap:16px; padding:16px 20px; }
  section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 14px; min-width:0; }
  section h2 { font-size:14px; margin:0 0 8px; }
  .wide { grid-column:1 / -1; }
  .tiles { display:flex; flex-wrap:wrap; gap:10px; }
  .tile { flex:1 1 120px; border:1px solid var(--line); border-radius:6px; padding:8px 10px; }
  .tile .v { font-size:20px; font-weight:600; font-variant-numeric:tabular-nums; }
  .tile .k { color:var(--muted); font-size:12px; }
  table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
  th, td { text-align:left; padding:4px 6px; border-bottom:1px solid var(--line); white-space:nowrap; }
  th { color:var(--muted); font-weight:500; font-size:12px; }
  td.num, th.num { text-align:right; }
  td.addr { font-family:ui-monospace, monospace; font-size:12px; overflow:hidden; text-overflow:ellipsis; max-width:220px; }
  .empty { color:var(--muted); font-style:italic; padding:6px 0; }
  .tier { display:inline-block; padding:0 6px; border-radius:9px; font-size:12px; }
  .tier-device { background:#dff3e8; } .tier-loading { background:#fdf0d5; }
  .tier-host { background:#e3ecfb; } .tier-disk { background:#eceef2; }
  .st-confirmed { color:var(--c); } .st-failed { color:#c0392b; } .st-pending, .st-submitted { color:var(--b); }
  svg { display:block; width:100%; }
  svg text { font-size:11px; fill:var(--muted); }
  .legend span { margin-right:12px; font-size:12px; }
  .legend i { display:inline-block; width:10px; height:10px; margin-right:4px; border-radius:2px; }
  #errors { color:#c0392b; }
</style>
</head>
<body data-loaded="0">
<header>
  <h1>OpenLoRA node</h1>
  <span class="meta">model <b data-testid="model-id">–</b></span>
  <span class="meta">status <b data-testid="node-status">loading…</b></span>
  <span class="meta">uptime <b data-testid="uptime">–</b></span>
  <span class="meta">updated <b data-testid="last-update">never</b></span>
  <span class="meta" id="errors" data-testid="errors"></span>
</header>
<main>
  <section class="wide">
    <h2>Live</h2>
    <div class="tiles">
      <div class="tile"><div class="v" data-testid="live-tokens-per-s">–</div><div class="k">tokens / s</div></div>
      <div class="tile"><div class="v" data-testid="live-requests-per-s">–</div><div class="k">requests / s</div></div>
      <div class="tile"><div class="v" data-testid="live-ttft-ms">–</div><div class="k">TTFT ms (mean, all time)</div></div>
      <div class="tile"><div class="v" data-testid="live-itl-ms">–</div><div class="k">inter-token ms (mean, all time)</div></div>
      <div class="tile"><div class="v" data-testid="live-requests-total">–</div><div class="k">requests served</div></div>
      <div class="tile"><div class="v" data-testid="live-tokens-total">–</div><div class="k">tokens generated</div></div>
      <div class="tile"><div class="v" data-testid="cache-slots">–</div><div class="k">GPU slots used</div></div>
      <div class="tile"><div class="v" data-testid="unbatched-receipts">–</div><div class="k">receipts awaiting a batch</div></div>
    </div>
  </section>
  <section>
    <h2>Throughput</h2>
    <div class="legend"><span><i style="background:var(--a)"></i>tokens / s</span><span><i style="background:var(--c)"></i>requests / s</span></div>
    <div id="chart-throughput" data-testid="chart-throughput"></div>
  </section>
  <section>
    <h2>Latency</h2>
    <div class="legend"><span><i style="background:var(--b)"></i>TTFT ms</span><span><i style="background:var(--d)"></i>inter-token ms</span></div>
    <div id="chart-latency" data-testid="chart-latency"></div>
  </section>
  <section class="wide">
    <h2>Adapters and cache tier</h2>
    <div id="adapters" data-testid="adapters"></div>
  </section>
  <section>
    <h2>Usage by adapter (all time)</h2>
    <div id="chart-usage" data-testid="chart-usage"></div>
    <div id="usage" data-testid="usage"></div>
  </section>
  <section>
    <h2>Rewards by payee (base units)</h2>
    <div id="chart-rewards" data-testid="chart-rewards"></div>
    <div id="rewards" data-testid="rewards"></div>
  </section>
  <section class="wide">
    <h2>Settlement batches</h2>
    <div id="batches" data-testid="batches"></div>
  </section>
</main>
<script>
"use strict";
(function () {
  var POLL_MS = 3000;
  var SVG = "http://www.w3.org/2000/svg";
  var errors = [];

  function showError(msg) {
    errors.push(String(msg));
    var el = document.getElementById("errors");
    el.textContent = "error: " + errors[errors.length - 1];
    el.setAttribute("data-count", String(errors.length));
  }
  window.addEventListener("error", function (e) { showError(e.message || e); });
  window.addEventListener("unhandledrejection", function (e) { showError(e.reason || "unhandled rejection"); });

  function byTestId(id) { return document.querySelector('[data-testid="' + id + '"]'); }
  function setText(id, text) { var el = byTestId(id); if (el) el.textContent = text; }
  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) { if (attrs[k] !== undefined && attrs[k] !== null) e.setAttribute(k, attrs[k]); }
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVG, tag);
    for (var k in attrs || {}) e.setAttribute(k, attrs[k]);
    return e;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined) return "–";
    return Number(x).toLocaleString("en-US", { maximumFractionDigits: digits === undefined ? 2 : digits });
  }
  function empty(container, text, testid) {
    container.replaceChildren(el("div", { "class": "empty", "data-testid": testid }, text));
  }
  // amounts are uint256 decimal strings: shown exactly, scaled as floats only to size bars
  function amountNumber(s) { var n = Number(s); return isFinite(n) ? n : 0; }

  function table(headers, rows) {
    var t = el("table"), head = el("tr");
    headers.forEach(function (h) { head.appendChild(el("th", { "class": h.num ? "num" : null }, h.label)); });
    t.appendChild(head);
    rows.forEach(function (r) {
      var tr = el("tr", { "data-testid": r.testid });
      r.cells.forEach(function (c) {
        var td = el("td", { "class": c.cls, "data-testid": c.testid, "title": c.title }, c.text);
        if (c.node) td.replaceChildren(c.node);
        tr.appendChild(td);
      });
      t.appendChild(tr);
    });
    return t;
  }

  // ---- charts: plain SVG, sized to a fixed viewBox and stretched to the card's width
  function lineChart(container, samples, series, unitDigits) {
    var W = 560, H = 180, L = 44, R = 8, T = 10, B = 22;
    var s = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img" });
    if (samples.length < 1) {
      var t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle" });
      t.textContent = "no samples yet (the window fills while this page is open)";
      s.appendChild(t);
      container.replaceChildren(s);
      return;
    }
    var t0 = samples[0].t, t1 = samples[samples.length - 1].t, span = Math.max(t1 - t0, 1);
    var ymax = 0;
    series.forEach(function (sr) { samples.forEach(function (p) { if (p[sr.key] !== null) ymax = Math.max(ymax, p[sr.key]); }); });
    ymax = ymax > 0 ? ymax * 1.1 : 1;
    function x(t) { return L + (W - L - R) * (samples.length === 1 ? 1 : (t - t0) / span); }
    function y(v) { return T + (H - T - B) * (1 - v / ymax); }
    [0, 0.5, 1].forEach(function (f) {
      var v = ymax * f;
      s.appendChild(svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v), stroke: "#e2e5eb" }));
      var lab = svg("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end" });
      lab.textContent = fmt(v, unitDigits);
      s.appendChild(lab);
    });
    var lab0 = svg("text", { x: L, y: H - 6 }); lab0.textContent = "-" + Math.round(span) + " s";
    var lab1 = svg("text", { x: W - R, y: H - 6, "text-anchor": "end" }); lab1.textContent = "now";
    s.appendChild(lab0); s.appendChild(lab1);
    series.forEach(function (sr) {
      // a null (no request finished in that interval) breaks the line rather than drawing a zero
      var d = "", pen = "M";
      samples.forEach(function (p) {
        if (p[sr.key] === null || p[sr.key] === undefined) { pen = "M"; return; }
        d += pen + x(p.t).toFixed(1) + "," + y(p[sr.key]).toFixed(1) + " ";
        pen = "L";
      });
      if (d) s.appendChild(svg("path", { d: d, fill: "none", stroke: sr.color, "stroke-width": 2,
                                          "data-series": sr.key }));
      var last = samples[samples.length - 1];
      if (last[sr.key] !== null && last[sr.key] !== undefined)
        s.appendChild(svg("circle", { cx: x(last.t), cy: y(last[sr.key]), r: 3, fill: sr.color }));
    });
    container.replaceChildren(s);
  }

  function barChart(container, items, color, testPrefix) {
    // items: [{label, value (number, for the bar), text (exact value shown), key}]
    var rowH = 22, W = 560, L = 150, R = 110;
    var H = Math.max(items.length, 1) * rowH + 6;
    var s = svg("svg", { viewBox: "0 0 " + W + " " + H, role: "img" });
    var max = 0;
    items.forEach(function (it) { max = Math.max(max, it.value); });
    items.forEach(function (it, i) {
      var yy = 3 + i * rowH;
      var lab = svg("text", { x: L - 6, y: yy + 14, "text-anchor": "end" });
      lab.textContent = it.label.length > 22 ? it.label.slice(0, 10) + "…" + it.label.slice(-8) : it.label;
      s.appendChild(lab);
      var w = max > 0 ? (W - L - R) * it.value / max : 0;
      s.appendChild(svg("rect", { x: L, y: yy + 3, width: Math.max(w, 1).toFixed(1), height: rowH - 8, rx: 2,
                                  fill: color, "data-testid": testPrefix + it.key }));
      var v = svg("text", { x: L + w + 6, y: yy + 14 });
      v.textContent = it.text;
      s.appendChild(v);
    });
    container.replaceChildren(s);
  }

  // ---- sections
  function renderNode(d) {
    var n = d.node;
    setText("model-id", n.model_id || "–");
    setText("node-status", n.ready ? "ready" : (n.load_error ? "load failed: " + n.load_error : "loading model"));
    setText("uptime", n.uptime_s === null ? "–" : fmt(n.uptime_s / 60, 1) + " min");
    setText("last-update", new Date(d.generated_at * 1000).toISOString().slice(11, 19) + " UTC");
  }

  function renderLive(d) {
    var live = d.live, cur = live.current, tot = live.totals;
    setText("live-tokens-per-s", cur ? fmt(cur.tokens_per_s, 1) : "–");
    setText("live-requests-per-s", cur ? fmt(cur.requests_per_s, 2) : "–");
    setText("live-ttft-ms", fmt(tot.ttft_mean_ms, 1));
    setText("live-itl-ms", fmt(tot.itl_mean_ms, 1));
    setText("live-requests-total", fmt(tot.requests, 0));
    setText("live-tokens-total", fmt(tot.completion_tokens, 0));
    setText("cache-slots", d.cache ? d.cache.slots_used + " / " + d.cache.slots_total : "–");
    setText("unbatched-receipts", d.ledger ? fmt(d.ledger.settlement.unbatched_receipts, 0) : "–");
    lineChart(document.getElementById("chart-throughput"), live.samples,
              [{ key: "tokens_per_s", color: "#2f6fdb" }, { key: "requests_per_s", color: "#2e9e6a" }], 1);
    lineChart(document.getElementById("chart-latency"), live.samples,
              [{ key: "ttft_ms", color: "#d9822b" }, { key: "itl_ms", color: "#a24bd1" }], 1);
  }

  function renderAdapters(d) {
    var box = document.getElementById("adapters");
    if (!d.cache) return empty(box, d.node.load_error ? "engine not loaded" : "engine loading…", "adapters-empty");
    if (!d.adapters.length) return empty(box, "no adapters registered", "adapters-empty");
    box.replaceChildren(table(
      [{ label: "adapter" }, { label: "tier" }, { label: "slot", num: 1 }, { label: "refs", num: 1 },
       { label: "pinned" }, { label: "rank", num: 1 }, { label: "host MiB", num: 1 }],
      d.adapters.map(function (a) {
        var k = a.kind === "mix" ? "mix-" + a.name : a.name;
        return { testid: "adapter-" + k, cells: [
          { text: a.kind === "mix" ? a.name + " (mix)" : a.name, testid: "adapter-name-" + k },
          { node: el("span", { "class": "tier tier-" + a.tier, "data-testid": "adapter-tier-" + k }, a.tier) },
          { text: a.slot === null ? "–" : a.slot, cls: "num", testid: "adapter-slot-" + k },
          { text: a.refcount, cls: "num", testid: "adapter-refcount-" + k },
          { text: a.pinned ? "yes" : "no", testid: "adapter-pinned-" + k },
          { text: a.rank, cls: "num" },
          { text: fmt(a.bytes / 1048576, 2), cls: "num" }] };
      })));
  }

  function renderUsage(d) {
    var box = document.getElementById("usage"), chart = document.getElementById("chart-usage");
    if (!d.ledger) { chart.replaceChildren(); return empty(box, "ledger not configured (dev mode: requests are free and not recorded)", "usage-empty"); }
    var rows = d.ledger.usage_by_adapter;
    if (!rows.length) { chart.replaceChildren(); return empty(box, "no requests yet", "usage-empty"); }
    barChart(chart, rows.map(function (u) {
      return { label: u.name, value: amountNumber(u.cost), text: u.cost, key: u.adapter_id };
    }), "#2f6fdb", "usage-bar-");
    box.replaceChildren(table(
      [{ label: "adapter" }, { label: "requests", num: 1 }, { label: "prompt tok", num: 1 },
       { label: "output tok", num: 1 }, { label: "cost", num: 1 }],
      rows.map(function (u) {
        var k = u.adapter_id;
        return { testid: "usage-" + k, cells: [
          { text: u.name + " (#" + k + ")", testid: "usage-name-" + k },
          { text: u.requests, cls: "num", testid: "usage-requests-" + k },
          { text: u.prompt_tokens, cls: "num", testid: "usage-prompt-tokens-" + k },
          { text: u.completion_tokens, cls: "num", testid: "usage-completion-tokens-" + k },
          { text: u.cost, cls: "num", testid: "usage-cost-" + k }] };
      })));
  }

  function renderRewards(d) {
    var box = document.getElementById("rewards"), chart = document.getElementById("chart-rewards");
    if (!d.ledger) { chart.replaceChildren(); return empty(box, "ledger not configured", "rewards-empty"); }
    var rows = d.ledger.rewards;
    if (!rows.length) { chart.replaceChildren(); return empty(box, "no rewards yet", "rewards-empty"); }
    barChart(chart, rows.map(function (r) {
      return { label: r.payee, value: amountNumber(r.total), text: r.total, key: r.payee };
    }), "#2e9e6a", "reward-bar-");
    box.replaceChildren(table(
      [{ label: "payee" }, { label: "role" }, { label: "pending", num: 1 }, { label: "in batch", num: 1 },
       { label: "settled", num: 1 }, { label: "total", num: 1 }],
      rows.map(function (r) {
        var k = r.payee;
        return { testid: "reward-row-" + k, cells: [
          { text: k, cls: "addr", title: k },
          { text: r.roles.join(", ") || "–", testid: "reward-roles-" + k },
          { text: r.pending, cls: "num", testid: "reward-pending-" + k },
          { text: r.in_batch, cls: "num", testid: "reward-in-batch-" + k },
          { text: r.settled, cls: "num", testid: "reward-settled-" + k },
          { text: r.total, cls: "num", testid: "reward-" + k }] };
      })));
  }

  function renderBatches(d) {
    var box = document.getElementById("batches");
    if (!d.ledger) return empty(box, "ledger not configured", "batches-empty");
    var rows = d.ledger.settlement.batches;
    if (!rows.length) return empty(box, "no settlement batches yet", "batches-empty");
    box.replaceChildren(table(
      [{ label: "batch" }, { label: "status" }, { label: "receipts", num: 1 }, { label: "total", num: 1 },
       { label: "tx" }, { label: "block", num: 1 }, { label: "attempts", num: 1 }, { label: "created (UTC)" }],
      rows.map(function (b) {
        var k = b.batch_id;
        return { testid: "batch-" + k, cells: [
          { text: k, cls: "addr", title: k },
          { text: b.status, cls: "st-" + b.status, testid: "batch-status-" + k, title: b.last_error || "" },
          { text: b.receipt_count, cls: "num", testid: "batch-receipts-" + k },
          { text: b.total, cls: "num", testid: "batch-total-" + k },
          { text: b.tx_hash || "–", cls: "addr", title: b.tx_hash || "" },
          { text: b.block_number === null ? "–" : b.block_number, cls: "num", testid: "batch-block-" + k },
          { text: b.attempts, cls: "num" },
          { text: (b.created_at || "").replace("T", " ").slice(0, 19) }] };
      })));
  }

  function render(d) {
    // one failing section must not blank the others
    [renderNode, renderLive, renderAdapters, renderUsage, renderRewards, renderBatches].forEach(function (f) {
      try { f(d); } catch (e) { showError(f.name + ": " + (e && e.message ? e.message : e)); }
    });
    document.body.setAttribute("data-loaded", "1");
  }

  function poll() {
    fetch("/v1/dashboard/summary", { cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error("summary: HTTP " + r.status); return r.json(); })
      .then(render)
      .catch(function (e) { setText("last-update", "failed: " + (e && e.message ? e.message : e)); })
      .finally(function () { setTimeout(poll, POLL_MS); });
  }
  poll();
})();
</script>
</body>
</html>
"""

__all__ = ["router", "build_summary", "Sampler", "read_totals", "PAGE"]
