"""Adapter load latency (issue 6): disk -> device and host -> device through AdapterCache, no model.

Builds an AdapterCache for a model shape (no weights), writes N real PEFT-format adapters with
`save_peft_adapter` (bf16, random, rank R on all seven projections) to a temporary folder, then times
`cache.load(name)` (synchronous cache: no loader-thread polling in the numbers):

    disk -> device   first load of each adapter (page-cache-warm file: read, verify, convert, pin, copy)
    host -> device   reload after eviction from a 2-slot pool (the adapter is still in the host tier)

plus a breakdown of the disk -> host part (read, hash check, convert/pack/pin; from the cache's
`disk_to_host_detail` counters when the cache has them) and the device copy (the cache's own
host_to_device ms: event-timed on CUDA, wall on CPU).

    python benchmarks/adapter_load.py --device cpu --shape 8b --rank 16 --repeats 8
    python benchmarks/adapter_load.py --device cuda --shape 8b --rank 16 --repeats 20   # on the GPU host
Writes benchmarks/out/adapter_load.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.adapters.cache import AdapterCache  # noqa: E402
from engine.adapters.peft_format import ALL_MODULES, module_shapes  # noqa: E402
from engine.adapters.peft_io import save_peft_adapter  # noqa: E402
from engine.config import ModelConfig  # noqa: E402

# HF config.json fields of the shapes measured (weights are never built)
SHAPES = {
    "8b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
               intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
               tie_word_embeddings=False, torch_dtype="bfloat16"),
    "smollm2": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
                    intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                    tie_word_embeddings=True, torch_dtype="bfloat16"),
}


def write_adapters(root: Path, mcfg, n: int, rank: int) -> list[Path]:
    """N PEFT adapters with random bf16 A/B on every projection and layer (distinct seeds)."""
    shapes = module_shapes(mcfg)
    folders = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for m in ALL_MODULES:
            fan_in, fan_out = shapes[m]
            for layer in range(mcfg.num_hidden_layers):
                a = (torch.randn(rank, fan_in, generator=g) * 0.02).to(torch.bfloat16)
                b = (torch.randn(fan_out, rank, generator=g) * 0.02).to(torch.bfloat16)
                tensors[(m, layer)] = (a, b)
        folders.append(save_peft_adapter(root / f"a{i}", tensors, rank=rank, alpha=2.0 * rank,
                                         target_modules=ALL_MODULES))
    return folders


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def detail(cache) -> dict[str, float]:
    """The cache's cumulative disk -> host breakdown (ms), if this version of the cache records one."""
    d = getattr(cache, "disk_to_host_detail", None)
    return {} if d is None else {k: float(v) for k, v in vars(d).items() if k.endswith("_ms")}


def measure(cache, names: list[str], device: torch.device) -> dict[str, list[float]]:
    res: dict[str, list[float]] = {"disk_to_device_ms": [], "host_to_device_ms": [], "disk_to_host_ms": [],
                                   "device_copy_ms": []}
    for phase in ("disk_to_device_ms", "host_to_device_ms"):
        for name in names:
            sync(device)
            before_d, before_h, before_detail = cache.disk_to_host.ms, cache.host_to_device.ms, detail(cache)
            t = time.perf_counter()
            cache.load(name)
            res[phase].append((time.perf_counter() - t) * 1e3)
            res["device_copy_ms"].append(cache.host_to_device.ms - before_h)
            if phase == "disk_to_device_ms":
                res["disk_to_host_ms"].append(cache.disk_to_host.ms - before_d)
                for k, v in detail(cache).items():
                    res.setdefault(f"disk_{k}", []).append(v - before_detail.get(k, 0.0))
    return res


