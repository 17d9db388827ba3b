"""Prometheus metrics of one node, in a registry of its own (two apps in one process never collide).

Counters and histograms are updated by the serving layer as requests run. Values owned elsewhere are
read at scrape time: queue depth and the adapter cache's statistics come from callables the app
registers; pending receipts and settlement lag are gauges the payments side sets
(`app.state.metrics.pending_receipts.set(...)`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# first tokens on CPU take tens of ms; a cold adapter pulled from the registry can take seconds
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class _ReadAtScrape:
    """A collector whose values come from callables at scrape time (engine state is the truth)."""

    def __init__(self) -> None:
        self.queue_depth: Callable[[], Mapping[str, float]] | None = None
        self.cache_stats: Callable[[], Mapping[str, float]] | None = None

    def collect(self):
        if self.queue_depth is not None:
            g = GaugeMetricFamily("openlora_queue_depth", "requests in the engine by state", labels=["state"])
            for state, value in self.queue_depth().items():
                g.add_metric([state], float(value))
            yield g
        if self.cache_stats is not None:
            stats = dict(self.cache_stats())
            # AdapterCache.stats(): per tier move (disk_to_host, host_to_device) hits/misses/bytes/ms
            tiers = {k: v for k, v in stats.items() if isinstance(v, Mapping)}
            for key, doc in (("hits", "adapter cache hits"), ("misses", "adapter cache misses"),
                             ("evictions", "adapter cache evictions"), ("bytes", "bytes moved into the tier")):
                c = CounterMetricFamily(f"openlora_adapter_cache_{key}", doc, labels=["tier"])
                for tier, counters in tiers.items():
                    if key in counters:
                        c.add_metric([tier], float(counters[key]))
                yield c
            c = CounterMetricFamily("openlora_adapter_load_ms", "milliseconds spent moving adapters into a tier",
                                    labels=["tier"])
            for tier, counters in tiers.items():
                if "ms" in counters:
                    c.add_metric([tier], float(counters["ms"]))
            yield c
            for key, value in stats.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    g = GaugeMetricFamily(f"openlora_adapter_cache_{key}", f"adapter cache {key.replace('_', ' ')}")
                    g.add_metric([], float(value))
                    yield g


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("openlora_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("openlora_prompt_tokens", "prompt tokens processed", registry=r)
        self.completion_tokens = Counter("openlora_completion_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("openlora_time_to_first_token_seconds", "arrival to first output token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("openlora_inter_token_latency_seconds", "time between streamed tokens",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("openlora_request_duration_seconds", "arrival to last token",
                             buckets=_TTFT_BUCKETS, registry=r)
        self.aborted = Counter("openlora_requests_aborted", "engine requests aborted (client gone, error)",
                               registry=r)
        self.pending_receipts = Gauge("openlora_pending_receipts", "signed receipts not yet settled",
                                      registry=r)
        self.settlement_lag = Gauge("openlora_settlement_lag_seconds",
                                    "age of the oldest unsettled receipt", registry=r)
        self.scrape = _ReadAtScrape()
        r.register(self.scrape)

    def render(self) -> bytes:
        return generate_latest(self.registry)
