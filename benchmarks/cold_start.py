"""Cold-start benchmark: first-token latency (TTFT) of an adapter by where it is when the request arrives.

    .venv/bin/python benchmarks/cold_start.py [--reps 10] [--model DIR] [--max-tokens 8]

A real paid node, as the HTTP tests build it: anvil (node.chain.anvil) with the contracts deployed
(node.chain.deploy), a registered node, a payer with escrow, the node (`create_app`, paid mode, real
SQLite ledger) under uvicorn on 127.0.0.1 in this process, and the official openai client paying with
node.client.VoucherAuth. Adapters are random rank-8 PEFT adapters on all seven projections, written by
engine/adapters/peft_io.save_peft_adapter (never zeros), packed with node.registry.pack_adapter, served by
a loopback HTTP server and registered on chain (AdapterRegistry) with their sha256 and http:// URI.

Four cases, interleaved per repetition (base, warm, cold, disk) so machine load drifts hit all alike:
  base   the base model, no adapter;
  warm   one adapter already resident in a device slot (primed first; residency checked per sample);
  cold   a never-seen adapter name: registry lookup on chain, HTTP download, sha256 check, unpack,
         parse/register with the engine's AdapterCache, disk -> host -> slot, then prefill;
  disk   a fresh adapter already in the node's store at start-up (registered with the cache, not loaded),
         its file's page cache dropped with posix_fadvise(DONTNEED) before the node starts.
TTFT = time from sending the streaming chat request to the first chunk with non-empty content.
The breakdown comes from the AdapterCache's own counters (disk_to_host.ms, host_to_device.ms, deltas
per request) and from timing wrappers installed on the node's objects in this process: the registry
hook (app.state.resolve_unknown), the fetcher (fetch = download+verify+unpack; _download = download+sha256)
and the engine's register_adapter (parse/validate). The client's per-model voucher step is pre-seeded
from the warm adapter (all adapters cost the same), so a first-use-of-a-name 402 round trip is not part
of the cold numbers; 402s seen are counted and reported.
JSON goes to benchmarks/out/cold_start.json. Speed is measured and printed, never asserted.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import logging
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import types
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out"

import torch  # noqa: E402

if not torch.cuda.is_available():  # as tests/conftest.py: Triton kernels run in the interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

BASE_MODEL = "smollm2-135m-instruct"
PASSWORD = "cold start benchmark"
MESSAGES = [{"role": "user", "content": "Write one sentence about the sea."}]
RANK, ALPHA = 8, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRICES = (1_000_000, 3_000_000)  # per million input / output tokens; the same for every adapter
SPLIT = (8000, 0, 2000)


# ------------------------------------------------------------------------------------------ helpers

def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def pct(xs: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (q in [0, 100])."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def make_adapter(model_dir: Path, out: Path, seed: int) -> Path:
    """Random rank-8 LoRA on every projection of every layer, shapes from the model's config.json."""
    from engine.adapters.peft_format import module_shapes
    from engine.adapters.peft_io import save_peft_adapter

    cfg = types.SimpleNamespace(**json.loads((model_dir / "config.json").read_text()))
    shapes = module_shapes(cfg)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(int(cfg.num_hidden_layers)):
        for m in TARGETS:
            fan_in, fan_out = shapes[m]
            a = torch.randn(RANK, fan_in, generator=g) / fan_in ** 0.5
            b = torch.randn(fan_out, RANK, generator=g) * 0.02
            tensors[(m, layer)] = (a, b)
    return save_peft_adapter(out, tensors, RANK, ALPHA, TARGETS, base_model=BASE_MODEL)


def drop_page_cache(folder: Path) -> None:
    """Ask the kernel to drop the cached pages of the adapter's files (no root needed; best effort)."""
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


class Loopback:
    """A static HTTP server on 127.0.0.1 for the published archives (the adapters' registry URIs)."""

    def __init__(self, directory: Path):
        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------------------ chain

