"""4-bit base weights through the engine (EngineConfig.quantization = "q4") on SmolLM2: memory and quality.

SmolLM2 is loaded by LLMEngine once per variant on each device (CPU; CUDA when there is one):
    fp32   the reference (the checkpoint's float32 weights, float32 compute)
    bf16   projection weights rounded to bf16 (CPU: computed in float32, as the CPU path only runs
           float32; CUDA: a bfloat16 engine)
    q4     EngineConfig(quantization="q4"): every projection 4-bit, once per --group-sizes (128: the default;
           SmolLM2's 576 falls back to 96, see engine/layers/quant.py). The cached SmolLM2 was imported from
           a Q4_1 GGUF (groups of 32 along K), so group 32 lands back on its grid almost exactly and larger
           groups re-quantize a 4-bit grid: read the g32 row as the kernels' floor, g128 as the default's cost.
and compared with the fp32 reference on
    - weight memory: bytes of the model's tensors (projections and the rest; CUDA: allocator after load)
    - greedy agreement: a few prompts decoded together through engine.generate, matching tokens
    - logits: teacher-forced over the eval text of benchmarks/kernels_quant.py (this repository's docs),
      per position max|dlogit| / max|logit| (mean and max over positions), KL(ref || variant), top-1 match
    - perplexity on that text
The teacher-forced pass runs the engine's own model (paged attention, LoRALinear, quant matmul) over the
whole text as one prefill, with a KV cache of its own so the engine's cache is left alone.

    python benchmarks/quant_engine.py --threads 1             # table on stdout, JSON in benchmarks/out/
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.kernels_quant import eval_string  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.layers.linear import LoRALinear  # noqa: E402
from engine.layers.quant import projection_bytes  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.training import adapter_step  # noqa: E402

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "To install the package, run"]
BLOCK = 16


@torch.no_grad()
def text_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:  # shape [n - 1, vocab] float32
    model = engine.model
    dev = next(model.parameters()).device
    with adapter_step(model, None, [len(ids)]):  # one prefill over the whole text, base model
        t = torch.tensor(ids, device=dev)
        hidden = model(t, torch.arange(len(ids), device=dev))
        return model.compute_logits(hidden[:-1]).float()


def build(model_dir: str, device: str, variant: str, group_size: int) -> tuple[LLMEngine, dict]:
    """The engine of one variant and its memory figures."""
    cuda = device.startswith("cuda")
    dtype = "float32" if variant == "fp32" or not cuda else "bfloat16"
    cfg = EngineConfig(device=device, dtype=dtype, num_kv_blocks=64, block_size=BLOCK, max_num_seqs=len(PROMPTS),
                       num_lora_slots=1, max_lora_rank=8, cuda_graphs=False,
                       quantization="q4" if variant == "q4" else None, quant_group_size=group_size)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    engine = LLMEngine(model_dir, cfg)
    mem = dict(projection_bytes(engine.model), load_s=round(time.perf_counter() - t0, 2), dtype=dtype)
    if variant == "bf16" and not cuda:
        # the CPU engine computes in float32 only: round the projections' weights to bf16 values instead
        with torch.no_grad():
            for m in engine.model.modules():
                if isinstance(m, LoRALinear):
                    m.weight.copy_(m.weight.bfloat16().float())
        if hasattr(engine.model, "prepare_cpu_decode"):
            engine.model.prepare_cpu_decode()  # its layouts are copies of the weights: make them again
        mem["projection_bytes_if_stored_bf16"] = mem["projection_bytes"] // 2
    if cuda:
        # the engine's allocations after load: weights, the (small, fixed) KV cache and the slot pool
        mem["allocated_bytes"] = torch.cuda.memory_allocated() - base
        mem["load_peak_allocated_bytes"] = torch.cuda.max_memory_allocated() - base
    groups = sorted({m.quant_group_size for m in engine.model.modules() if hasattr(m, "quant_group_size")})
    if groups:
        mem["group_sizes"] = groups
    return engine, mem


def greedy(engine: LLMEngine, max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [o.token_ids for o in engine.generate(PROMPTS, params)]


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict:
    same = [sum(a == b for a, b in zip(r, g)) / len(r) for r, g in zip(ref, got)]
    first = [next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), len(r)) for r, g in zip(ref, got)]
    return dict(token_agreement=round(sum(same) / len(same), 4), identical_prompts=sum(f == len(r) for f, r in
                                                                                       zip(first, ref)),
                first_divergence=first)


def compare(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    rel = (logits - ref_logits).abs().amax(-1) / ref_logits.abs().amax(-1)
    lp, lq = ref_logits.log_softmax(-1), logits.log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return dict(rel_logit_err_mean=float(rel.mean()), rel_logit_err_max=float(rel.max()),
                kl_mean=float(kl.mean()), top1=float((ref_logits.argmax(-1) == logits.argmax(-1)).float().mean()),
                ppl=perplexity(logits, targets))


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(torch.exp(torch.nn.functional.cross_entropy(logits, targets)))


def run_device(model_dir: str, device: str, args) -> dict:
    rows, ref = {}, None
    for variant, group in [("fp32", None), ("bf16", None)] + [("q4", g) for g in args.group_sizes]:
        engine, mem = build(model_dir, device, variant, group or args.group_sizes[0])
        ids = engine.tokenizer.encode(eval_string())[:args.max_tokens]
        targets = torch.tensor(ids[1:], device=engine.model.embed_tokens.weight.device)
        t0 = time.perf_counter()
        logits = text_logits(engine, ids)
        tokens = greedy(engine, args.gen_tokens)
        row = dict(mem, eval_s=round(time.perf_counter() - t0, 2), tokens=len(ids))
        if ref is None:
            ref = dict(logits=logits, tokens=tokens)
            row.update(ppl=perplexity(logits, targets), rel_logit_err_mean=0.0, rel_logit_err_max=0.0, kl_mean=0.0,
                       top1=1.0, token_agreement=1.0, identical_prompts=len(PROMPTS))
        else:
            row.update(compare(ref["logits"], logits, targets), **agreement(ref["tokens"], tokens))
        name = variant if group is None else f"q4 g{group}"
        rows[name] = row
        print(f"  {device} {name}: done ({row['load_s']} s load, {row['eval_s']} s eval)", flush=True)
        engine.close()
        del engine, logits
    return rows


def print_table(device: str, rows: dict) -> None:
    print(f"\nSmolLM2 through the engine on {device} ({rows['fp32']['tokens']} eval tokens, "
          f"{len(PROMPTS)} prompts x greedy tokens); errors against the fp32 reference")
    print(f"{'weights':>8} {'groups':>7} {'proj MB':>8} {'other MB':>8} {'total MB':>8} {'ppl':>8} "
          f"{'rel err mean':>12} {'rel err max':>11} {'KL':>8} {'top1':>6} {'greedy agree':>12} {'same prompts':>12}")
    for name, r in rows.items():
        proj = r.get("projection_bytes_if_stored_bf16", r["projection_bytes"])
        total = proj + r["other_bytes"]
        groups = ",".join(map(str, r.get("group_sizes", []))) or "-"
        print(f"{name:>8} {groups:>7} {proj / 1e6:>8.1f} {r['other_bytes'] / 1e6:>8.1f} {total / 1e6:>8.1f} "
              f"{r['ppl']:>8.3f} {r['rel_logit_err_mean']:>12.5f} {r['rel_logit_err_max']:>11.5f} {r['kl_mean']:>8.5f} "
              f"{r['top1']:>6.3f} {r['token_agreement']:>12.3f} {r['identical_prompts']:>8}/{len(PROMPTS)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(Path.home() / ".cache/openlora/models/smollm2-135m-instruct"))
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped without a GPU")
    ap.add_argument("--max-tokens", type=int, default=1024, help="eval text tokens")
    ap.add_argument("--gen-tokens", type=int, default=32, help="greedy tokens per prompt")
    ap.add_argument("--group-sizes", default="128,32",
                    help="EngineConfig.quant_group_size of each q4 run, comma-separated (the first is the default)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "out" / "quant_engine.json"))
    args = ap.parse_args(argv)
    args.group_sizes = [int(g) for g in args.group_sizes.split(",") if g]
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [d for d in args.devices.split(",") if d and (d != "cuda" or torch.cuda.is_available())]
    report = dict(model=args.model, group_sizes=args.group_sizes, gen_tokens=args.gen_tokens, prompts=PROMPTS,
                  torch=torch.__version__, cpu_threads=torch.get_num_threads(), machine=platform.machine(),
                  devices={})
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    for device in devices:
        report["devices"][device] = run_device(args.model, device, args)
        print_table(device, report["devices"][device])
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
