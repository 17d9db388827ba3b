"""Proof of Attribution for Datanet contributors: random-projected LoRA gradients ("sketches"),
a per-contributor index of them over training checkpoints, and scoring a request into shares.

Method: TracIn over checkpoints (TracIn-CP, Pruthi et al. 2020), made cheap by a Johnson-Lindenstrauss
random projection as in TRAK (Park et al. 2023):
1. The engine computes, for a training example or a served request, the gradient of its loss with
   respect to the adapter's LoRA parameters (plain tensors, one per parameter name), at each of K
   checkpoints of the training run (by default 3: a third of the way, two thirds, and the final,
   served adapter). The earlier checkpoints' LoRA weights are stored in the index file.
2. `project_gradients` maps each gradient to d dimensions (a few hundred) with a fixed sparse random
   projection R (each element lands in `nnz` buckets with random signs, scaled 1/sqrt(nnz)), which keeps
   inner products and cosines approximately intact. R is never materialized: each parameter is consumed
   in chunks and each chunk's buckets and signs are regenerated from (seed, parameter name, chunk index)
   with SHAKE-256, an extendable-output hash, so every machine and library version gets the same bits.
3. The index keeps, per checkpoint and contributor, the sum of their examples' unit-normalized sketches
   (normalizing stops a few high-loss examples from dominating a contributor's direction), and the count.
4. A request is scored per contributor c by sum_k lr_k cos(request_k, mean_k(c)) / sum_k lr_k, lr_k the
   learning rate at checkpoint k: positive means gradient steps on c's data along the trajectory also
   lowered this request's loss. Only positive scores earn; they become integer basis points summing to
   10000 (shares.scores_to_bps). With K = 1 this is exactly the version-1 cosine at the final adapter.

Why checkpoints: at the final checkpoint of an adapter that fits its Datanet, per-example gradients are
near zero and mostly noise, and a request answered the way the adapter learned has near-zero loss too;
earlier checkpoints still carry each contributor's direction (benchmarks/poa_eval.py measures both).

Cost per request: K backward passes through the LoRA parameters (the engine's), plus K projections of
P x nnz hashed 16-bit words and scatter-adds for P LoRA parameters, off the hot path; scoring is K x C x d.
Limits: first order; contributors with similar data split credit between them; cosine ignores how many
examples a contributor gave (the count is kept so a caller can weight by it); the estimate is only as
good as the loss the engine differentiates (e.g. the log-likelihood of the generated answer).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from attribution.eip712 import normalize_address
from attribution.errors import IndexFormatError, InvalidInput
from attribution.shares import ContributorShare, scores_to_bps

INDEX_FORMAT = "openlora-poa-index"
INDEX_VERSION = 2
SUPPORTED_VERSIONS = ("1", "2")  # version 1: one checkpoint (the final adapter), no weights in the file
PROJECTION_KIND = "sparse-jl-shake256"


@dataclass(frozen=True)
class Projection:
    """A deterministic sparse random projection R: [P, dim] (a sparse Johnson-Lindenstrauss transform,
    Kane & Nelson 2014): each parameter element is added to `nnz` buckets with random signs, scaled by
    1/sqrt(nnz). Inner products are preserved in expectation with the same O(1/sqrt(dim)) error as a dense
    Gaussian projection, at nnz instead of dim operations per element, so sketching a 1M-parameter
    adapter costs milliseconds. Bucket and sign of (parameter, element, copy) come from SHAKE-256 of
    (seed, dim, parameter name, chunk index): 16 bits per copy, low bits the bucket, top bit the sign."""

    seed: int
    dim: int = 256
    nnz: int = 4
    chunk_rows: int = 65_536  # parameter elements hashed at a time (bounded memory)

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**64:
            raise InvalidInput(f"projection seed must be a uint64, got {self.seed}")
        if self.dim not in {2**k for k in range(4, 13)}:
            raise InvalidInput(f"projection dim must be a power of two in [16, 4096], got {self.dim}")
        if not 1 <= self.nnz <= 16 or self.chunk_rows <= 0:
            raise InvalidInput("nnz must be in [1, 16] and chunk_rows positive")

    def hashes(self, name: str, index: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Buckets [rows, nnz] (int64) and signed weights [rows, nnz] (float32) of one chunk."""
        xof = hashlib.shake_256(f"{PROJECTION_KIND}|{self.seed}|{self.dim}|{self.nnz}|{name}|{index}".encode())
        # little-endian 16-bit words read as int16: the top bit (the sign bit) is negative
        raw = torch.from_numpy(np.frombuffer(bytearray(xof.digest(rows * self.nnz * 2)), dtype="<i2").reshape(rows, self.nnz))
        buckets = raw.bitwise_and(self.dim - 1).to(torch.int64)
        w = 1.0 / math.sqrt(self.nnz)
        weights = torch.where(raw < 0, -w, w).to(torch.float32)
        return buckets, weights

    def dense_block(self, name: str, index: int, rows: int) -> torch.Tensor:
        """The same chunk of R materialized [rows, dim] (for tests and for reading the method)."""
        buckets, weights = self.hashes(name, index, rows)
        block = torch.zeros(rows, self.dim)
        block.scatter_add_(1, buckets, weights)
        return block