class Chain:
    """anvil + node.chain's deployment + one registered node, with fresh keys funded by anvil_setBalance."""

    def __init__(self):
        from eth_account import Account
        from web3 import Web3

        from node.chain.anvil import Anvil
        from node.chain.artifacts import load_artifact
        from node.chain.deploy import deploy

        self.Account = Account
        self.anvil = Anvil(extra_args=["--silent"]).start()
        self.w3 = Web3(Web3.HTTPProvider(self.anvil.url, request_kwargs={"timeout": 30}))
        deployer, self.operator, self.node_key = self.funded_key(), self.funded_key(), self.funded_key()
        self.dep = deploy(self.w3, Account.from_key(deployer), thawing_period=60)

        def at(key, name):
            return self.w3.eth.contract(address=self.dep.address(key), abi=load_artifact(name).abi)

        self.nodes, self.adapters = at("NodeRegistry", "NodeRegistry"), at("AdapterRegistry", "AdapterRegistry")
        self.token, self.settlement = at("Token", "TestToken"), at("UsageSettlement", "UsageSettlement")
        self.send(self.operator, self.nodes.functions.registerNode(
            Account.from_key(self.node_key).address, "http://127.0.0.1:8000", BASE_MODEL))
        self.node_id = 1

    def funded_key(self) -> str:
        acct = self.Account.create()
        self.w3.provider.make_request("anvil_setBalance", [acct.address, hex(10**21)])
        return "0x" + bytes(acct.key).hex()

    def send(self, key: str, fn):
        acct = self.Account.from_key(key)
        params = {"from": acct.address, "nonce": self.w3.eth.get_transaction_count(acct.address, "pending"),
                  "chainId": self.w3.eth.chain_id}
        params["gas"] = fn.estimate_gas(params) * 13 // 10
        raw = acct.sign_transaction(fn.build_transaction(params)).raw_transaction
        rcpt = self.w3.eth.wait_for_transaction_receipt(self.w3.eth.send_raw_transaction(raw), timeout=60)
        if rcpt.status != 1:
            raise RuntimeError(f"transaction reverted: {getattr(fn, 'fn_name', '?')}")
        return rcpt

    def payer(self, amount: int) -> str:
        key = self.funded_key()
        addr = self.Account.from_key(key).address
        self.send(key, self.token.functions.mint(addr, amount))
        self.send(key, self.token.functions.approve(self.settlement.address, amount))
        self.send(key, self.settlement.functions.deposit(self.node_id, amount))
        return key

    def register_adapter(self, owner: str, name: str, sha_hex: str, uri: str):
        self.send(owner, self.adapters.functions.registerAdapter(
            (name, BASE_MODEL, bytes.fromhex(sha_hex), uri, 0, *PRICES, *SPLIT)))

    def stop(self):
        self.anvil.stop()


# ------------------------------------------------------------------------------------------ node

class Node:
    """create_app in paid mode under uvicorn on 127.0.0.1, in a thread of this process."""

    def __init__(self, settings):
        import httpx
        import uvicorn

        from node.app import create_app

        self.app = create_app(settings)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="on"))
        import asyncio

        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 300
        with httpx.Client(base_url=self.url) as c:
            while True:
                if time.monotonic() > deadline or not self.thread.is_alive():
                    raise RuntimeError("node did not become ready")
                if self.app.state.node.load_error is not None:
                    raise RuntimeError(f"node failed to load: {self.app.state.node.load_error}")
                if self.server.started and c.get("/readyz").status_code == 200:
                    break
                time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


class Probe:
    """Timing wrappers on the node's own objects (same process); durations in ms per request."""

    def __init__(self, app):
        self.t: dict[str, float] = {}
        state = app.state
        fetcher = state.node.extras["money"].registry_sync.fetcher
        fetcher.fetch = self._timed("fetch", fetcher.fetch)
        fetcher._download = self._timed("download", fetcher._download)
        bridge = state.node.engine
        bridge.register_adapter = self._timed("register", bridge.register_adapter)
        orig = state.resolve_unknown

        async def resolve_unknown(name):
            t0 = time.perf_counter()
            try:
                return await orig(name)
            finally:
                self.t["resolve"] = self.t.get("resolve", 0.0) + (time.perf_counter() - t0) * 1000.0

        state.resolve_unknown = resolve_unknown

    def _timed(self, key, fn):
        @functools.wraps(fn)
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t[key] = self.t.get(key, 0.0) + (time.perf_counter() - t0) * 1000.0
        return wrapper

    def reset(self):
        self.t = {}


