"""CPU throughput of our engine against transformers (+ PEFT) generate, on SmolLM2, fp32.

Two workloads, greedy, a fixed number of new tokens per request (EOS ignored on both sides):
  single   one request, base model
  mixed    8 concurrent requests over 3 PEFT adapters (ranks 8/16/16, different target modules),
           against two transformers + PEFT baselines:
             sequential  one generate() per request, adapter switched with set_adapter (how a plain
                         transformers server answers concurrent requests)
             batched     one left-padded generate() with PEFT's mixed-adapter `adapter_names` (the
                         strongest transformers baseline; it needs all requests up front)
Each side is warmed up, then timed `--repeats` times interleaved with the other; the best run counts
(the CPU is shared, the best run is the least disturbed). Tokens/s counts generated tokens only.

The floor: in the same run, the base-weight matmuls of one decode step (every layer's qkv, o, gate_up and
down, and the lm_head) are timed alone at 1 and 8 tokens, best of several, both as F.linear on the model's
weights (what transformers runs), through the engine's own projections (its CPU decode layouts, native
where it builds), and as oneDNN's packed matmul and the native kernel (kernels/native_cpu.py) alone. No engine decodes faster than the fastest of
them (a tighter kernel would lower it); `best_reachable_ratio` is that floor's tokens/s over
the baseline's, the ratio an engine with zero overhead would reach. The cost of influence statistics is timed
on and off, interleaved, `--repeats` each.

    .venv/bin/python benchmarks/cpu_engine.py [--tokens 64] [--repeats 3] [--threads N] [--native on|off]
Writes benchmarks/out/cpu_engine.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "out" / "cpu_engine.json"
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
             "List three primary colors.", "What is 12 times 7?", "Give me a tip for learning Python.",
             "Why is the sky blue?", "Name a famous painter."]
ADAPTERS = {"qv8": (8, ["q_proj", "v_proj"]), "mlp16": (16, ["gate_proj", "up_proj", "down_proj"]),
            "all16": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])}


def make_adapters(model_dir: Path, root: Path) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = {}
    for i, (name, (r, targets)) in enumerate(ADAPTERS.items()):
        pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        pm.save_pretrained(root / name)
        base = pm.unload()
        out[name] = root / name
    return out


def gemm_floor(model, batch: int, repeats: int = 7) -> dict:
    """Seconds of one decode step's base-weight matmuls at `batch` tokens, best of `repeats`."""
    import torch.nn.functional as F

    projs = [p for layer in model.layers for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                    layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    lm_head = model.embed_tokens.weight if model.lm_head is None else model.lm_head
    # row-major, as transformers holds them (the engine may have turned some column-major on CPU)
    weights = [p.weight.detach().contiguous() for p in projs] + [lm_head.detach().contiguous()]
    xs = [torch.randn(batch, w.shape[1]) for w in weights]
    h = xs[-1]

    def flinear():
        for x, w in zip(xs, weights):
            F.linear(x, w)

    def engine_layouts():  # no context set: the projections run their base matmul only
        for x, p in zip(xs, projs):
            p(x)
        model.compute_logits(h)

    from kernels import native_cpu

    packed = [p.cpu_decode.native for p in projs if p.cpu_decode is not None and p.cpu_decode.native is not None]
    head = model.cpu_decode_lm_head.native if model.cpu_decode_lm_head is not None else None
    has_native = len(packed) == len(projs) and head is not None and batch <= native_cpu.MAX_GEMM_TOKENS

    def native():  # the native kernel alone, no module around it
        for x, pw in zip(xs, packed + [head]):
            native_cpu.gemm(x, pw)

    # oneDNN's packed weights alone (the layout decode steps read before the native kernels)
    dnn = [p.cpu_decode.packed for p in projs if p.cpu_decode is not None and p.cpu_decode.packed is not None]
    dnn_head = model.cpu_decode_lm_head.packed if model.cpu_decode_lm_head is not None else None
    has_dnn = len(dnn) == len(projs) and dnn_head is not None

    def onednn():
        for x, w in zip(xs, dnn + [dnn_head]):
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    with torch.inference_mode():
        t_lin, t_eng, t_nat, t_dnn = [], [], [], []
        for _ in range(repeats):  # interleaved, like the workloads
            t_lin.append(best(flinear, 1))
            t_eng.append(best(engine_layouts, 1))
            if has_native:
                t_nat.append(best(native, 1))
            if has_dnn:
                t_dnn.append(best(onednn, 1))
    t = min(min(t_lin), min(t_eng), min(t_nat, default=float("inf")), min(t_dnn, default=float("inf")))

    def ms(ts):
        return round(1e3 * min(ts), 2) if ts else None

    return {"flinear_ms": ms(t_lin), "engine_layouts_ms": ms(t_eng), "onednn_packed_ms": ms(t_dnn),
            "native_ms": ms(t_nat), "floor_tok_s": round(batch / t, 2)}


def layout_bytes(model) -> dict:
    """Bytes of the model's parameters and of the extra CPU decode layouts it holds (oneDNN-packed, column-major
    and native panel-packed copies of the projections and the lm_head)."""
    layouts = [m.cpu_decode for m in model.modules() if getattr(m, "cpu_decode", None) is not None]
    layouts += [model.cpu_decode_lm_head] if model.cpu_decode_lm_head is not None else []
    extra = sum(t.numel() * t.element_size() for lay in layouts
                for t in (lay.single, lay.packed, None if lay.native is None else lay.native.data) if t is not None)
    return {"weights_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6),
            "extra_layouts_mb": round(extra / 1e6)}


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF-format model directory (default: the cached SmolLM2)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--native", choices=["on", "off"], default="on",
                    help="the engine's native CPU kernels (EngineConfig.cpu_native_kernels); off: its torch paths")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.sampling_params import SamplingParams

    if args.model:
        model_dir = Path(args.model)
    else:
        from node import models
        from node.config import load_settings

        settings = load_settings()
        model_dir = models.resolve(settings.model, settings.models_dir)
    n_new = args.tokens
    tmp = tempfile.TemporaryDirectory(prefix="openlora-bench-")
    print(f"making {len(ADAPTERS)} PEFT adapters ...", flush=True)
    adapters = make_adapters(model_dir, Path(tmp.name))
    names = [list(ADAPTERS)[i % len(ADAPTERS)] for i in range(len(QUESTIONS))]

    engine = LLMEngine(model_dir, EngineConfig(num_kv_blocks=256, num_lora_slots=4, max_lora_rank=16,
                                               max_num_seqs=16, cpu_native_kernels=args.native == "on"))
    native_layers = engine.model.native_decoder is not None
    memory = layout_bytes(engine.model)
    print(f"native CPU kernels: {'on' if native_layers else 'off'}; weights {memory['weights_mb']} MB, "
          f"extra decode layouts {memory['extra_layouts_mb']} MB", flush=True)
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0.0, max_tokens=n_new, ignore_eos=True)

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    items = list(adapters.items())
    peft = PeftModel.from_pretrained(hf, items[0][1], adapter_name=items[0][0])
    for name, path in items[1:]:
        peft.load_adapter(path, adapter_name=name)
    peft.eval()

    def ours_single():
        out = engine.generate([prompts[0]], params)[0]
        assert len(out.token_ids) == n_new

    def hf_single():
        ids = torch.tensor([prompts[0]])
        with torch.no_grad(), peft.disable_adapter():
            out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                min_new_tokens=n_new, do_sample=False, pad_token_id=0)
        assert out.shape[1] - ids.shape[1] == n_new

    def ours_mixed():
        outs = engine.generate(prompts, params, adapters=names)
        assert all(len(o.token_ids) == n_new for o in outs)

    width = max(len(p) for p in prompts)
    batch = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def hf_sequential():
        with torch.no_grad():
            for prompt, name in zip(prompts, names):
                peft.set_adapter(name)
                ids = torch.tensor([prompt])
                out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                    min_new_tokens=n_new, do_sample=False, pad_token_id=0)
                assert out.shape[1] - ids.shape[1] == n_new

    def hf_batched():
        with torch.no_grad():
            out = peft.generate(input_ids=batch, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                do_sample=False, pad_token_id=0, adapter_names=names)
        assert out.shape[1] - width == n_new

    print("warming up ...", flush=True)
    for fn in (ours_single, hf_single, ours_mixed, hf_batched):
        fn()
    results = {}
    for label, ours, theirs, count in (("single", ours_single, hf_single, n_new),
                                       ("mixed_8x3_vs_sequential", ours_mixed, hf_sequential, n_new * len(prompts)),
                                       ("mixed_8x3_vs_batched", ours_mixed, hf_batched, n_new * len(prompts))):
        t_ours, t_hf = [], []
        for _ in range(args.repeats):  # interleaved, so a disturbance hits both sides alike
            t_ours.append(best(ours, 1))
            t_hf.append(best(theirs, 1))
        ours_tps, hf_tps = count / min(t_ours), count / min(t_hf)
        results[label] = {"tokens": count, "engine_tok_s": round(ours_tps, 2), "transformers_tok_s": round(hf_tps, 2),
                          "ratio": round(ours_tps / hf_tps, 3), "engine_s": [round(t, 3) for t in t_ours],
                          "transformers_s": [round(t, 3) for t in t_hf]}
        print(f"{label}: engine {ours_tps:.1f} tok/s, transformers {hf_tps:.1f} tok/s", flush=True)

    # the GEMM floor, measured on this machine in this run
    floors = {n: gemm_floor(engine.model, n) for n in (1, len(prompts))}
    results["gemm_floor"] = {f"batch{n}": f for n, f in floors.items()}
    for label, n in (("single", 1), ("mixed_8x3_vs_sequential", len(prompts)),
                     ("mixed_8x3_vs_batched", len(prompts))):
        r = results[label]
        r["floor_tok_s"] = floors[n]["floor_tok_s"]
        r["best_reachable_ratio"] = round(floors[n]["floor_tok_s"] / r["transformers_tok_s"], 3)
    for n, f in floors.items():
        extra = "".join(f", {label} {f[key]:.1f} ms" for label, key in (("oneDNN packed", "onednn_packed_ms"),
                                                                          ("native kernel", "native_ms"))
                        if f[key] is not None)
        print(f"GEMM floor at {n} token(s): F.linear {f['flinear_ms']:.1f} ms, engine projections "
              f"{f['engine_layouts_ms']:.1f} ms{extra} -> at most {f['floor_tok_s']:.1f} tok/s", flush=True)

    # influence statistics are on by default; what leaving them on costs on the mixed batch, both sides timed
    # here, interleaved, the same number of times (best of each)
    t_on, t_off = [], []
    for _ in range(args.repeats):
        for collect, times in ((True, t_on), (False, t_off)):
            engine.runner.collect_influence = collect
            times.append(best(ours_mixed, 1))
    engine.runner.collect_influence = True
    results["influence_overhead"] = {"engine_s_without": round(min(t_off), 3),
                                     "engine_s_with": round(min(t_on), 3),
                                     "overhead": round(min(t_on) / min(t_off) - 1.0, 3),
                                     "runs_without": [round(t, 3) for t in t_off],
                                     "runs_with": [round(t, 3) for t in t_on]}

    print(f"\n{'workload':26} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>7} {'floor tok/s':>12} "
          f"{'best reachable':>15}")
    for label, r in results.items():
        if "ratio" not in r:
            continue
        print(f"{label:26} {r['engine_tok_s']:>13.1f} {r['transformers_tok_s']:>19.1f} {r['ratio']:>6.2f}x "
              f"{r['floor_tok_s']:>12.1f} {r['best_reachable_ratio']:>14.2f}x")
    print(f"influence statistics cost {100 * results['influence_overhead']['overhead']:.1f}% on the mixed batch")
    report = {"model": str(model_dir), "new_tokens_per_request": n_new, "threads": args.threads,
              "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
              "repeats": args.repeats, "native_kernels": native_layers, "memory": memory,
              "results": results,
              # ratio targets, each against the baseline it names; the sequential baseline is context only
              "targets": {"single": 1.0, "mixed_8x3_vs_batched": 3.0},
              "targets_met": {"single": results["single"]["ratio"] >= 1.0,
                              "mixed_8x3_vs_batched": results["mixed_8x3_vs_batched"]["ratio"] >= 3.0},
              "info_only": ["mixed_8x3_vs_sequential"]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {OUT}")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