def project_gradients(named_grads: Mapping[str, torch.Tensor], projection: Projection) -> torch.Tensor:
    """Sketch of a gradient: sum over parameters of flatten(grad) @ R[name], shape [dim], float32.

    Parameters are visited in sorted name order and each is projected independently, so a sketch
    depends only on (seed, dim, nnz, names, values): the index builder and the per-request worker agree."""
    if not named_grads:
        raise InvalidInput("no gradients to project")
    out = torch.zeros(projection.dim, dtype=torch.float64)
    for name in sorted(named_grads):
        g = named_grads[name]
        if not isinstance(g, torch.Tensor):
            raise InvalidInput(f"gradient {name!r} is not a tensor")
        flat = g.detach().to("cpu", torch.float32).reshape(-1)
        if not torch.isfinite(flat).all():
            raise InvalidInput(f"gradient {name!r} has non-finite values")
        for i, start in enumerate(range(0, flat.numel(), projection.chunk_rows)):
            piece = flat[start:start + projection.chunk_rows]
            buckets, weights = projection.hashes(name, i, piece.numel())
            out += torch.bincount(buckets.reshape(-1), weights=(piece[:, None] * weights).reshape(-1).to(torch.float64),
                                  minlength=projection.dim)
    return out.to(torch.float32)


