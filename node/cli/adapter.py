"""`openlora adapter train`: the adapter factory. A Datanet goes in; out come a PEFT LoRA adapter, its
Proof-of-Attribution index, and a training report.

    <out>/                          publishable as is (node/registry.py accepts exactly these files)
        adapter_config.json, adapter_model.safetensors   engine.adapters.peft_io.save_peft_adapter
        attribution_index.safetensors                    attribution.poa.AttributionIndex
        README.md                                        what it was trained on, by whom, how
    <out>.training/                 next to it, not part of the adapter (the store skips it)
        training.json, loss.png

The node wires the two halves (DESIGN.md): the engine trains and computes per-example LoRA gradients
(engine/training.py), the ledger's poa module projects them into sketches and keeps the per-contributor
index. The index (version 2) is built at K checkpoints of the training run (TracIn-CP): K - 1 earlier
adapters, whose weights it carries, and the final, served adapter. A request is sketched at the same
K points (`request_gradients`), so both sides of each cosine live in the same space.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from node.datanet import Datanet, load_datanet
from node.errors import ConfigError, NodeError

INDEX_FILE = "attribution_index.safetensors"
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FactoryError(NodeError):
    """The adapter factory refuses its inputs (output exists, bad settings)."""


@dataclass
class FactoryReport:
    adapter_dir: Path
    report_dir: Path
    losses: list[float]
    train_seconds: float
    index_seconds: float
    contributors: dict[str, int]


def report_dir_for(out_dir: Path) -> Path:
    return out_dir.with_name(out_dir.name + ".training")


def projection_seed(datanet_hash: str) -> int:
    # one fixed projection per Datanet, reproducible by anyone holding the file and the adapter
    return int.from_bytes(hashlib.sha256(b"openlora-poa-projection|" + datanet_hash.encode()).digest()[:8], "big")


def tokenize_datanet(tokenizer, datanet: Datanet, max_len: int):
    from engine.errors import EngineError
    from engine.training import tokenize_chat, tokenize_text

    out = []
    for ex in datanet.examples:
        try:
            if ex.is_chat:
                out.append(tokenize_chat(tokenizer, ex.prompt, ex.response, max_len=max_len, tag=ex.contributor))
            else:
                out.append(tokenize_text(tokenizer, ex.text, max_len=max_len, tag=ex.contributor))
        except EngineError as exc:
            raise FactoryError(f"{datanet.source}:{ex.line}: {exc}") from None
    return out


def checkpoint_adapters(model, index, adapter):
    """The adapters a request's gradients are taken at, one per index checkpoint: the checkpoint's own
    weights where the index carries them, else `adapter` (a LoRAParams of the served adapter)."""
    from engine.training import LoRAParams

    out = []
    for k in range(index.num_checkpoints):
        weights = index.checkpoint_tensors(k)
        out.append(adapter if weights is None else LoRAParams.from_named_tensors(model.config, weights, adapter))
    return out


def request_gradients(model, index, adapter, example, checkpoints=None) -> list[dict]:
    """The request's LoRA gradients at each of the index's checkpoints (one backward pass each), ready
    for attribution.poa.score_request(index, ...). Pass `checkpoints` (checkpoint_adapters' result) to
    reuse the rebuilt adapters across requests."""
    from engine.training import example_gradients

    return [example_gradients(model, a, example) for a in (checkpoints or checkpoint_adapters(model, index, adapter))]


def attribute_request(model, index, adapter, example, checkpoints=None):
    """Contributor shares (bps) of one served request (prompt + generated answer as a TokenizedExample)."""
    from attribution.poa import score_request

    return score_request(index, request_gradients(model, index, adapter, example, checkpoints))


def train_adapter(datanet_path: str | Path, base_dir: str | Path, out_dir: str | Path, cfg, *,
                  base_name: str | None = None, projection_dim: int = 256, max_len: int = 256,
                  force: bool = False, progress=None, index_progress=None,
                  attribution_checkpoints: int = 3) -> FactoryReport:
    """Train an adapter on a Datanet and write it, its attribution index and its report.

    Everything is checked before training starts and written into temporary folders that are renamed
    into place at the end, so a refusal or a crash leaves `out_dir` as it was."""
    import torch

    from attribution.poa import AttributionIndex, Projection, project_gradients
    from engine.adapters.peft_io import save_peft_adapter
    from engine.loader import load_model
    from engine.tokenizer import Tokenizer
    from engine.training import batch_example_gradients, checkpoint_steps, train_lora

    out_dir, base_dir = Path(out_dir), Path(base_dir)
    report_dir = report_dir_for(out_dir)
    for path in (out_dir, report_dir):
        if path.exists() and not force:
            raise FactoryError(f"{path} already exists; choose another --out or pass --force to replace it")
    cfg.validate()
    datanet = load_datanet(datanet_path)
    projection = Projection(seed=projection_seed(datanet.content_hash), dim=projection_dim)
    tokenizer = Tokenizer(base_dir)
    examples = tokenize_datanet(tokenizer, datanet, max_len)
    model = load_model(base_dir)
    model.requires_grad_(False)  # only the adapter learns

    if isinstance(attribution_checkpoints, bool) or not isinstance(attribution_checkpoints, int) \
            or attribution_checkpoints < 1:
        raise FactoryError(f"attribution checkpoints must be a positive integer, got {attribution_checkpoints!r}")
    attribution_checkpoints = min(attribution_checkpoints, cfg.steps)  # a run of 2 steps has 2 checkpoints
    result = train_lora(model, examples, cfg, progress=progress,
                        checkpoint_at=checkpoint_steps(cfg.steps, attribution_checkpoints))

    # TracIn-CP: every example's gradient at every checkpoint; the last checkpoint is the served adapter
    from engine.training import LoRAParams

    started = time.perf_counter()
    cks = result.checkpoints
    adapters = [LoRAParams.from_named_tensors(model.config, c.tensors, result.lora) for c in cks[:-1]] + [result.lora]
    sketches = [[None] * len(cks) for _ in examples]
    done, total, batch = 0, len(examples) * len(cks), 4
    for k, lora in enumerate(adapters):
        for i in range(0, len(examples), batch):
            for j, grads in enumerate(batch_example_gradients(model, lora, examples[i:i + batch])):
                sketches[i + j][k] = project_gradients(grads, projection)
            done += len(examples[i:i + batch])
            if index_progress is not None:
                index_progress(done, total)
    index = AttributionIndex(projection=projection, param_shapes={n: list(t.shape) for n, t in cks[-1].tensors.items()},
                             checkpoint_lrs=[c.lr for c in cks], checkpoint_steps=[c.step for c in cks],
                             checkpoint_weights=[c.tensors for c in cks[:-1]] + [None])
    for ex, sk in zip(examples, sketches):
        index.add(ex.tag, torch.stack(sk))
    index_seconds = time.perf_counter() - started

    tmp_out = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    tmp_report = out_dir.with_name(f".{report_dir.name}.tmp-{os.getpid()}")
    try:
        for t in (tmp_out, tmp_report):
            shutil.rmtree(t, ignore_errors=True)
            t.mkdir(parents=True)
        save_peft_adapter(tmp_out, result.lora.peft_tensors(), cfg.rank, float(cfg.alpha), cfg.target_modules,
                          base_model=base_name or str(base_dir))
        index.save(tmp_out / INDEX_FILE)
        counts = datanet.counts()
        summary = {
            "datanet": str(datanet_path), "datanet_hash": datanet.content_hash, "base_model": base_name or str(base_dir),
            "examples": len(examples), "labelled_tokens_seen": result.tokens,
            "contributors": counts, **{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "losses": result.losses, "train_seconds": round(result.seconds, 2),
            "index_seconds": round(index_seconds, 2), "projection": {"seed": projection.seed, "dim": projection.dim,
                                                                     "nnz": projection.nnz},
            "attribution_checkpoints": [{"step": c.step, "lr": c.lr} for c in cks],
            "torch_threads": torch.get_num_threads(),
        }
        (tmp_report / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp_out / "README.md").write_text(_model_card(summary))
        save_loss_curve(result.losses, tmp_report / "loss.png", title=f"{Path(datanet_path).name} (rank {cfg.rank})")
        for tmp, final in ((tmp_out, out_dir), (tmp_report, report_dir)):
            if final.exists():
                shutil.rmtree(final)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp_out, ignore_errors=True)
        shutil.rmtree(tmp_report, ignore_errors=True)
    return FactoryReport(out_dir, report_dir, result.losses, result.seconds, index_seconds, datanet.counts())


def _model_card(s: dict) -> str:
    rows = "\n".join(f"| `{addr}` | {n} |" for addr, n in s["contributors"].items())
    return (f"# LoRA adapter trained on a Datanet\n\n"
            f"- base model: `{s['base_model']}`\n- Datanet: `{Path(s['datanet']).name}`, content hash "
            f"`{s['datanet_hash']}`\n- rank {s['rank']}, alpha {s['alpha']}, targets {', '.join(s['target_modules'])}\n"
            f"- {s['steps']} steps, batch {s['batch_size']}, lr {s['lr']}; loss {s['losses'][0]:.3f} -> "
            f"{s['losses'][-1]:.3f}\n\n"
            f"`{INDEX_FILE}` is the Proof-of-Attribution index (attribution/poa.py, version 2): per training "
            f"checkpoint and contributor, the sum of unit-normalised random projections of their examples' "
            f"LoRA gradients, and the earlier checkpoints' LoRA weights.\n\n"
            f"| contributor | examples |\n| --- | --- |\n{rows}\n")


def save_loss_curve(losses: list[float], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = range(1, len(losses) + 1)
    ax.plot(steps, losses, lw=1, alpha=0.5, label="batch loss")
    k = max(1, len(losses) // 20)
    if k > 1:  # a moving average makes the trend readable through batch-to-batch noise
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(steps, smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (answer tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapter", help="train LoRA adapters on Datanets",
                       description="The adapter factory: train a LoRA adapter on a Datanet.")
    asub = p.add_subparsers(dest="adapter_command", metavar="ACTION")
    asub.required = True
    t = asub.add_parser("train", help="train a LoRA adapter and its attribution index on a Datanet",
                        description="Train a PEFT LoRA adapter on a Datanet (JSONL) with the engine's model, "
                                    "and write its Proof-of-Attribution index.")
    t.add_argument("--datanet", required=True, type=Path, metavar="FILE", help="Datanet JSONL file")
    t.add_argument("--base", metavar="MODEL", help="base model: name in the cache or HF-format directory "
                                                   "(default: the configured model)")
    t.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    t.add_argument("--alpha", type=float, help="lora_alpha (default 2 * rank)")
    t.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    t.add_argument("--batch-size", type=int, default=4, help="examples per step (default 4)")
    t.add_argument("--targets", default=",".join(ALL_TARGETS),
                   help="comma-separated target modules (default: all seven projections)")
    t.add_argument("--out", type=Path, metavar="DIR",
                   help="adapter folder (default: <adapter store>/<datanet name>-r<rank>)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--max-len", type=int, default=256, help="tokens per example, longer ones are cut")
    t.add_argument("--projection-dim", type=int, default=256, help="sketch dimension of the attribution index")
    t.add_argument("--attribution-checkpoints", type=int, default=3, metavar="K",
                   help="training checkpoints the attribution index is built at (TracIn-CP; default 3). Each "
                        "costs one gradient pass per example at build time and one backward pass per request")
    t.add_argument("--force", action="store_true", help="replace an existing output folder")
    t.set_defaults(func=_train)


def _train(args, settings) -> int:
    from tqdm import tqdm

    from engine.training import TrainConfig
    from node import models

    targets = tuple(m.strip() for m in args.targets.split(",") if m.strip())
    bad = [m for m in targets if m not in ALL_TARGETS]
    if bad or not targets:
        raise ConfigError(f"--targets: unknown module(s) {', '.join(bad) or '(none given)'}; "
                          f"choose from {', '.join(ALL_TARGETS)}")
    if args.max_len < 8:
        raise ConfigError("--max-len must be at least 8")
    base = args.base or settings.model
    base_dir = models.resolve(base, settings.models_dir)
    out = args.out or settings.resolved_adapter_dir / f"{args.datanet.stem}-r{args.rank}"
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha if args.alpha is not None else 2.0 * args.rank,
                      target_modules=targets, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    cfg.validate()

    bar = tqdm(total=cfg.steps, desc="training", unit="step", file=sys.stderr)
    ibar = None

    def progress(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    def index_progress(done: int, total: int) -> None:
        nonlocal ibar
        if ibar is None:
            bar.close()
            ibar = tqdm(total=total, desc="attribution index", unit="example", file=sys.stderr)
        ibar.update(1)

    try:
        report = train_adapter(args.datanet, base_dir, out, cfg, base_name=base, projection_dim=args.projection_dim,
                               max_len=args.max_len, force=args.force, progress=progress, index_progress=index_progress,
                               attribution_checkpoints=args.attribution_checkpoints)
    finally:
        bar.close()
        if ibar is not None:
            ibar.close()
    print(f"adapter:           {report.adapter_dir}")
    print(f"attribution index: {report.adapter_dir / INDEX_FILE} "
          f"({len(report.contributors)} contributors: "
          + ", ".join(f"{a} x{n}" for a, n in report.contributors.items()) + ")")
    print(f"attribution:       TracIn over {min(args.attribution_checkpoints, cfg.steps)} training checkpoints "
          f"(one backward pass per checkpoint per scored request)")
    print(f"loss:              {report.losses[0]:.3f} -> {report.losses[-1]:.3f} "
          f"(mean of last 10: {sum(report.losses[-10:]) / len(report.losses[-10:]):.3f})")
    print(f"time:              training {report.train_seconds:.0f}s, index {report.index_seconds:.0f}s")
    print(f"report:            {report.report_dir / 'training.json'}, {report.report_dir / 'loss.png'}")
    return 0
