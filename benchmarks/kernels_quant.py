"""4-bit weight-only quantization: quality on SmolLM2 and speed of the dequantizing matmul.

Quality (CPU or GPU): SmolLM2-135M's decoder linears (q/k/v/o/gate/up/down) are quantized from their bf16
values and dequantized back; perplexity, KL(bf16 || q4) per token, top-1 agreement and the largest logit
change are measured on a fixed text (this repository's docs), against the same model with bf16 weights.
Speed (CUDA only): quant_matmul vs a bf16 torch matmul at Llama-3-8B shapes.

    python benchmarks/kernels_quant.py --model ~/.cache/openlora/models/smollm2-135m-instruct --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kernels import quant  # noqa: E402
from kernels.quant import dequantize, quant_matmul_triton, quantize_linear_weight  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def eval_string() -> str:
    """The fixed evaluation text (this repository's docs); benchmarks/quant_engine.py reads the same."""
    return "\n\n".join(p.read_text() for p in [ROOT / "README.md", ROOT / "docs" / "formats.md",
                                               ROOT / "docs" / "engine-kernels.md"] if p.exists())


def eval_text(tok, max_tokens):
    ids = tok(eval_string(), return_tensors="pt").input_ids[:, :max_tokens]
    return ids


@torch.no_grad()
def quality(model_dir: str, group_sizes, max_tokens: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).to(dev).eval()
    ids = eval_text(tok, max_tokens).to(dev)
    linears = [(n, m) for n, m in model.named_modules() if n.split(".")[-1] in TARGETS]
    # baseline: bf16 weights (computed in float32 so that only the weights differ)
    bf16 = {n: m.weight.data.to(torch.bfloat16) for n, m in linears}
    for n, m in linears:
        m.weight.data.copy_(bf16[n].float())

    def run():
        logits = model(ids).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
        return logits, float(torch.exp(nll))

    base_logits, base_ppl = run()
    base_bytes = sum(w.numel() * 2 for w in bf16.values())
    rows = [dict(weights="bf16", group=None, ppl=base_ppl, kl=0.0, top1=1.0, max_dlogit=0.0, linear_mb=base_bytes / 1e6)]
    for g in group_sizes:
        qbytes = 0
        for n, m in linears:
            qw = quantize_linear_weight(bf16[n], g)
            qbytes += qw.nbytes
            m.weight.data.copy_(dequantize(qw).float())
        logits, ppl = run()
        lp, lq = base_logits.log_softmax(-1), logits.log_softmax(-1)
        kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
        top1 = float((base_logits.argmax(-1) == logits.argmax(-1)).float().mean())
        rows.append(dict(weights="q4", group=g, ppl=ppl, kl=kl, top1=top1,
                         max_dlogit=float((logits - base_logits).abs().max()), linear_mb=qbytes / 1e6))
    return dict(model=model_dir, tokens=int(ids.shape[1]), rows=rows)


PROGRAMS = [256, 1024, 4096]  # quant.TUNING["programs"] swept; the first is the default


def speed():
    import triton

    rows = []
    for N, K in [(4096, 4096), (14336, 4096), (4096, 14336)]:
        w = (torch.randn(N, K, device="cuda") * 0.02).bfloat16()
        qw = quantize_linear_weight(w, 128)
        for M in (1, 32, 256):
            x = torch.randn(M, K, device="cuda").bfloat16()
            t_bf16 = triton.testing.do_bench(lambda: x @ w.T, warmup=25, rep=100, return_mode="median")
            row = dict(M=M, N=N, K=K, bf16_us=t_bf16 * 1e3, bf16_mb=w.numel() * 2 / 1e6, q4_mb=qw.nbytes / 1e6)
            for programs in PROGRAMS:
                quant.TUNING["programs"] = programs
                t_q4 = triton.testing.do_bench(lambda: quant_matmul_triton(x, qw), warmup=25, rep=100,
                                               return_mode="median")
                row[f"q4_p{programs}_us"] = t_q4 * 1e3
            quant.TUNING["programs"] = PROGRAMS[0]
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(Path.home() / ".cache/openlora/models/smollm2-135m-instruct"))
    ap.add_argument("--groups", type=int, nargs="*", default=[192, 64, 32])
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--json", default="kernels_quant.json")
    ap.add_argument("--skip-quality", action="store_true")
    args = ap.parse_args()
    res = {}
    if not args.skip_quality and Path(args.model).exists():
        res["quality"] = quality(args.model, args.groups, args.max_tokens)
        q = res["quality"]
        print(f"SmolLM2 quality ({q['tokens']} tokens of {q['model']})")
        print(f"{'weights':>8} {'group':>6} {'ppl':>8} {'KL':>8} {'top1':>6} {'max dlogit':>10} {'linear MB':>9}")
        for r in q["rows"]:
            print(f"{r['weights']:>8} {str(r['group']):>6} {r['ppl']:>8.3f} {r['kl']:>8.4f} {r['top1']:>6.3f} "
                  f"{r['max_dlogit']:>10.3f} {r['linear_mb']:>9.1f}")
    if torch.cuda.is_available():
        res["device"] = torch.cuda.get_device_name()
        res["speed"] = speed()
        print(f"quant_matmul (group 128) vs bf16 torch matmul on {res['device']}")
        cols = [f"q4_p{p}_us" for p in PROGRAMS]
        print(f"{'M':>4} {'N':>6} {'K':>6} {'bf16 MB':>8} {'q4 MB':>7} {'bf16 us':>8} " + " ".join(f"{c:>13}" for c in cols))
        for r in res["speed"]:
            print(f"{r['M']:>4} {r['N']:>6} {r['K']:>6} {r['bf16_mb']:>8.1f} {r['q4_mb']:>7.1f} {r['bf16_us']:>8.1f} "
                  + " ".join(f"{r[c]:>13.1f}" for c in cols))
    Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