@dataclass
class AttributionIndex:
    """Per checkpoint and contributor, the sum of unit-normalized sketches, and per contributor the count.

    Version 2 (TracIn over checkpoints): `sums` is [K, C, dim] for K training checkpoints with learning
    rates `checkpoint_lrs`; a request is sketched at the same K checkpoints (their LoRA weights travel in
    the file, `checkpoint_tensors(k)`) and scored by sum_k lr_k cos(request_k, mean_k(c)) / sum_k lr_k.
    A version-1 file loads as K = 1 at the served adapter (lr 1, no checkpoint weights). With K = 1
    every single-sketch call (add, scores, shares) works as in version 1."""

    projection: Projection
    param_shapes: dict[str, list[int]]
    adapter_id: int | None = None
    datanet_id: int | None = None
    contributors: list[str] = field(default_factory=list)
    sums: torch.Tensor | None = None  # [K, C, dim] float64 while building, float32 on disk
    counts: torch.Tensor | None = None  # [C] int64
    checkpoint_lrs: list[float] = field(default_factory=lambda: [1.0])
    checkpoint_steps: list[int] | None = None  # training steps of the checkpoints (informational)
    # per checkpoint, PEFT key -> LoRA weight (A [r, in], B [out, r]); None: the served adapter itself
    checkpoint_weights: list[dict[str, torch.Tensor] | None] | None = None
    version: int = INDEX_VERSION

    def __post_init__(self) -> None:
        lrs = [float(x) for x in self.checkpoint_lrs]
        if not lrs or not all(math.isfinite(x) and x > 0 for x in lrs):
            raise InvalidInput(f"checkpoint learning rates must be positive numbers, got {self.checkpoint_lrs}")
        self.checkpoint_lrs = lrs
        if self.checkpoint_weights is None:
            self.checkpoint_weights = [None] * len(lrs)
        if len(self.checkpoint_weights) != len(lrs):
            raise InvalidInput("one set of checkpoint weights (or None) per checkpoint learning rate")
        if self.sums is not None and self.sums.dim() == 2:  # a v1-shaped [C, dim] sum: one checkpoint
            self.sums = self.sums[None]

    @property
    def num_checkpoints(self) -> int:
        return len(self.checkpoint_lrs)

    def checkpoint_tensors(self, k: int) -> dict[str, torch.Tensor] | None:
        """The LoRA weights request gradients must be taken at for checkpoint k (None: the adapter's own)."""
        return self.checkpoint_weights[k]

    def _as_checkpoints(self, sketch) -> torch.Tensor:
        """A sketch [dim] (K = 1), [K, dim], or a sequence of K [dim] sketches -> checked [K, dim] float64."""
        if isinstance(sketch, torch.Tensor) and sketch.dim() == 1:
            if self.num_checkpoints != 1:
                raise InvalidInput(f"this index has {self.num_checkpoints} checkpoints: give one sketch per "
                                   "checkpoint (a [K, dim] tensor or a list)")
            sketch = sketch[None]
        elif not isinstance(sketch, torch.Tensor):
            sketch = torch.stack([self._check(s) for s in sketch]) if len(sketch) else torch.zeros(0)
        if tuple(sketch.shape) != (self.num_checkpoints, self.projection.dim):
            raise InvalidInput(f"sketches must have shape [{self.num_checkpoints}, {self.projection.dim}], "
                               f"got {list(sketch.shape)}")
        if not torch.isfinite(sketch).all():
            raise InvalidInput("sketch has non-finite values")
        return sketch.to(torch.float64)

    def add(self, contributor: str, sketch) -> None:
        """Add one example's sketch(es) for `contributor`: [dim] for a one-checkpoint index, else one
        per checkpoint. Each is unit-normalized before it is summed (zero ones carry no direction and
        add nothing); an example whose sketches are all zero is skipped."""
        address = normalize_address(contributor, "contributor")
        v = self._as_checkpoints(sketch)
        norms = v.norm(dim=1, keepdim=True)
        if bool((norms == 0).all()):
            return
        unit = torch.where(norms > 0, v / norms.clamp(min=1e-300), torch.zeros_like(v))
        if address not in self.contributors:
            self.contributors.append(address)
            col = torch.zeros(self.num_checkpoints, 1, self.projection.dim, dtype=torch.float64)
            self.sums = col if self.sums is None else torch.cat([self.sums.to(torch.float64), col], dim=1)
            zero = torch.zeros(1, dtype=torch.int64)
            self.counts = zero if self.counts is None else torch.cat([self.counts, zero])
        i = self.contributors.index(address)
        self.sums = self.sums.to(torch.float64)
        self.sums[:, i] += unit
        self.counts[i] += 1

    add_checkpoints = add  # the name for the multi-checkpoint form

    def means(self) -> torch.Tensor:
        """Mean unit sketch per contributor: [C, dim] for one checkpoint, else [K, C, dim]."""
        if not self.contributors:
            raise IndexFormatError("attribution index has no contributors")
        m = self.sums.to(torch.float64) / self.counts.clamp(min=1).to(torch.float64)[None, :, None]
        return m[0] if self.num_checkpoints == 1 else m

    def checkpoint_cosines(self, sketch) -> torch.Tensor:
        """[K, C]: cosine of the request's sketch at each checkpoint with each contributor's mean there."""
        v = self._as_checkpoints(sketch)
        if not self.contributors:
            raise IndexFormatError("attribution index has no contributors")
        means = self.sums.to(torch.float64) / self.counts.clamp(min=1).to(torch.float64)[None, :, None]
        dots = torch.einsum("kcd,kd->kc", means, v)
        denom = means.norm(dim=2) * v.norm(dim=1, keepdim=True)
        return torch.where(denom > 0, dots / denom.clamp(min=1e-300), torch.zeros_like(denom))

    def checkpoint_cosines_at(self, k: int, sketch: torch.Tensor) -> torch.Tensor:
        """[C]: cosines at checkpoint k alone, for a request sketched only there."""
        v = self._check(sketch).to(torch.float64)
        means = self.sums[k].to(torch.float64) / self.counts.clamp(min=1).to(torch.float64)[:, None]
        denom = means.norm(dim=1) * v.norm()
        return torch.where(denom > 0, means @ v / denom.clamp(min=1e-300), torch.zeros_like(denom))

    def scores(self, sketch) -> list[tuple[str, float]]:
        """TracIn over checkpoints: sum_k lr_k cos_k / sum_k lr_k per contributor, in index order (with
        one checkpoint: the cosine of version 1)."""
        lrs = torch.tensor(self.checkpoint_lrs, dtype=torch.float64)
        total = (lrs[:, None] * self.checkpoint_cosines(sketch)).sum(0) / lrs.sum()
        return [(a, float(c)) for a, c in zip(self.contributors, total.tolist())]

    def shares(self, sketch) -> list[ContributorShare]:
        """Contributor shares in bps (summing to 10000, positive influence only; [] if none is positive)."""
        return scores_to_bps(self.scores(sketch))

    shares_from_sketches = shares

    def _check(self, sketch: torch.Tensor) -> torch.Tensor:
        if not isinstance(sketch, torch.Tensor) or tuple(sketch.shape) != (self.projection.dim,):
            raise InvalidInput(f"sketch must be a tensor of shape [{self.projection.dim}]")
        if not torch.isfinite(sketch).all():
            raise InvalidInput("sketch has non-finite values")
        return sketch

    # -- file format (version 2): one safetensors file; tensors `sums` [K, C, dim] f32, `counts` [C] i64
    # and, per checkpoint k with its own weights, `checkpoint.<k>.<PEFT key>` f32; the header metadata
    # holds "format", "version" and "index" (JSON: projection, contributors, shapes, checkpoints).
    # Version 1 files (`sums` [C, dim], no checkpoints) still load, as one checkpoint at the adapter.

    def save(self, path: str | Path) -> Path:
        if not self.contributors:
            raise IndexFormatError("refusing to save an empty attribution index")
        path = Path(path)
        meta = {"projection": {"kind": PROJECTION_KIND, "seed": self.projection.seed, "dim": self.projection.dim,
                               "nnz": self.projection.nnz, "chunk_rows": self.projection.chunk_rows},
                "contributors": self.contributors, "param_shapes": self.param_shapes,
                "adapter_id": self.adapter_id, "datanet_id": self.datanet_id, "sketch_normalization": "unit",
                "scoring": "tracin-cos",
                "checkpoints": [{"lr": lr, "step": (self.checkpoint_steps or [None] * self.num_checkpoints)[k],
                                 "weights": self.checkpoint_weights[k] is not None}
                                for k, lr in enumerate(self.checkpoint_lrs)]}
        tensors = {"sums": self.sums.to(torch.float32).contiguous(), "counts": self.counts.contiguous()}
        for k, weights in enumerate(self.checkpoint_weights):
            for name, t in (weights or {}).items():
                tensors[f"checkpoint.{k}.{name}"] = t.detach().to("cpu", torch.float32).contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata={"format": INDEX_FORMAT, "version": str(INDEX_VERSION),
                                                 "index": json.dumps(meta, sort_keys=True, separators=(",", ":"))})
        return path

    @classmethod
    def load(cls, path: str | Path) -> AttributionIndex:
        path = Path(path)
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise IndexFormatError(f"cannot read attribution index {path}: {exc}") from None
        if header.get("format") != INDEX_FORMAT:
            raise IndexFormatError(f"{path} is not an attribution index (format {header.get('format')!r})")
        version = header.get("version")
        if version not in SUPPORTED_VERSIONS:
            raise IndexFormatError(f"{path}: index version {version} is not supported "
                                   f"(this node reads versions {', '.join(SUPPORTED_VERSIONS)})")
        try:
            meta = json.loads(header["index"])
            p = meta["projection"]
            if p["kind"] != PROJECTION_KIND:
                raise IndexFormatError(f"{path}: unknown projection {p['kind']!r}")
            projection = Projection(seed=int(p["seed"]), dim=int(p["dim"]), nnz=int(p["nnz"]), chunk_rows=int(p["chunk_rows"]))
            sums = tensors["sums"]
            if version == "1":
                lrs, steps, weights = [1.0], None, [None]
                if sums.dim() != 2:
                    raise IndexFormatError(f"{path}: version 1 sums must be [C, dim]")
                sums = sums[None]
            else:
                cks = meta["checkpoints"]
                lrs = [float(c["lr"]) for c in cks]
                steps = [c.get("step") for c in cks]
                weights = []
                for k, c in enumerate(cks):
                    prefix = f"checkpoint.{k}."
                    w = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
                    if bool(c["weights"]) != bool(w):
                        raise IndexFormatError(f"{path}: checkpoint {k} weights do not match the header")
                    weights.append(w or None)
            index = cls(projection=projection, param_shapes={k: list(v) for k, v in meta["param_shapes"].items()},
                        adapter_id=meta.get("adapter_id"), datanet_id=meta.get("datanet_id"),
                        contributors=list(meta["contributors"]), sums=sums, counts=tensors["counts"],
                        checkpoint_lrs=lrs, checkpoint_steps=steps, checkpoint_weights=weights, version=int(version))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError, InvalidInput) as exc:
            raise IndexFormatError(f"{path}: malformed attribution index header: {exc}") from None
        c = len(index.contributors)
        if (tuple(index.sums.shape) != (index.num_checkpoints, c, projection.dim)
                or tuple(index.counts.shape) != (c,)):
            raise IndexFormatError(f"{path}: tensor shapes do not match {index.num_checkpoints} checkpoints x "
                                   f"{c} contributors x dim {projection.dim}")
        for k, w in enumerate(index.checkpoint_weights):
            if w is not None and {n: list(t.shape) for n, t in w.items()} != index.param_shapes:
                raise IndexFormatError(f"{path}: checkpoint {k} weights do not match the indexed LoRA parameters")
        return index

    def check_gradients(self, named_grads: Mapping[str, torch.Tensor]) -> None:
        """The request's gradients must cover the same LoRA parameters the index was built from."""
        got = {k: list(v.shape) for k, v in named_grads.items()}
        if got != self.param_shapes:
            raise InvalidInput("gradients do not match the parameters this attribution index was built from")