# ------------------------------------------------------------------------------------------ run

def measure(client, cache, probe, model: str, max_tokens: int, counters: dict) -> dict:
    before = cache.stats()
    probe.reset()
    n402 = counters["402"]
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens, stream=True,
                                            extra_body={"ignore_eos": True})
    first = None
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
    end = time.perf_counter()
    after = cache.stats()
    d2h, h2d = after["disk_to_host"], after["host_to_device"]
    b2h, b2d = before["disk_to_host"], before["host_to_device"]
    t = dict(probe.t)
    s = {
        "model": model,
        "ttft_ms": None if first is None else (first - t0) * 1000.0,
        "total_ms": (end - t0) * 1000.0,
        "resolve_ms": t.get("resolve"),  # registry hook: chain reads + ledger mirror + fetch + register
        "download_verify_ms": t.get("download"),  # HTTP GET + sha256 of the archive
        "unpack_ms": None if "fetch" not in t else t["fetch"] - t.get("download", 0.0),
        "register_ms": t.get("register"),  # parse/validate the folder, register with the AdapterCache
        "disk_to_host_ms": d2h["ms"] - b2h["ms"],
        "host_to_device_ms": h2d["ms"] - b2d["ms"],
        "disk_to_host_misses": d2h["misses"] - b2h["misses"],
        "host_to_device_misses": h2d["misses"] - b2d["misses"],
        "host_to_device_hits": h2d["hits"] - b2d["hits"],
        "http_402": counters["402"] - n402,
    }
    if s["resolve_ms"] is not None:
        s["registry_lookup_ms"] = s["resolve_ms"] - (t.get("fetch") or 0.0) - (s["register_ms"] or 0.0)
    return s


BREAKDOWN = ("registry_lookup_ms", "download_verify_ms", "unpack_ms", "register_ms", "disk_to_host_ms",
             "host_to_device_ms")


