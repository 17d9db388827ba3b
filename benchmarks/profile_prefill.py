"""Where an engine prefill step spends its time (CUDA only): one step that prefills B fresh prompts at once.

Same engine as gpu_engine.py / profile_step.py (Llama-3-8B shapes, random bf16 weights, synthetic rank-16
adapters on all seven projections, loaded before timing). Per (prompt tokens in the step, adapters):
  - wall time of `LLMEngine.step` for a step that only prefills (median of --reps, fresh prompts each time so
    the prefix cache never hits), and the GEMM floor of that step (2 x params x tokens / --tflops)
  - a torch.profiler table of that step's GPU kernels by device time

    python3 benchmarks/profile_prefill.py --configs 4096:0,4096:1,4096:16 [--prompt 256] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_engine as ge  # noqa: E402
from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def prefill_step(engine, mcfg, n_req: int, prompt: int, adapters: int, g: torch.Generator) -> float:
    """Queue n_req fresh prompts, time the one step that prefills them all, then drop them."""
    ids = []
    for i in range(n_req):
        p = torch.randint(10, mcfg.vocab_size - 10, (prompt,), generator=g).tolist()
        ids.append(engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                                      adapter=f"a{i % adapters}" if adapters else None))
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    ms = (time.perf_counter() - t) * 1e3
    for rid in ids:
        engine.abort(rid)
    return ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="4096:0,4096:1,4096:16", help="tokens:adapters,...")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tflops", type=float, default=700.0, help="bf16 dense GEMM rate for the floor")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "CUDA only"
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    max_tokens = max(t for t, _ in configs)
    max_b = max_tokens // args.prompt
    tmp = Path(tempfile.mkdtemp(prefix="profile-prefill-"))
    model_dir = ge.write_config(tmp / "llama3-8b-shape", ge.LLAMA3_8B)
    mcfg = ModelConfig.from_dir(model_dir)
    max_len = args.prompt + 8
    cfg = EngineConfig(device="cuda", dtype="bfloat16", num_kv_blocks=max_b * math.ceil(max_len / 16) + 64,
                       max_num_seqs=max_b, max_num_batched_tokens=max_tokens, max_model_len=max_len,
                       num_lora_slots=32, max_lora_rank=16, collect_influence=True, cuda_graphs=False)
    cache = ge.SyntheticAdapterCache(mcfg, num_slots=32, max_rank=16, device="cuda", dtype=torch.bfloat16,
                                     host_bytes=8 << 30)
    engine = ge.build_engine(model_dir, cfg, adapters=cache)
    n_adapters = max([a for _, a in configs] + [1])
    for i in range(n_adapters):
        cache.register_synthetic(f"a{i}", i)
        cache.load(f"a{i}")
    flop_per_token = 2 * sum(p.numel() for n, p in engine.model.named_parameters() if "embed_tokens" not in n)
    g = torch.Generator().manual_seed(0)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "prompt": args.prompt,
              "configs": {}}
    for tokens, adapters in configs:
        n_req = tokens // args.prompt
        prefill_step(engine, mcfg, n_req, args.prompt, adapters, g)  # compile / warm up
        times = [prefill_step(engine, mcfg, n_req, args.prompt, adapters, g) for _ in range(args.reps)]
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            prefill_step(engine, mcfg, n_req, args.prompt, adapters, g)
        avg = prof.key_averages()
        key = "self_device_time_total" if hasattr(avg[0], "self_device_time_total") else "self_cuda_time_total"
        rows = sorted(((getattr(e, key) / 1e3, e.count, e.key) for e in avg if getattr(e, key) > 0), reverse=True)
        floor_ms = flop_per_token * n_req * args.prompt / (args.tflops * 1e12) * 1e3
        r = dict(tokens=n_req * args.prompt, requests=n_req, adapters=adapters,
                 step_ms=round(statistics.median(times), 2), gemm_floor_ms=round(floor_ms, 2),
                 gpu_ms=round(sum(x[0] for x in rows), 2),
                 top=[dict(kernel=k[:90], ms=round(ms, 2), calls=c) for ms, c, k in rows[:15]])
        report["configs"][f"{tokens}:{adapters}"] = r
        print(f"\n===== {r['tokens']} prompt tokens ({n_req} x {args.prompt}), {adapters} adapters: step "
              f"{r['step_ms']} ms, GPU kernels {r['gpu_ms']} ms, GEMM floor {r['gemm_floor_ms']} ms "
              f"at {args.tflops:.0f} TFLOP/s", flush=True)
        for row in r["top"]:
            print(f"  {row['ms']:8.2f} ms {row['calls']:6d}x  {row['kernel']}")
        cpu = sorted(((e.self_cpu_time_total / 1e3, e.count, e.key) for e in avg), reverse=True)[:12]
        r["top_cpu"] = [dict(op=k[:90], ms=round(ms, 2), calls=c) for ms, c, k in cpu]
        print("  host (self CPU time):")
        for row in r["top_cpu"]:
            print(f"  {row['ms']:8.2f} ms {row['calls']:6d}x  {row['op']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_prefill.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
