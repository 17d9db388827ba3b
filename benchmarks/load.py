"""Load benchmark: hundreds of concurrent streaming clients against a real `openlora serve --dev` process
with a tiny random Llama (SmolLM2's tokenizer), on this machine's CPU.

    .venv/bin/python benchmarks/load.py [--clients 200] [--max-tokens 16] [--queue 64] [--max-num-seqs 32]

Every client streams one chat completion (ignore_eos, so each answer is exactly --max-tokens tokens) and
retries after the Retry-After of a 429 until --deadline. Reported (not asserted): requests completed, 429s,
errors, TTFT and end-to-end latency p50/p99 (end-to-end counts from the client's first attempt, so the
backoff after a 429 is included), output tokens/s, the server's peak RSS, and the load average. Streams
are checked: tokens per answer (logprobs entries) = usage.completion_tokens, and receipt ids unique.
JSON goes to benchmarks/out/load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "out"


def tiny_model(dest: Path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer, written once (seconds)."""
    if (dest / "config.json").exists():
        return dest
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from node import models
    from node.config import DEFAULT_MODEL, load_settings

    tok_src = models.pull(DEFAULT_MODEL, load_settings().models_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    model.save_pretrained(dest, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tok_src / name).exists():
            shutil.copy(tok_src / name, dest / name)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs) + 0.5)) - 1))]


async def client(c, i: int, args, deadline: float) -> dict:
    import httpx

    body = {"model": "alpha-base", "messages": [{"role": "user", "content": f"client {i}: write a story"}],
            "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True, "logprobs": True, "temperature": 0.8,
            "seed": i, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    refusals = 0
    while time.monotonic() < deadline:
        try:
            async with c.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code == 429:
                    refusals += 1
                    await r.aread()
                    await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 1.0) * (0.5 + (i % 10) / 10))
                    continue
                if r.status_code != 200:
                    return {"error": f"HTTP {r.status_code}", "refusals": refusals}
                first = None
                tokens, usage, receipt = 0, None, r.headers.get("x-openlora-receipt")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        return {"error": ev["error"].get("message", "stream error"), "refusals": refusals}
                    for ch in ev["choices"]:
                        n = len((ch.get("logprobs") or {}).get("content") or [])
                        if n and first is None:
                            first = time.monotonic()
                        tokens += n
                    usage = ev.get("usage") or usage
                end = time.monotonic()
                return {"ttft": (first or end) - t0, "e2e": end - t0, "tokens": tokens,
                        "usage_tokens": (usage or {}).get("completion_tokens"), "receipt": receipt, "refusals": refusals}
        except httpx.HTTPError as exc:
            return {"error": f"{type(exc).__name__}", "refusals": refusals}
    return {"error": "deadline", "refusals": refusals}


async def run_load(url: str, args) -> tuple[list[dict], float]:
    import httpx

    limits = httpx.Limits(max_connections=args.clients + 10, max_keepalive_connections=args.clients + 10)
    async with httpx.AsyncClient(base_url=url, timeout=args.deadline, limits=limits) as c:
        t0 = time.monotonic()
        res = await asyncio.gather(*(client(c, i, args, t0 + args.deadline) for i in range(args.clients)))
        return list(res), time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--queue", type=int, default=64, help="the node's max_queued_requests (429 above)")
    ap.add_argument("--max-num-seqs", type=int, default=32, help="sequences the engine decodes together")
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds before a client gives up")
    ap.add_argument("--out", type=Path, default=OUT / "load.json")
    args = ap.parse_args()

    work = OUT / "load-work"
    model = tiny_model(work / "tiny-llama")
    (work / "adapters").mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "OPENLORA_DATA_DIR": str(work / "data"), "OPENLORA_SERVED_MODEL_NAME": "alpha-base",
           "OPENLORA_MAX_QUEUED_REQUESTS": str(args.queue), "OPENLORA_ENGINE_MAX_NUM_SEQS": str(args.max_num_seqs),
           "OPENLORA_LOG_LEVEL": "warning", "XDG_CONFIG_HOME": str(work / "config")}
    env.setdefault("TRITON_INTERPRET", "1")
    env.pop("OPENLORA_CONFIG", None)
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--dev", "--model", str(model), "--device", "cpu",
                             "--adapter-dir", str(work / "adapters"), "--port", str(port)], cwd=ROOT, env=env,
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited ({proc.returncode}); see {work / 'server.log'}")
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not become ready")
            time.sleep(0.2)
        load_before = os.getloadavg()
        results, wall = asyncio.run(run_load(url, args))
        load_after = os.getloadavg()
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    ok = [r for r in results if "e2e" in r]
    errors = [r["error"] for r in results if "error" in r]
    bad_tokens = sum(1 for r in ok if r["tokens"] != r["usage_tokens"] or r["tokens"] != args.max_tokens)
    receipts = [r["receipt"] for r in ok]
    summary = {
        "clients": args.clients, "max_tokens": args.max_tokens, "max_queued_requests": args.queue,
        "engine_max_num_seqs": args.max_num_seqs, "completed": len(ok), "errors": len(errors),
        "error_kinds": sorted(set(errors)), "responses_429": sum(r["refusals"] for r in results),
        "token_mismatches": bad_tokens, "duplicate_receipts": len(receipts) - len(set(receipts)),
        "ttft_p50_s": pct([r["ttft"] for r in ok], 50), "ttft_p99_s": pct([r["ttft"] for r in ok], 99),
        "e2e_p50_s": pct([r["e2e"] for r in ok], 50), "e2e_p99_s": pct([r["e2e"] for r in ok], 99),
        "e2e_mean_s": statistics.fmean([r["e2e"] for r in ok]) if ok else float("nan"),
        "wall_s": wall, "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall if wall else 0.0,
        "server_peak_rss_mb": rss, "loadavg_before": load_before, "loadavg_after": load_after,
        "cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    rows = [("clients", f"{args.clients}"), ("completed / errors", f"{len(ok)} / {len(errors)}"),
            ("429 responses (retried)", f"{summary['responses_429']}"),
            ("token mismatches / duplicate receipts", f"{bad_tokens} / {summary['duplicate_receipts']}"),
            ("TTFT p50 / p99", f"{summary['ttft_p50_s']:.2f} s / {summary['ttft_p99_s']:.2f} s"),
            ("end-to-end p50 / p99", f"{summary['e2e_p50_s']:.2f} s / {summary['e2e_p99_s']:.2f} s"),
            ("output tokens/s", f"{summary['output_tokens_per_s']:.1f}"), ("wall", f"{wall:.1f} s"),
            ("server peak RSS", f"{rss:.0f} MiB"),
            ("load average (1/5/15 min) after", " / ".join(f"{x:.2f}" for x in load_after))]
    w = max(len(k) for k, _ in rows)
    print(f"load: {args.clients} streaming clients, {args.max_tokens} tokens each, queue {args.queue}, "
          f"{args.max_num_seqs} seqs, {os.cpu_count()} CPUs")
    print(f"| {'metric'.ljust(w)} | value |\n|{'-' * (w + 2)}|-------|")
    for k, v in rows:
        print(f"| {k.ljust(w)} | {v} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