def summarize(samples: list[dict]) -> dict:
    ttft = [s["ttft_ms"] for s in samples if s["ttft_ms"] is not None]
    out = {"n": len(ttft), "no_content": sum(1 for s in samples if s["ttft_ms"] is None),
           "ttft_p50_ms": pct(ttft, 50), "ttft_p90_ms": pct(ttft, 90),
           "ttft_mean_ms": statistics.fmean(ttft) if ttft else None,
           "ttft_min_ms": min(ttft) if ttft else None, "ttft_max_ms": max(ttft) if ttft else None,
           "total_p50_ms": pct([s["total_ms"] for s in samples], 50), "breakdown_p50_ms": {}}
    for k in BREAKDOWN:
        vals = [s[k] for s in samples if s.get(k) is not None]
        if vals and max(vals) > 0:
            out["breakdown_p50_ms"][k] = pct(vals, 50)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: SmolLM2-135M-Instruct from the cache)")
    ap.add_argument("--reps", type=int, default=10, help="repetitions per case (fresh adapter names for cold and disk)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=OUT / "cold_start.json")
    args = ap.parse_args(argv)

    import httpx
    import openai

    from node import keys, models
    from node.client import VoucherAuth
    from node.config import Settings, load_settings
    from node.registry import AdapterFetcher, pack_adapter

    t_start = time.perf_counter()
    load_start = loadavg()
    model_dir = args.model or models.resolve(BASE_MODEL, load_settings().models_dir)
    model_dir = Path(model_dir).resolve()
    print(f"model {model_dir}; load average {load_start}", flush=True)

    chain = Chain()
    work = tempfile.TemporaryDirectory(prefix="openlora-cold-start-")
    root = Path(work.name)
    loop = None
    node = None
    try:
        # --- adapters: one warm, reps cold, reps disk; all published over loopback HTTP and on chain
        pub, src, store = root / "published", root / "src", root / "store"
        for d in (pub, src, store):
            d.mkdir()
        loop = Loopback(pub)
        owner = chain.funded_key()
        names = {"warm": ["warm-0"], "cold": [f"cold-{i}" for i in range(args.reps)],
                 "disk": [f"disk-{i}" for i in range(args.reps)]}
        t0 = time.perf_counter()
        shas, sizes = {}, {}
        for seed, name in enumerate(n for group in names.values() for n in group):
            folder = make_adapter(model_dir, src / name, seed + 1)
            shas[name] = pack_adapter(folder, pub / f"{name}.tar.gz")
            sizes[name] = ((folder / "adapter_model.safetensors").stat().st_size, (pub / f"{name}.tar.gz").stat().st_size)
            chain.register_adapter(owner, name, shas[name], f"{loop.url}/{name}.tar.gz")
        # disk case: pulled into the store before the node starts (registered with the cache at start-up,
        # never loaded), then its pages dropped from the page cache
        fetcher = AdapterFetcher(store)
        for name in names["disk"]:
            drop_page_cache(fetcher.fetch(f"{loop.url}/{name}.tar.gz", shas[name], name))
        setup_adapters_s = time.perf_counter() - t0
        print(f"{sum(len(v) for v in names.values())} adapters made, published, registered in {setup_adapters_s:.1f} s "
              f"(safetensors {sizes['warm-0'][0] / 2**20:.2f} MiB, archive {sizes['warm-0'][1] / 2**20:.2f} MiB)", flush=True)

        payer = chain.payer(10**15)
        os.environ[keys.PASSWORD_ENV] = PASSWORD
        keys.create_keystore(root / "node-key.json", PASSWORD, private_key=chain.node_key)
        chain.dep.save(root / "deployment.json")
        settings = Settings(model=str(model_dir), served_model_name=BASE_MODEL, adapter_dir=store, dev=False,
                            device="cpu", data_dir=root, node_id=chain.node_id, rpc_url=chain.anvil.url,
                            deployment_file=root / "deployment.json", keystore_file=root / "node-key.json",
                            settle_confirmations=1, settle_interval_s=3600, registry_sync_s=3600,
                            base_price_per_m_input=1_000_000, base_price_per_m_output=2_000_000, escrow_cache_s=0,
                            engine_max_num_seqs=8, engine_num_lora_slots=4, engine_max_lora_rank=RANK, log_json=False)
        t0 = time.perf_counter()
        node = Node(settings)
        logging.getLogger("node").setLevel(logging.WARNING)
        node_start_s = time.perf_counter() - t0
        print(f"node ready at {node.url} in {node_start_s:.1f} s", flush=True)
        cache = node.app.state.node.engine.adapters
        probe = Probe(node.app)

        counters = {"402": 0}

        def on_response(r):
            if r.status_code == 402:
                counters["402"] += 1

        auth = VoucherAuth(payer)
        client = openai.OpenAI(base_url=node.url + "/v1", api_key="unused", max_retries=0,
                               http_client=httpx.Client(auth=auth, timeout=300, event_hooks={"response": [on_response]}))

        # --- prime: engine warm-up on the base model, the warm adapter into a slot, the voucher step learned
        for _ in range(2):
            measure(client, cache, probe, BASE_MODEL, args.max_tokens, counters)
            measure(client, cache, probe, "warm-0", args.max_tokens, counters)
        step = auth.step.get("warm-0", 0)
        for name in names["cold"] + names["disk"]:
            auth.step[name] = step  # same prices: pre-sign what warm-0 needed (no 402 round trip)

        samples: dict[str, list[dict]] = {"base": [], "warm": [], "cold": [], "disk": []}
        for i in range(args.reps):
            samples["base"].append(measure(client, cache, probe, BASE_MODEL, args.max_tokens, counters))
            samples["warm"].append(measure(client, cache, probe, "warm-0", args.max_tokens, counters))
            samples["cold"].append(measure(client, cache, probe, names["cold"][i], args.max_tokens, counters))
            samples["disk"].append(measure(client, cache, probe, names["disk"][i], args.max_tokens, counters))
            print(f"rep {i + 1}/{args.reps}: " + ", ".join(
                f"{k} {v[-1]['ttft_ms']:.0f} ms" if v[-1]["ttft_ms"] is not None else f"{k} -" for k, v in samples.items()),
                flush=True)
        load_end = loadavg()
        final_stats = cache.stats()
        registered_on_chain = len(names["warm"]) + len(names["cold"]) + len(names["disk"])
    finally:
        if node is not None:
            node.stop()
        os.environ.pop(keys.PASSWORD_ENV, None)
        if loop is not None:
            loop.stop()
        chain.stop()
        work.cleanup()

    checks = {
        "warm_resident_every_sample": all(s["host_to_device_hits"] >= 1 and s["host_to_device_misses"] == 0
                                          for s in samples["warm"]),
        "cold_downloaded_every_sample": all(s["download_verify_ms"] is not None for s in samples["cold"]),
        "disk_read_from_disk_every_sample": all(s["disk_to_host_misses"] == 1 and s["download_verify_ms"] is None
                                                for s in samples["disk"]),
        "http_402_during_samples": sum(s["http_402"] for v in samples.values() for s in v),
    }
    summary = {k: summarize(v) for k, v in samples.items()}
    wall_s = time.perf_counter() - t_start
    cmd = "python benchmarks/cold_start.py" + (f" --model {args.model}" if args.model else "") + \
        (f" --reps {args.reps}" if args.reps != 10 else "") + \
        (f" --max-tokens {args.max_tokens}" if args.max_tokens != 8 else "")
    result = {
        "benchmark": "cold_start",
        "command": cmd,
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpus": os.cpu_count(), "device": "cpu",
                    "loadavg_start": load_start, "loadavg_end": load_end},
        "config": {"model": str(model_dir), "reps": args.reps, "max_tokens": args.max_tokens, "messages": MESSAGES,
                   "adapter_rank": RANK, "adapter_targets": list(TARGETS),
                   "adapter_safetensors_bytes": sizes["warm-0"][0], "adapter_archive_bytes": sizes["warm-0"][1],
                   "adapters_registered_on_chain": registered_on_chain, "engine_num_lora_slots": 4,
                   "transport": "registry over loopback HTTP (127.0.0.1), node in-process under uvicorn"},
        "setup_s": {"adapters": round(setup_adapters_s, 2), "node_start": round(node_start_s, 2)},
        "wall_s": round(wall_s, 1),
        "checks": checks,
        "summary": summary,
        "cache_stats_end": final_stats,
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    def f(x):
        return "-" if x is None else f"{x:.1f}" if x < 10 else f"{x:.0f}"

    print()
    print(f"TTFT by adapter location, {Path(model_dir).name}, CPU ({os.cpu_count()} cores), max_tokens {args.max_tokens}, "
          f"{args.reps} reps; load average {load_start} -> {load_end}")
    hdr = f"{'case':<6} {'p50 ms':>8} {'p90 ms':>8}  {'dl+verify':>9} {'unpack':>7} {'register':>8} {'lookup':>7} " \
          f"{'disk->host':>10} {'host->dev':>9}"
    print(hdr)
    print("-" * len(hdr))
    for k in ("base", "warm", "disk", "cold"):
        s, b = summary[k], summary[k]["breakdown_p50_ms"]
        print(f"{k:<6} {f(s['ttft_p50_ms']):>8} {f(s['ttft_p90_ms']):>8}  {f(b.get('download_verify_ms')):>9} "
              f"{f(b.get('unpack_ms')):>7} {f(b.get('register_ms')):>8} {f(b.get('registry_lookup_ms')):>7} "
              f"{f(b.get('disk_to_host_ms')):>10} {f(b.get('host_to_device_ms')):>9}")
    print("(breakdown columns: medians over the samples, ms; '-' = did not happen)")
    print(f"checks: {checks}")
    print(f"wall {wall_s:.0f} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
