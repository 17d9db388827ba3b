"""Proof-of-Attribution accuracy on the real model (SmolLM2-135M-Instruct) and the shipped Datanets.

For each Datanet: train a LoRA adapter through engine/training.py keeping K checkpoints (cached under
benchmarks/out/poa_cache/, so a rerun only scores), sketch every training example's LoRA gradient at
every checkpoint (the index's raw material), sketch each held-out request (tests/attribution/data/
heldout-*.jsonl: new questions in one contributor's topic and voice, answered in that voice) at every
checkpoint, and score several methods from the same sketches:

    final-cos        v1: cosine with the contributors' mean unit sketch at the final adapter only
    first-cos        the same at the first (earliest) checkpoint only
    tracin-raw       sum_k lr_k <request sketch, contributor mean raw sketch>   (TracIn-CP, unnormalised)
    tracin-cos       sum_k lr_k cos(request, contributor mean unit sketch) / sum_k lr_k   (the v2 index)
    tracin-cos-B     tracin-cos on the LoRA B matrices only

A sketch is linear in the gradient and each parameter is projected on its own, so the sketch of all
parameters is the sum of the A-matrix and B-matrix sketches: both are kept and combined per method.
The chosen method (tracin-cos) is also scored through attribution.poa's own v2 index (built, saved,
loaded, scored) so the figure is that of the shipped code path.

    time .venv/bin/python benchmarks/poa_eval.py                # both Datanets
    .venv/bin/python benchmarks/poa_eval.py --datanets pirate-cooking --steps 40 --checkpoints 3

Prints a table and writes benchmarks/out/poa_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OPENLORA_KERNELS", "torch")  # gradients need the reference kernels

import torch  # noqa: E402

from attribution.eip712 import normalize_address  # noqa: E402
from attribution.poa import AttributionIndex, Projection, project_gradients  # noqa: E402
from attribution.shares import scores_to_bps  # noqa: E402

HELDOUT = {"pirate-cooking": "heldout-pirate.jsonl", "formal-astronomy": "heldout-astronomy.jsonl"}
METHODS = ("final-cos", "first-cos", "tracin-raw", "tracin-cos", "tracin-cos-B")


def split_sketch(grads, projection):
    """[2, d]: sketch of the A matrices, sketch of the B matrices."""
    a = {k: v for k, v in grads.items() if ".lora_A." in k}
    b = {k: v for k, v in grads.items() if ".lora_B." in k}
    return torch.stack([project_gradients(a, projection), project_gradients(b, projection)])


def prepare(name: str, args, model, tok, log) -> dict:
    """Train (or load) the adapter with its checkpoints, and sketch train and held-out examples."""
    from engine.training import LoRAParams, TrainConfig, batch_example_gradients, checkpoint_steps, train_lora, \
        tokenize_chat
    from node.cli.adapter import projection_seed, tokenize_datanet
    from node.datanet import load_datanet

    cache = REPO / "benchmarks" / "out" / "poa_cache" / f"{name}-r{args.rank}-s{args.steps}-k{args.checkpoints}-d{args.dim}"
    cache.mkdir(parents=True, exist_ok=True)
    datanet = load_datanet(REPO / "datanets" / f"{name}.jsonl")
    examples = tokenize_datanet(tok, datanet, 256)
    projection = Projection(seed=projection_seed(datanet.content_hash), dim=args.dim)
    cfg = TrainConfig(rank=args.rank, alpha=2.0 * args.rank, steps=args.steps, lr=args.lr, batch_size=4, seed=0)
    timings = {}
    ck_path = cache / "checkpoints.pt"
    if ck_path.exists():
        saved = torch.load(ck_path)
        log(f"[{name}] cached adapter: {ck_path}")
    else:
        t = time.perf_counter()
        res = train_lora(model, examples, cfg, checkpoint_at=checkpoint_steps(cfg.steps, args.checkpoints),
                         progress=lambda s, l: log(f"[{name}] step {s}/{cfg.steps} loss {l:.3f}") if s % 5 == 0 else None)
        saved = {"checkpoints": [(c.step, c.lr, c.tensors) for c in res.checkpoints], "losses": res.losses,
                 "train_seconds": time.perf_counter() - t}
        torch.save(saved, ck_path)
    timings["train_s"] = saved["train_seconds"]
    like = LoRAParams.create(model.config, cfg.rank, cfg.alpha, cfg.target_modules)
    ckpts = [LoRAParams.from_named_tensors(model.config, tensors, like) for _, _, tensors in saved["checkpoints"]]

    held = [json.loads(line) for line in (REPO / "tests" / "attribution" / "data" / HELDOUT[name]).read_text().splitlines()]
    held_ex = [tokenize_chat(tok, h["prompt"], h["response"]) for h in held]
    # sketches are saved after every checkpoint of every set, so an interrupted run resumes
    sk_path = cache / "sketches.pt"
    sk = torch.load(sk_path) if sk_path.exists() else {}
    for what, exs in (("train", examples), ("heldout", held_ex)):
        if what in sk:
            continue
        for k, lora in enumerate(ckpts):
            key = f"{what}:{k}"
            if key in sk:
                continue
            t = time.perf_counter()
            out = torch.zeros(len(exs), 2, args.dim)
            for i in range(0, len(exs), args.batch):
                for j, g in enumerate(batch_example_gradients(model, lora, exs[i:i + args.batch])):
                    out[i + j] = split_sketch(g, projection)
                log(f"[{name}] {what} sketches: checkpoint {k + 1}/{len(ckpts)}, {min(i + args.batch, len(exs))}/{len(exs)}")
            sk[key], sk[key + ":s"] = out, time.perf_counter() - t
            torch.save(sk, sk_path)
        sk[what] = torch.stack([sk[f"{what}:{k}"] for k in range(len(ckpts))], dim=1)  # [N, K, 2, d]
        sk[what + "_s"] = sum(sk[f"{what}:{k}:s"] for k in range(len(ckpts)))
        torch.save(sk, sk_path)
    timings["index_s"] = sk["train_s"]
    timings["request_s"] = sk["heldout_s"] / len(held)
    return {"projection": projection, "lrs": [lr for _, lr, _ in saved["checkpoints"]],
            "steps": [s for s, _, _ in saved["checkpoints"]], "losses": saved["losses"],
            "contributors": [normalize_address(ex.tag) for ex in examples], "train": sk["train"],
            "heldout": sk["heldout"], "intended": [normalize_address(h["contributor"]) for h in held],
            "timings": timings}


def method_scores(method: str, d: dict, req: torch.Tensor) -> list[tuple[str, float]]:
    """req [K, 2, d]: one held-out request's sketches. Returns (contributor, score) in address order."""
    train, lrs = d["train"].double(), torch.tensor(d["lrs"], dtype=torch.float64)
    req = req.double()
    people = sorted(set(d["contributors"]))
    rows = {c: [i for i, a in enumerate(d["contributors"]) if a == c] for c in people}
    parts = [1] if method == "tracin-cos-B" else [0, 1]
    x = train[:, :, parts].sum(2)  # [N, K, d]
    q = req[:, parts].sum(1)  # [K, d]
    ks = {"final-cos": [len(lrs) - 1], "first-cos": [0]}.get(method, list(range(len(lrs))))
    out = []
    for c in people:
        total = 0.0
        for k in ks:
            g = x[rows[c], k]
            if method == "tracin-raw":
                total += float(lrs[k] * (g.mean(0) @ q[k]))
                continue
            unit = g / g.norm(dim=1, keepdim=True).clamp(min=1e-30)
            mean = unit.mean(0)
            cos = float(mean @ q[k] / (mean.norm() * q[k].norm()).clamp(min=1e-30))
            total += cos * (float(lrs[k]) if method.startswith("tracin") else 1.0)
        if method.startswith("tracin-cos"):
            total /= float(lrs.sum())
        out.append((c, total))
    return out