def _per_checkpoint(grads) -> list[Mapping[str, torch.Tensor]]:
    return [grads] if isinstance(grads, Mapping) else list(grads)


def build_index(examples: Sequence[tuple[str, Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]]]],
                projection: Projection, *, adapter_id: int | None = None, datanet_id: int | None = None,
                checkpoint_lrs: Sequence[float] | None = None, checkpoint_steps: Sequence[int] | None = None,
                checkpoint_weights: Sequence[Mapping[str, torch.Tensor] | None] | None = None) -> AttributionIndex:
    """Index from (contributor address, gradients) pairs: per example one named-gradient mapping (one
    checkpoint) or a list of them, one per checkpoint (with `checkpoint_lrs`, one per checkpoint)."""
    if not examples:
        raise InvalidInput("no examples to index")
    first = _per_checkpoint(examples[0][1])
    lrs = list(checkpoint_lrs) if checkpoint_lrs is not None else [1.0] * len(first)
    shapes = {k: list(v.shape) for k, v in first[0].items()}
    index = AttributionIndex(projection=projection, param_shapes=shapes, adapter_id=adapter_id, datanet_id=datanet_id,
                             checkpoint_lrs=lrs, checkpoint_steps=list(checkpoint_steps) if checkpoint_steps else None,
                             checkpoint_weights=[dict(w) if w is not None else None for w in checkpoint_weights]
                             if checkpoint_weights is not None else None)
    for contributor, grads in examples:
        per = _per_checkpoint(grads)
        for g in per:
            index.check_gradients(g)
        index.add(contributor, torch.stack([project_gradients(g, projection) for g in per]))
    return index


