"""Proof of Attribution for Datanet contributors: random-projected LoRA gradients ("sketches"),
a per-contributor index of them, and scoring a request against it into shares.

Method (a first-order influence estimate in the spirit of TracIn, Pruthi et al. 2020, made cheap by a
Johnson-Lindenstrauss random projection as in TRAK, Park et al. 2023):
1. The engine computes, for a training example or a served request, the gradient of its loss with
   respect to the adapter's LoRA parameters (plain tensors, one per parameter name).
2. `project_gradients` maps that gradient to d dimensions (a few hundred) with a fixed sparse random
   projection R (each element lands in `nnz` buckets with random signs, scaled 1/sqrt(nnz)), which keeps
   inner products and cosines approximately intact. R is never materialized: each parameter is consumed
   in chunks and each chunk's buckets and signs are regenerated from (seed, parameter name, chunk index)
   with SHAKE-256, an extendable-output hash, so every machine and library version gets the same bits.
3. The index keeps, per contributor, the sum of their examples' unit-normalized sketches and the count.
4. A request is scored by cosine similarity of its sketch with each contributor's mean sketch: a positive
   cosine means a gradient step on that contributor's data would also have lowered this request's loss.
   Only positive scores earn; they become integer basis points summing to 10000 (shares.scores_to_bps).

Cost per request: one backward pass through the LoRA parameters (the engine's), plus the projection:
P x nnz hashed 16-bit words and scatter-adds for P LoRA parameters (P = 1M, nnz = 4: 8 MB of SHAKE-256
and 4M adds, measured in tests/attribution/test_poa.py), off the hot path.
Scoring itself is C x d (C contributors). Limits: first-order and single-checkpoint (it measures
alignment with the final adapter's gradients, not the training trajectory); contributors with similar
data split credit between them; cosine ignores how many examples a contributor gave (the count is kept
so a caller can weight by it); the estimate is only as good as the loss the engine differentiates
(e.g. the log-likelihood of the generated answer).
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
INDEX_VERSION = 1
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
    """Per-contributor sums of unit-normalized sketches and counts for one adapter (one file)."""

    projection: Projection
    param_shapes: dict[str, list[int]]
    adapter_id: int | None = None
    datanet_id: int | None = None
    contributors: list[str] = field(default_factory=list)
    sums: torch.Tensor | None = None  # [C, dim] float64 while building, float32 on disk
    counts: torch.Tensor | None = None  # [C] int64

    def add(self, contributor: str, sketch: torch.Tensor) -> None:
        """Add one example's sketch for `contributor` (zero gradients carry no direction and are skipped)."""
        address = normalize_address(contributor, "contributor")
        v = self._check(sketch).to(torch.float64)
        norm = v.norm()
        if norm == 0:
            return
        if address not in self.contributors:
            self.contributors.append(address)
            row = torch.zeros(1, self.projection.dim, dtype=torch.float64)
            self.sums = row if self.sums is None else torch.cat([self.sums.to(torch.float64), row])
            self.counts = torch.zeros(1, dtype=torch.int64) if self.counts is None else torch.cat([self.counts, torch.zeros(1, dtype=torch.int64)])
        i = self.contributors.index(address)
        self.sums = self.sums.to(torch.float64)
        self.sums[i] += v / norm
        self.counts[i] += 1

    def means(self) -> torch.Tensor:
        if not self.contributors:
            raise IndexFormatError("attribution index has no contributors")
        return self.sums.to(torch.float64) / self.counts.clamp(min=1).to(torch.float64)[:, None]

    def scores(self, sketch: torch.Tensor) -> list[tuple[str, float]]:
        """Cosine of the request's sketch with each contributor's mean sketch, in index order."""
        v = self._check(sketch).to(torch.float64)
        means = self.means()
        denom = means.norm(dim=1) * v.norm()
        cos = torch.where(denom > 0, means @ v / denom.clamp(min=1e-300), torch.zeros_like(denom))
        return [(a, float(c)) for a, c in zip(self.contributors, cos.tolist())]

    def shares(self, sketch: torch.Tensor) -> list[ContributorShare]:
        """Contributor shares in bps (summing to 10000, positive influence only; [] if none is positive)."""
        return scores_to_bps(self.scores(sketch))

    def _check(self, sketch: torch.Tensor) -> torch.Tensor:
        if not isinstance(sketch, torch.Tensor) or tuple(sketch.shape) != (self.projection.dim,):
            raise InvalidInput(f"sketch must be a tensor of shape [{self.projection.dim}]")
        if not torch.isfinite(sketch).all():
            raise InvalidInput("sketch has non-finite values")
        return sketch

    # -- file format: one safetensors file; tensors `sums` [C, dim] f32 and `counts` [C] i64; the
    # header metadata holds "format", "version" and "index" (JSON: projection, contributors, shapes).

    def save(self, path: str | Path) -> Path:
        if not self.contributors:
            raise IndexFormatError("refusing to save an empty attribution index")
        path = Path(path)
        meta = {"projection": {"kind": PROJECTION_KIND, "seed": self.projection.seed, "dim": self.projection.dim,
                               "nnz": self.projection.nnz, "chunk_rows": self.projection.chunk_rows},
                "contributors": self.contributors, "param_shapes": self.param_shapes,
                "adapter_id": self.adapter_id, "datanet_id": self.datanet_id, "sketch_normalization": "unit"}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"sums": self.sums.to(torch.float32).contiguous(), "counts": self.counts.contiguous()}, str(path),
                  metadata={"format": INDEX_FORMAT, "version": str(INDEX_VERSION),
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
        if header.get("version") != str(INDEX_VERSION):
            raise IndexFormatError(f"{path}: index version {header.get('version')} is not supported (want {INDEX_VERSION})")
        try:
            meta = json.loads(header["index"])
            p = meta["projection"]
            if p["kind"] != PROJECTION_KIND:
                raise IndexFormatError(f"{path}: unknown projection {p['kind']!r}")
            projection = Projection(seed=int(p["seed"]), dim=int(p["dim"]), nnz=int(p["nnz"]), chunk_rows=int(p["chunk_rows"]))
            index = cls(projection=projection, param_shapes={k: list(v) for k, v in meta["param_shapes"].items()},
                        adapter_id=meta.get("adapter_id"), datanet_id=meta.get("datanet_id"),
                        contributors=list(meta["contributors"]), sums=tensors["sums"], counts=tensors["counts"])
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise IndexFormatError(f"{path}: malformed attribution index header: {exc}") from None
        c = len(index.contributors)
        if tuple(index.sums.shape) != (c, projection.dim) or tuple(index.counts.shape) != (c,):
            raise IndexFormatError(f"{path}: tensor shapes do not match {c} contributors x dim {projection.dim}")
        return index

    def check_gradients(self, named_grads: Mapping[str, torch.Tensor]) -> None:
        """The request's gradients must cover the same LoRA parameters the index was built from."""
        got = {k: list(v.shape) for k, v in named_grads.items()}
        if got != self.param_shapes:
            raise InvalidInput("gradients do not match the parameters this attribution index was built from")


def build_index(examples: Sequence[tuple[str, Mapping[str, torch.Tensor]]], projection: Projection, *,
                adapter_id: int | None = None, datanet_id: int | None = None) -> AttributionIndex:
    """Index from (contributor address, per-example named LoRA gradients) pairs."""
    if not examples:
        raise InvalidInput("no examples to index")
    shapes = {k: list(v.shape) for k, v in examples[0][1].items()}
    index = AttributionIndex(projection=projection, param_shapes=shapes, adapter_id=adapter_id, datanet_id=datanet_id)
    for contributor, grads in examples:
        index.check_gradients(grads)
        index.add(contributor, project_gradients(grads, projection))
    return index


def score_request(index: AttributionIndex, named_grads: Mapping[str, torch.Tensor]) -> list[ContributorShare]:
    """What the per-request worker calls: gradients of the request -> contributor shares."""
    index.check_gradients(named_grads)
    return index.shares(project_gradients(named_grads, index.projection))
