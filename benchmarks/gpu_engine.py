"""Engine-level GPU benchmark (issue 6, items 5-7): Llama-3-8B shapes, random bf16 weights, many adapters.

Offline workloads (all requests queued at once, greedy, 256 prompt / 128 output tokens, EOS ignored):
no LoRA, one adapter, 100 and 1000 rank-16 adapters (all seven projections) under uniform and Zipf(1.0)
popularity, batch-32 runs for the decode-step floor, and a 64-request / 16-adapter run compared against
transformers + PEFT (`adapter_names` mixed batch) on the same GPU. Also adapter load latency
(host -> GPU, disk -> GPU) and the GPU memory peak.

No download: the engine's model is built from a ModelConfig and filled with randn * 0.02 on the device
(`random_model`); the tokenizer is a stub (prompts are token ids). 1000 adapters of 84 MB do not fit the
machine's disk, so the many-adapter runs use `SyntheticAdapterCache`: an AdapterCache whose host tier is
fed from each adapter's seed (views into one pinned random buffer at seed-dependent offsets) instead of
from disk; the host -> device path (slot pool, side stream, events) is the engine's own. The disk ->
GPU latency is measured separately on real PEFT-format adapters written by PEFT.

    python3 benchmarks/gpu_engine.py --out DIR        # CUDA only; writes DIR/gpu_engine.json after each part
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import llm_engine as llm_engine_mod  # noqa: E402
from engine.adapters.cache import AdapterCache  # noqa: E402
from engine.adapters.peft_format import ALL_MODULES, AdapterSpec, AdapterWeights, ParsedAdapter  # noqa: E402
from engine.config import EngineConfig, ModelConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

LLAMA3_8B = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16",
)


# ----------------------------------------------------------------------------- engine without a checkpoint

class StubTokenizer:
    """Enough of engine.tokenizer.Tokenizer for token-id prompts: decodes to nothing."""

    def __init__(self, model_dir=None):
        self.eos_token_ids: set[int] = set()

    def encode(self, text):
        raise ValueError("the stub tokenizer takes token-id prompts only")

    def decode(self, ids, skip_special_tokens=True):
        return ""


def random_model(model_dir, dtype=torch.bfloat16, device="cuda", max_positions=None, seed=0):
    """The engine's LlamaForCausalLM for model_dir's config.json, weights randn * 0.02 made on `device`
    (norm weights 1). Same signature as engine.loader.load_model."""
    from engine.models.llama import LlamaForCausalLM

    cfg = ModelConfig.from_dir(model_dir)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are made in dtype; the rotary tables are float32 explicitly
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg, max_positions)
    finally:
        torch.set_default_dtype(prev)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def write_config(root: Path, cfg: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def build_engine(model_dir: Path, config: EngineConfig, adapters=None, random_weights: bool = True):
    """LLMEngine with a stub tokenizer and (by default) random weights instead of a checkpoint."""
    patches = [mock.patch.object(llm_engine_mod, "Tokenizer", StubTokenizer)]
    if random_weights:
        patches.append(mock.patch.object(llm_engine_mod, "load_model", random_model))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        return llm_engine_mod.LLMEngine(model_dir, config, adapters=adapters)


class SyntheticAdapterCache(AdapterCache):
    """AdapterCache whose adapters come from a seed instead of a folder: on a host-tier miss the weights are
    views into one pinned random buffer at offsets derived from the seed (deterministic, no disk, ~free).
    Everything from the host tier on (slots, LRU, side-stream copies, events, counters) is AdapterCache's."""

    def __init__(self, model_config, *, rank=16, pool_elems=64 << 20, **kw):
        super().__init__(model_config, **kw)
        self.synth_rank = rank
        self._seeds: dict[str, int] = {}
        src = (torch.randn(pool_elems, device=self.device) * 0.02).to(self.dtype)
        self._buf = src.cpu().pin_memory() if self._cuda else src.cpu()
        del src
        shapes = self._shapes
        self._synth_nbytes = sum((shapes[m][0] + shapes[m][1]) * rank for m in self.target_modules) \
            * int(model_config.num_hidden_layers) * self._buf.element_size()

    def register_synthetic(self, name: str, seed: int) -> AdapterSpec:
        r = self.synth_rank
        spec = AdapterSpec(name=name, path=None, content_hash=f"synthetic-{seed:08d}", rank=r, alpha=2.0 * r,
                           use_rslora=False, scale=2.0, target_modules=self.target_modules,
                           nbytes=self._synth_nbytes, base_model=None,
                           module_ranks=tuple((m, r) for m in self.target_modules))
        with self._lock:
            self._specs[name] = spec
            self._parsed[spec.content_hash] = ParsedAdapter(spec, (), Path("/nonexistent"))
            self._seeds[spec.content_hash] = seed
        return spec

    def _materialise(self, key: str, seed: int) -> AdapterWeights:
        rng = np.random.default_rng(seed)
        n = self._buf.numel()
        tensors = {}
        for m in self.target_modules:
            fan_in, fan_out = self._shapes[m]
            for layer in range(int(self.model_config.num_hidden_layers)):
                pair = []
                for shape in ((self.synth_rank, fan_in), (fan_out, self.synth_rank)):
                    numel = shape[0] * shape[1]
                    off = int(rng.integers(0, (n - numel) // 8)) * 8
                    pair.append(self._buf[off:off + numel].view(shape))
                tensors[(m, layer)] = tuple(pair)
        return AdapterWeights(content_hash=key, rank=self.synth_rank, scale=2.0, tensors=tensors)

    def _host_weights(self, key: str) -> AdapterWeights:
        with self._lock:
            seed = self._seeds.get(key)
            if seed is not None:
                w = self.host.get(key)
                if w is not None:
                    self.disk_to_host.hits += 1
                    return w
        if seed is None:
            return super()._host_weights(key)
        t0 = time.perf_counter()
        w = self._materialise(key, seed)
        with self._lock:
            self.disk_to_host.misses += 1
            self.disk_to_host.ms += (time.perf_counter() - t0) * 1000.0
            self._keep_on_host(key, w)
        return w


# ----------------------------------------------------------------------------- measurement helpers

def copy_bandwidth(nbytes=2 << 30, reps=10) -> float:
    """Device-to-device copy, bytes read + written per second (median)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    b = torch.empty_like(a)
    times = []
    for i in range(reps + 2):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        if i >= 2:
            times.append(s.elapsed_time(e) / 1000.0)
    del a, b
    torch.cuda.empty_cache()
    return 2 * nbytes / float(np.median(times))


class StepRecorder:
    """Wraps runner.run: wall time of each step (synchronised) with its batch, context and adapter count."""

    def __init__(self, runner):
        self.runner, self.orig, self.steps = runner, runner.run, []
        runner.run = self._run

    def _run(self, out):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = self.orig(out)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        sched = out.scheduled
        self.steps.append(dict(
            batch=len(sched), decode=all(s.num_new_tokens == 1 for s in sched),
            ctx=sum(s.seq.num_computed_tokens + s.num_new_tokens for s in sched),
            adapters=len({s.seq.lora_slot for s in sched if s.seq.lora_slot >= 0}), s=dt))
        return res


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q)) if xs else None


# ----------------------------------------------------------------------------- the benchmark

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_engine.json")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--configs", help="comma-separated config labels to run (default: all)")
    ap.add_argument("--no-influence", action="store_true", help="EngineConfig.collect_influence=False")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "CUDA only"
    out_path = Path(args.out) / "gpu_engine.json"
    t_start = time.time()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "commit": commit or os.environ.get("OPENLORA_COMMIT"), "args": vars(args), "configs": {},
              "notes": []}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        pass

    def save():
        report["elapsed_s"] = round(time.time() - t_start, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2))

    bw = copy_bandwidth()
    report["copy_bandwidth_GBps"] = round(bw / 1e9, 1)
    print(f"device {report['device']}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    save()

    tmp = Path(tempfile.mkdtemp(prefix="gpu-engine-"))
    model_dir = write_config(tmp / "llama3-8b-shape", LLAMA3_8B)
    mcfg = ModelConfig.from_dir(model_dir)
    n_layers, kv_size = mcfg.num_hidden_layers, mcfg.kv_size
    max_len = args.prompt + args.output
    blocks = args.requests * math.ceil(max_len / 16) + 256
    ecfg = EngineConfig(device="cuda", dtype="bfloat16", num_kv_blocks=blocks, max_num_seqs=args.requests,
                        max_num_batched_tokens=4096, max_model_len=1024, num_lora_slots=args.slots,
                        max_lora_rank=16, collect_influence=not args.no_influence)
    t0 = time.perf_counter()
    cache = SyntheticAdapterCache(mcfg, num_slots=args.slots, max_rank=16, device="cuda", dtype=torch.bfloat16,
                                  host_bytes=8 << 30)
    engine = build_engine(model_dir, ecfg, adapters=cache)
    torch.cuda.synchronize()
    report["build_s"] = round(time.perf_counter() - t0, 1)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters()
                       if "embed_tokens" not in n)
    adapter_bytes = cache._synth_nbytes
    kv_per_token = 2 * n_layers * kv_size * 2
    report.update(weight_bytes=weight_bytes, adapter_bytes=adapter_bytes, kv_bytes_per_token=kv_per_token,
                  kv_blocks=blocks, lora_slots=args.slots)
    print(f"engine built in {report['build_s']} s; weights {weight_bytes / 1e9:.2f} GB (read per step), "
          f"adapter {adapter_bytes / 1e6:.1f} MB, memory {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)

    groups = {"one": 1, "a": 1000, "b": 100, "p": 16, "w": 4}
    seed = 0
    for prefix, n in groups.items():
        for i in range(n):
            cache.register_synthetic(f"{prefix}{i}", seed)
            seed += 1
    rec = StepRecorder(engine.runner)
    rng = np.random.default_rng(0)

    def prompts(n):
        return [rng.integers(10, mcfg.vocab_size - 10, size=args.prompt).tolist() for _ in range(n)]

    def pick(prefix, n_adapters, n, dist):
        if n_adapters == 0:
            return [None] * n
        if dist == "uniform":
            idx = rng.integers(0, n_adapters, size=n)
        else:  # Zipf(1.0) over ranks 1..n_adapters
            p = 1.0 / np.arange(1, n_adapters + 1)
            idx = rng.choice(n_adapters, size=n, p=p / p.sum())
        return [f"{prefix}{i}" for i in idx]

    def run_config(label, n_req, prefix, n_adapters, dist, out_tokens=args.output):
        names = pick(prefix, n_adapters, n_req, dist)
        ps = prompts(n_req)
        params = SamplingParams(temperature=0.0, max_tokens=out_tokens, ignore_eos=True)
        before = {k: dict(v) for k, v in cache.stats().items() if isinstance(v, dict)}
        rec.steps.clear()
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = engine.generate(ps, params, adapters=names)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        ntok = sum(len(o.token_ids) for o in outs)
        steps = list(rec.steps)
        full = max((s["batch"] for s in steps if s["decode"]), default=0)
        dec = [s for s in steps if s["decode"] and s["batch"] >= 0.9 * full]
        step_s = float(np.median([s["s"] for s in dec])) if dec else None
        floors = [(weight_bytes + s["adapters"] * adapter_bytes + s["ctx"] * kv_per_token) / bw for s in dec]
        floor_s = float(np.median(floors)) if floors else None
        after = cache.stats()
        h2d = {k: after["host_to_device"][k] - before["host_to_device"][k] for k in ("misses", "bytes", "ms")}
        r = dict(requests=n_req, adapters=n_adapters, distribution=dist,
                 distinct_adapters=len({x for x in names if x is not None}), output_tokens=ntok,
                 wall_s=round(wall, 3), output_tok_s=round(ntok / wall, 1), steps=len(steps),
                 prefill_steps=sum(1 for s in steps if not s["decode"]), decode_batch=full,
                 decode_step_ms=round(step_s * 1e3, 2) if step_s else None,
                 decode_floor_ms=round(floor_s * 1e3, 2) if floor_s else None,
                 step_over_floor=round(step_s / floor_s, 2) if step_s and floor_s else None,
                 decode_steps_measured=len(dec),
                 median_adapters_per_decode_step=float(np.median([s["adapters"] for s in dec])) if dec else 0,
                 host_to_device_loads=h2d["misses"], host_to_device_ms_per_load=round(h2d["ms"] / h2d["misses"], 2)
                 if h2d["misses"] else None,
                 mem_peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        report["configs"][label] = r
        save()
        print(f"{label:14} {ntok:6d} tok {wall:7.2f} s {r['output_tok_s']:9.1f} tok/s  step {r['decode_step_ms']} ms "
              f"(batch {full}, floor {r['decode_floor_ms']} ms, x{r['step_over_floor']}), loads {h2d['misses']}",
              flush=True)
        return r

    # warm-up: Triton compiles for prefill + decode, with and without LoRA
    t = time.perf_counter()
    engine.generate(prompts(4), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                    adapters=["w0", None, "w1", "w2"])
    engine.generate(prompts(2), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    report["warmup_s"] = round(time.perf_counter() - t, 1)
    print(f"warm-up {report['warmup_s']} s", flush=True)

    n = args.requests
    plan = [("nolora", n, None, 0, "uniform"), ("one_adapter", n, "one", 1, "uniform"),
            ("a1000_uniform", n, "a", 1000, "uniform"), ("a1000_zipf", n, "a", 1000, "zipf"),
            ("a100_uniform", n, "b", 100, "uniform"), ("a100_zipf", n, "b", 100, "zipf"),
            ("b32_nolora", 32, None, 0, "uniform"), ("b32_one_adapter", 32, "one", 1, "uniform"),
            ("b32_32adapters", 32, "a", 1000, "uniform"),
            ("peft_workload", 64, "p", 16, "uniform")]
    if args.configs:
        keep = set(args.configs.split(","))
        plan = [p for p in plan if p[0] in keep]
    for label, n_req, prefix, n_ad, dist in plan:
        try:
            run_config(label, n_req, prefix, n_ad, dist)
        except Exception:
            report["notes"].append(f"{label} failed: {traceback.format_exc(limit=4)}")
            traceback.print_exc()
            save()
    c = report["configs"]
    if "nolora" in c and "one_adapter" in c:
        report["one_adapter_over_nolora"] = round(c["one_adapter"]["output_tok_s"] / c["nolora"]["output_tok_s"], 3)
    report["cache_stats"] = cache.stats()
    report["mem_peak_engine_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    report["mem_reserved_peak_engine_GiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    save()
    engine.close()
    del engine, cache, rec
    gc.collect()
    torch.cuda.empty_cache()

    if not args.skip_hf:
        try:
            hf_bench(report, save, tmp, rng, args)
        except Exception:
            report["notes"].append(f"hf failed: {traceback.format_exc(limit=6)}")
            traceback.print_exc()
            save()
    try:
        if not args.skip_latency:
            load_latency(report, save, tmp, mcfg)
    except Exception:
        report["notes"].append(f"load latency failed: {traceback.format_exc(limit=6)}")
        traceback.print_exc()
        save()

    # summary table (also in the JSON)
    print("\nconfig          requests adapters dist     tok/s   step ms  floor ms  step/floor  batch")
    for label, r in report["configs"].items():
        print(f"{label:15} {r['requests']:8d} {r['adapters']:8d} {r['distribution']:8} {r['output_tok_s']:8.1f} "
              f"{r['decode_step_ms']!s:>8} {r['decode_floor_ms']!s:>9} {r['step_over_floor']!s:>10}  {r['decode_batch']}")
    for k in ("one_adapter_over_nolora", "hf_peft", "load_latency", "mem_peak_engine_GiB"):
        if k in report:
            print(k, json.dumps(report[k]))
    save()
    print(f"wrote {out_path} in {report['elapsed_s']} s")
    return 0


def hf_bench(report, save, tmp: Path, rng, args):
    """transformers + PEFT on the same workload as `peft_workload` (64 requests over 16 adapters)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in LLAMA3_8B.items() if k not in ("architectures", "model_type", "torch_dtype")}
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            hf = LlamaForCausalLM(LlamaConfig(**cfg))
    finally:
        torch.set_default_dtype(prev)
    hf = hf.to(torch.bfloat16).eval()
    lcfg = LoraConfig(r=16, lora_alpha=32, target_modules=list(ALL_MODULES), task_type="CAUSAL_LM")
    pm = get_peft_model(hf, lcfg, adapter_name="p0")
    for i in range(1, 16):
        pm.add_adapter(f"p{i}", lcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.02)
    pm.eval()
    n_req = 64
    names = [f"p{i}" for i in rng.integers(0, 16, size=n_req)]
    ids = torch.tensor(rng.integers(10, 128000, size=(n_req, args.prompt)), device="cuda")
    mask = torch.ones_like(ids)

    def gen(k, n_new):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = pm.generate(input_ids=ids[:k], attention_mask=mask[:k], max_new_tokens=n_new, min_new_tokens=n_new,
                              do_sample=False, pad_token_id=0, adapter_names=names[:k])
        torch.cuda.synchronize()
        assert out.shape[1] - ids.shape[1] == n_new
        return time.perf_counter() - t

    gen(8, 4)  # warm-up
    t16 = gen(n_req, 16)
    n_new = args.output if t16 * args.output / 16 < 90 else 32
    wall = gen(n_req, n_new)
    r = dict(requests=n_req, adapters=16, output_tokens_per_request=n_new, wall_s=round(wall, 2),
             output_tok_s=round(n_req * n_new / wall, 1), t16_s=round(t16, 2),
             mem_peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    ours = report["configs"].get("peft_workload")
    if ours:
        r["engine_tok_s"] = ours["output_tok_s"]
        r["ratio"] = round(ours["output_tok_s"] / r["output_tok_s"], 2)
    report["hf_peft"] = r
    save()
    print(f"transformers+PEFT: {r}", flush=True)
    # real PEFT-format adapters for the disk -> GPU latency
    adir = tmp / "adapters"
    pm.save_pretrained(adir, selected_adapters=[f"p{i}" for i in range(12)])
    del pm, hf
    gc.collect()
    torch.cuda.empty_cache()


def load_latency(report, save, tmp: Path, mcfg):
    """cache.load latency, synchronous cache (no loader-thread polling): disk -> GPU on first load, host ->
    GPU on reloads after eviction from a 4-slot pool. Times: wall of cache.load (includes waiting for the
    copy's event) and the engine's own event-timed copy."""
    adir = tmp / "adapters"
    folders = sorted(p.parent for p in adir.rglob("adapter_model.safetensors"))
    if not folders:
        raise RuntimeError(f"no adapters saved under {adir}")
    cache = AdapterCache(mcfg, num_slots=4, max_rank=16, device="cuda", dtype=torch.bfloat16,
                         host_bytes=4 << 30, background=False)
    names = []
    for i, f in enumerate(folders):
        cache.register(f"d{i}", f)
        names.append(f"d{i}")
    res = {"disk_to_gpu_ms": [], "host_to_gpu_ms": [], "disk_to_host_event_ms": [], "h2d_event_ms": []}
    for phase in ("disk_to_gpu_ms", "host_to_gpu_ms"):
        for name in names:
            before = (cache.disk_to_host.ms, cache.host_to_device.ms)
            t = time.perf_counter()
            cache.load(name)
            res[phase].append((time.perf_counter() - t) * 1e3)
            if phase == "disk_to_gpu_ms":
                res["disk_to_host_event_ms"].append(cache.disk_to_host.ms - before[0])
            else:
                res["h2d_event_ms"].append(cache.host_to_device.ms - before[1])
    summary = {k: {"n": len(v), "p50": round(percentile(v, 50), 2), "p99": round(percentile(v, 99), 2),
                   "max": round(max(v), 2)} for k, v in res.items() if v}
    summary["note"] = ("disk = page-cache-warm safetensors written by PEFT just before; p99 of n samples is "
                       "near the max")
    summary["stats"] = cache.stats()
    cache.close()
    report["load_latency"] = summary
    save()
    print(f"load latency: {json.dumps({k: v for k, v in summary.items() if k != 'stats'})}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