def score_request(index: AttributionIndex, named_grads) -> list[ContributorShare]:
    """What the per-request worker calls: gradients of the request -> contributor shares.

    `named_grads` is one named-gradient mapping for a one-checkpoint index, else a list of them, the
    request's gradients at each checkpoint in order (index.checkpoint_tensors(k) gives the weights)."""
    per = _per_checkpoint(named_grads)
    for g in per:
        index.check_gradients(g)
    if len(per) == 1 and index.num_checkpoints > 1:
        # a caller that only has the gradient at the served adapter (a version-1 caller): score at the
        # checkpoint that is the served adapter alone. This is the weaker single-checkpoint estimate;
        # node.cli.adapter.request_gradients gives the gradients at every checkpoint.
        served = [k for k, w in enumerate(index.checkpoint_weights) if w is None]
        if not served:
            raise InvalidInput(f"this index has {index.num_checkpoints} checkpoints: give the request's "
                               "gradients at each of them")
        cos = index.checkpoint_cosines_at(served[-1], project_gradients(per[0], index.projection))
        return scores_to_bps(list(zip(index.contributors, cos.tolist())))
    return index.shares(torch.stack([project_gradients(g, index.projection) for g in per]))


def score_checkpoints(index: AttributionIndex, sketches: Sequence[torch.Tensor]) -> list[ContributorShare]:
    """Shares from request sketches already projected, one per checkpoint."""
    return index.shares(list(sketches))
