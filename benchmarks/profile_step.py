"""Where an eager engine decode step spends its time (CUDA only): torch.profiler over a few full-batch decode steps.

Builds gpu_engine.py's engine (Llama-3-8B shapes, random bf16 weights, synthetic rank-16 adapters on all seven
projections), fills a batch of B decoding requests over A adapters, and per (B, A):
  - synchronised wall time of `LLMEngine.step` (median of --steps), influence statistics on and off
  - a profile of --steps steps: top CPU ops by self time, CUDA kernels launched per step, GPU busy time per step
  - one step profiled with stacks: every sync / device-to-host copy in it and the engine line that made it

    python3 benchmarks/profile_step.py --configs 32:1,32:32,256:1,256:32 [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_engine as ge  # noqa: E402
from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync", "cudaStreamWaitEvent")
LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                "cudaMemsetAsync", "cudaGraphLaunch")


def label(obj, attr, name):
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        with record_function(name):
            return fn(*a, **k)
    setattr(obj, attr, wrapped)


def timed_steps(engine, n):
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return ts


def busy_ms(events):
    """Union of CUDA activity intervals (us -> ms)."""
    iv = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, cur_s, cur_e = 0.0, None, None
    for s, e in iv:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="32:1,32:32,256:1,256:32", help="batch:adapters,...")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--no-graphs", action="store_true", help="EngineConfig.cuda_graphs=False where it exists")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "CUDA only"
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    max_b = max(b for b, _ in configs)
    prompt, max_len = 64, 1024
    tmp = Path(tempfile.mkdtemp(prefix="profile-step-"))
    model_dir = ge.write_config(tmp / "llama3-8b-shape", ge.LLAMA3_8B)
    mcfg = ModelConfig.from_dir(model_dir)
    kw = dict(device="cuda", dtype="bfloat16", num_kv_blocks=max_b * math.ceil(max_len / 16) + 64,
              max_num_seqs=max_b, max_num_batched_tokens=8192, max_model_len=max_len, num_lora_slots=256,
              max_lora_rank=16, collect_influence=True)
    if args.no_graphs and "cuda_graphs" in EngineConfig.__dataclass_fields__:
        kw["cuda_graphs"] = False
    cache = ge.SyntheticAdapterCache(mcfg, num_slots=256, max_rank=16, device="cuda", dtype=torch.bfloat16,
                                     host_bytes=8 << 30)
    engine = ge.build_engine(model_dir, EngineConfig(**kw), adapters=cache)
    for i in range(64):
        cache.register_synthetic(f"a{i}", i)
    label(engine.scheduler, "schedule", "step::schedule")
    label(engine.scheduler, "postprocess", "step::postprocess")
    label(engine.runner, "_prepare", "step::prepare")
    label(engine.runner.model, "forward", "step::forward")
    label(engine.runner, "sampler", "step::sample")
    g = torch.Generator().manual_seed(0)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "configs": {}}
    for B, A in configs:
        ids = []
        for i in range(B):
            p = torch.randint(10, mcfg.vocab_size - 10, (prompt,), generator=g).tolist()
            ids.append(engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=512, ignore_eos=True),
                                          adapter=f"a{i % A}" if A else None))
        # prefill, then a few decode steps so every request decodes and the kernels are compiled
        deadline = time.time() + 120
        while time.time() < deadline:  # adapters load in the background: wait for every request to decode
            if not engine.step():
                time.sleep(0.001)
            run = engine.scheduler.running
            if len(run) == B and all(s.num_computed_tokens >= len(s.token_ids) - 1 for s in run):
                break
        else:
            print(f"batch {B}, {A} adapters: not all requests decoding after 120 s", flush=True)
        timed_steps(engine, 3)
        r = {}
        r["step_ms_influence_on"] = statistics.median(timed_steps(engine, 7))
        engine.runner.collect_influence = False
        r["step_ms_influence_off"] = statistics.median(timed_steps(engine, 7))
        engine.runner.collect_influence = True
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            timed_steps(engine, args.steps)
        evs = prof.events()
        gpu = [e for e in evs if e.device_type == torch.autograd.DeviceType.CUDA]
        launches = [e for e in evs if e.name in LAUNCH_NAMES]
        syncs = [e for e in evs if e.name in SYNC_NAMES]
        steps = args.steps
        r["cuda_kernels_per_step"] = len(gpu) / steps
        r["launch_calls_per_step"] = {n: sum(1 for e in launches if e.name == n) / steps for n in LAUNCH_NAMES
                                      if any(e.name == n for e in launches)}
        r["sync_calls_per_step"] = {n: sum(1 for e in syncs if e.name == n) / steps for n in SYNC_NAMES
                                    if any(e.name == n for e in syncs)}
        r["gpu_busy_ms_per_step"] = busy_ms(gpu) / steps
        # GPU time per kernel name (which kernels a change moved: the LoRA ones, the base matmuls)
        per = {}
        for e in gpu:
            t, n = per.get(e.name, (0.0, 0))
            per[e.name] = (t + e.time_range.elapsed_us(), n + 1)
        r["gpu_kernels_us_per_step"] = {k: [round(t / steps, 1), n / steps]
                                        for k, (t, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:25]}
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=48)
        # one step with stacks: where each sync / memcpy comes from
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof2:
            timed_steps(engine, 1)
        where = []
        for e in prof2.events():
            if e.name in SYNC_NAMES:
                frames = [f for f in (e.stack or []) if "/engine/" in f or "/kernels/" in f or "profile_step" in f]
                where.append(f"{e.name}: " + " <- ".join(frames[:3]))
        r["syncs_where"] = sorted(set(where))
        report["configs"][f"{B}:{A}"] = r
        print(f"\n===== batch {B}, {A} adapters: step {r['step_ms_influence_on']:.1f} ms (influence on), "
              f"{r['step_ms_influence_off']:.1f} ms (off); GPU busy {r['gpu_busy_ms_per_step']:.1f} ms/step "
              f"(profiled, influence on); {r['cuda_kernels_per_step']:.0f} GPU ops/step", flush=True)
        print("launch calls/step:", r["launch_calls_per_step"])
        print("sync/copy calls/step:", r["sync_calls_per_step"])
        for w in r["syncs_where"]:
            print("  ", w)
        print(table, flush=True)
        print("GPU kernels, us per step and launches per step:")
        for k, (t, n) in r["gpu_kernels_us_per_step"].items():
            print(f"  {t:9.1f} {n:6.0f}  {k[:90]}")
        for rid in ids:
            engine.abort(rid)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile_step.json").write_text(json.dumps(report, indent=2))
    print("\nsummary: B:A  on_ms  off_ms  gpu_busy_ms  gpu_ops/step")
    for k, r in report["configs"].items():
        print(f"{k:>7} {r['step_ms_influence_on']:7.1f} {r['step_ms_influence_off']:7.1f} "
              f"{r['gpu_busy_ms_per_step']:8.1f} {r['cuda_kernels_per_step']:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