def evaluate(name: str, d: dict) -> dict:
    res = {}
    for method in METHODS + ("tracin-cos (poa v2 index)",):
        correct, share_sum, per = 0, 0.0, []
        if method.endswith("index)"):
            index = build_v2_index(d)
        for i, intended in enumerate(d["intended"]):
            if method.endswith("index)"):
                shares = index.shares_from_sketches([d["heldout"][i, k].sum(0) for k in range(len(d["lrs"]))])
            else:
                raw = method_scores(method, d, d["heldout"][i])
                m = max(abs(s) for _, s in raw) or 1.0
                shares = scores_to_bps([(a, s / m) for a, s in raw])  # scale-free: raw dots can be tiny
            bps = {s.address: s.share_bps for s in shares}
            top = max(bps, key=bps.get) if bps else None
            correct += top == intended
            share_sum += bps.get(intended, 0) / 10_000
            per.append({"intended": intended, "shares_bps": bps})
        n = len(d["intended"])
        res[method] = {"accuracy": correct / n, "correct": correct, "n": n, "mean_share": share_sum / n, "cases": per}
    return res


def build_v2_index(d: dict) -> AttributionIndex:
    index = AttributionIndex(projection=d["projection"], param_shapes={}, checkpoint_lrs=list(d["lrs"]),
                             checkpoint_steps=list(d["steps"]))
    for i, c in enumerate(d["contributors"]):
        index.add_checkpoints(c, [d["train"][i, k].sum(0) for k in range(len(d["lrs"]))])
    return index


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datanets", nargs="+", default=list(HELDOUT), choices=list(HELDOUT))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--checkpoints", type=int, default=3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4, help="examples per gradient pass")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from engine.loader import load_model
    from engine.tokenizer import Tokenizer
    from node import models
    from node.config import DEFAULT_MODEL, load_settings

    def log(msg):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    base = models.pull(DEFAULT_MODEL, load_settings().models_dir)
    model = load_model(base)
    model.requires_grad_(False)
    tok = Tokenizer(base)
    report = {"model": DEFAULT_MODEL, "args": vars(args), "datanets": {}}
    for name in args.datanets:
        d = prepare(name, args, model, tok, log)
        report["datanets"][name] = {"checkpoint_steps": d["steps"], "checkpoint_lrs": d["lrs"],
                                    "loss_first_last": [d["losses"][0], d["losses"][-1]], "timings": d["timings"],
                                    "methods": evaluate(name, d)}
    report["wall_s"] = time.perf_counter() - started
    out = REPO / "benchmarks" / "out" / "poa_eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"PoA on {DEFAULT_MODEL}: right contributor has the largest share (accuracy) / mean share of the right one")
    print(f"{'method':28}" + "".join(f"{n:>28}" for n in args.datanets))
    for method in next(iter(report["datanets"].values()))["methods"]:
        cells = []
        for n in args.datanets:
            m = report["datanets"][n]["methods"][method]
            cells.append(f"{m['correct']:>3}/{m['n']} {m['accuracy']:>4.0%}  share {m['mean_share']:.2f}")
        print(f"{method:28}" + "".join(f"{c:>28}" for c in cells))
    for n in args.datanets:
        r = report["datanets"][n]
        print(f"{n}: checkpoints at steps {r['checkpoint_steps']}, loss {r['loss_first_last'][0]:.2f} -> "
              f"{r['loss_first_last'][1]:.2f}; train {r['timings']['train_s']:.0f}s, index sketches "
              f"{r['timings']['index_s']:.0f}s, per request {r['timings']['request_s']:.1f}s "
              f"({len(r['checkpoint_steps'])} backward passes + projections)")
    print(f"wall time {report['wall_s']:.0f}s; JSON: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