def check_slot(cache, name: str, folder: Path) -> None:
    """The slot holding `name` equals the file's A/B in the pool dtype, padding ranks zero."""
    from safetensors.torch import load_file

    from engine.adapters.peft_io import peft_key

    ref = load_file(str(folder / "adapter_model.safetensors"))
    slot = cache.request(name)
    assert slot is not None, f"{name} is not resident"
    try:
        pool = cache.pool
        for m in pool.target_modules:
            for layer in range(pool.num_layers):
                a = ref[peft_key(m, layer, "A")].to(pool.device, pool.dtype)
                b = ref[peft_key(m, layer, "B")].to(pool.device, pool.dtype)
                r = a.shape[0]
                got_a, got_b = pool.lora_a[m][layer][slot], pool.lora_b[m][layer][slot]
                ok = (torch.equal(got_a[:r], a) and torch.equal(got_b[:, :r], b)
                      and not got_a[r:].any() and not got_b[:, r:].any())
                assert ok, f"slot {slot} ({name}) differs from the file at {m} layer {layer}"
        assert int(pool.rank[slot]) == r
    finally:
        cache.release(slot)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--shape", default="8b", choices=tuple(SHAPES))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=8, help="number of adapters (each loaded from disk once, "
                                                          "then from host once)")
    p.add_argument("--warmup", type=int, default=1, help="extra adapters loaded first and not counted (the "
                   "first load also pays one-time costs: CUDA kernels, threads)")
    p.add_argument("--slots", type=int, default=2, help="pool size; < repeats so every reload is a miss")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); 1 keeps "
                   "a shared, loaded CPU from stalling parallel copies on thread wake-ups")
    p.add_argument("--pinned-reserve-mb", type=int, default=-1, help="CUDA: AdapterCache(pinned_reserve_bytes=) "
                   "in MB (-1: the cache's default)")
    p.add_argument("--tmp", default=None, help="folder for the adapters (default: a fresh temp folder)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "adapter_load.json"))
    args = p.parse_args()
    if args.slots >= args.repeats:
        p.error("--slots must be smaller than --repeats so that host -> device reloads miss the pool")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mcfg = ModelConfig.from_dict(SHAPES[args.shape], source=args.shape)

    tmp = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="adapter-load-"))
    t = time.perf_counter()
    folders = write_adapters(tmp, mcfg, args.repeats + args.warmup, args.rank)
    write_s = time.perf_counter() - t
    file_bytes = (folders[0] / "adapter_model.safetensors").stat().st_size
    elt = torch.empty((), dtype=dtype).element_size()
    host_bytes = 2 * args.repeats * file_bytes * max(1, elt // 2) + (64 << 20)
    kw = {} if args.pinned_reserve_mb < 0 else {"pinned_reserve_bytes": args.pinned_reserve_mb << 20}
    t = time.perf_counter()
    cache = AdapterCache(mcfg, num_slots=args.slots, max_rank=args.rank, device=device, dtype=dtype,
                         host_bytes=host_bytes, max_adapter_bytes=2 * file_bytes, background=False, **kw)
    build_ms = (time.perf_counter() - t) * 1e3
    try:
        t = time.perf_counter()
        names = []
        for i, f in enumerate(folders):
            cache.register(f"a{i}", f)
            names.append(f"a{i}")
        register_ms = (time.perf_counter() - t) * 1e3 / len(names)
        for name in names[:args.warmup]:
            cache.load(name)
        names, folders = names[args.warmup:], folders[args.warmup:]
        res = measure(cache, names, device)
        check_slot(cache, names[-1], folders[-1])  # the last reload: its slot must hold the file's weights
        stats = cache.stats()
    finally:
        cache.close()
        if not args.tmp:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = {k: {"n": len(v), "p50": round(percentile(v, 50), 2), "p99": round(percentile(v, 99), 2),
                   "max": round(max(v), 2)} for k, v in res.items() if v}
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "shape": args.shape, "rank": args.rank, "pool_dtype": str(dtype),
        "adapters": args.repeats, "warmup": args.warmup, "slots": args.slots,
        "torch_threads": torch.get_num_threads(), "file_MB": round(file_bytes / 1e6, 1),
        "write_s": round(write_s, 1), "cache_build_ms": round(build_ms, 1),
        "pinned_reserve_mb": args.pinned_reserve_mb, "register_ms_mean": round(register_ms, 1), "latency": summary,
        "stats": stats,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"{report['device']}  shape {args.shape}  rank {args.rank}  pool {dtype}  {args.repeats} adapters of "
          f"{report['file_MB']} MB  (cache built in {build_ms:.0f} ms, register {register_ms:.1f} ms each, "
          f"{torch.get_num_threads()} torch threads)")
    print(f"{'metric':28} {'n':>4} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for k, s in summary.items():
        print(f"{k:28} {s['n']:4d} {s['p50']:9.2f} {s['p99']:9.2f} {s['max']:9.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
