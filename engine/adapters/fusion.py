"""Runtime fusion: one synthetic slot standing for a weighted mix of adapters.

- `linear` is exact and never touches base weights: the slot's A stacks the members' A rows and its B
  stacks the columns w_i * scale_i * B_i, with slot scale 1, so
      B_cat @ A_cat = sum_i w_i * scale_i * B_i @ A_i.
  Its rank is the sum of the members' ranks (per module); a mix above max_rank is refused.
- `ties` (Yadav et al. 2023, TIES-Merging) and `dare` (Yu et al. 2023, DARE, linear variant) work on
  full deltas W_i = scale_i * B_i @ A_i per module and layer with PEFT's arithmetic
  (peft.utils.merge_utils.ties / dare_linear), then factorize the merged delta by SVD to
  rank <= max_rank: B = U sqrt(S), A = sqrt(S) Vh (balanced, so neither factor is tiny in bf16).
  DARE's random drops come from generators seeded by (mix seed, member hash, module, layer), so a mix
  gives the same slot on every node; the mix seed is derived from the mix unless given.
A mix is cached like an adapter under `mix_key`, a hash of its members' content hashes, weights,
strategy and parameters (members sorted, so order does not matter).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from engine.adapters.peft_format import ALL_MODULES, AdapterSpec, AdapterWeights
from engine.errors import AdapterError, AdapterNotFound

STRATEGIES = ("linear", "ties", "dare")


@dataclass(frozen=True)
class FusedMix:
    """members: ((adapter name, weight), ...). density: fraction kept by ties (by magnitude) or dare
    (at random), in (0, 1]; ignored by linear. seed: dare's seed (derived from the mix when None).
    rank: SVD rank for ties/dare (max_rank when None)."""

    members: tuple[tuple[str, float], ...]
    strategy: str = "linear"
    density: float = 1.0
    seed: int | None = None
    rank: int | None = None

    def __post_init__(self) -> None:
        try:
            members = tuple((str(n), float(w)) for n, w in self.members)
        except (TypeError, ValueError):
            raise AdapterError(f"mix members must be (name, weight) pairs, got {self.members!r}") from None
        object.__setattr__(self, "members", members)


@dataclass(frozen=True)
class ResolvedMix:
    key: str
    spec: AdapterSpec
    members: tuple[tuple[AdapterSpec, float], ...]  # canonical order
    strategy: str
    density: float
    seed: int
    rank: int


@dataclass
class FusionReport:
    """Relative Frobenius error of the rank truncation, per (module, layer): ||M - B A|| / ||M||."""

    strategy: str
    rank: int
    errors: dict[tuple[str, int], float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def _hash_int(*parts) -> int:
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") & ((1 << 63) - 1)


def resolve_mix(mix: FusedMix, specs: dict[str, AdapterSpec], max_rank: int,
                shapes: dict[str, tuple[int, int]], num_layers: int, elt_bytes: int) -> ResolvedMix:
    """Check a mix against the registered adapters and compute its key and spec (no weights read)."""
    if not isinstance(mix, FusedMix):
        raise AdapterError(f"not a FusedMix: {mix!r}")
    if mix.strategy not in STRATEGIES:
        raise AdapterError(f"unknown fusion strategy {mix.strategy!r}; use one of {', '.join(STRATEGIES)}")
    if not mix.members:
        raise AdapterError("a mix needs at least one member")
    names = [n for n, _ in mix.members]
    if len(set(names)) != len(names):
        raise AdapterError(f"a mix names an adapter twice: {names}")
    for n, w in mix.members:
        if n not in specs:
            raise AdapterNotFound(f"no adapter named {n!r}")
        if not math.isfinite(w):
            raise AdapterError(f"mix weight for {n!r} must be finite, got {w}")
    if mix.strategy != "linear" and not (0.0 < mix.density <= 1.0):
        raise AdapterError(f"density must be in (0, 1], got {mix.density}")
    members = tuple(sorted(((specs[n], w) for n, w in mix.members), key=lambda sw: (sw[0].content_hash, sw[1])))
    targets = tuple(m for m in ALL_MODULES if any(m in s.target_modules for s, _ in members))

    if mix.strategy == "linear":
        per_module = {m: sum(s.rank_of(m) for s, _ in members) for m in targets}
        rank = max(per_module.values())
        if rank > max_rank:
            worst = max(per_module, key=per_module.get)
            raise AdapterError(
                f"linear mix has rank {rank} on {worst} (sum of member ranks), over max_rank {max_rank}; "
                "use strategy 'ties' or 'dare' (factorized to max_rank) or fewer/smaller members")
        density, seed, target = 1.0, 0, rank
        nbytes = sum(per_module[m] * sum(shapes[m]) * num_layers * elt_bytes for m in targets)
    else:
        target = max_rank if mix.rank is None else mix.rank
        if isinstance(target, bool) or not isinstance(target, int) or not 1 <= target <= max_rank:
            raise AdapterError(f"mix rank must be an integer in 1..{max_rank}, got {mix.rank!r}")
        density = float(mix.density)
        rank = max(min(target, *shapes[m]) for m in targets)
        nbytes = sum(min(target, *shapes[m]) * sum(shapes[m]) * num_layers * elt_bytes for m in targets)
        seed = 0
        if mix.strategy == "dare":
            seed = mix.seed if mix.seed is not None else _hash_int(
                "dare", density, *[f"{s.content_hash}={w!r}" for s, w in members])
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise AdapterError(f"seed must be an integer, got {mix.seed!r}")
    canon = {
        "v": 1, "strategy": mix.strategy,
        "members": [[s.content_hash, w] for s, w in members],
        "density": density if mix.strategy != "linear" else None,
        "seed": seed if mix.strategy == "dare" else None,
        "rank": target if mix.strategy != "linear" else None,
    }
    key = hashlib.sha256(b"openlora-mix-v1\n" + json.dumps(canon, sort_keys=True).encode()).hexdigest()
    bases = {s.base_model for s, _ in members}
    spec = AdapterSpec(
        name=f"mix-{key[:16]}", path=None, content_hash=key, rank=rank, alpha=float(rank), use_rslora=False,
        scale=1.0, target_modules=targets, nbytes=nbytes, base_model=bases.pop() if len(bases) == 1 else None,
        module_ranks=tuple((m, (sum(s.rank_of(m) for s, _ in members) if mix.strategy == "linear"
                                else min(target, *shapes[m]))) for m in targets),
    )
    return ResolvedMix(key, spec, members, mix.strategy, density, seed, target)


def fuse_linear(key: str, members: list[tuple[AdapterWeights, float]], dtype: torch.dtype) -> AdapterWeights:
    """Concatenate members along the rank: exact, no SVD, slot scale 1."""
    out: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    locs = sorted({loc for w, _ in members for loc in w.tensors})
    for loc in locs:
        parts = [(w.tensors[loc], weight * w.scale) for w, weight in members if loc in w.tensors]
        a = torch.cat([ab[0].to(torch.float32) for ab, _ in parts], dim=0)
        b = torch.cat([ab[1].to(torch.float32) * c for ab, c in parts], dim=1)
        out[loc] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    rank = max(a.shape[0] for a, _ in out.values())
    return AdapterWeights(content_hash=key, rank=rank, scale=1.0, tensors=out)


def member_generator(seed: int, member_hash: str, module: str, layer: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(_hash_int(seed, member_hash, module, layer))
    return g


def merged_delta(strategy: str, deltas: list[torch.Tensor], weights: list[float], density: float,
                 generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Merge full deltas [out, in] (fp32) with PEFT's ties / dare_linear arithmetic."""
    w = torch.tensor(weights, dtype=deltas[0].dtype, device=deltas[0].device).view(-1, 1, 1)
    if strategy == "ties":
        pruned = []
        for d in deltas:
            k = int(density * d.numel())
            mask = torch.zeros(d.numel(), dtype=d.dtype, device=d.device)
            if k > 0:
                mask[d.abs().reshape(-1).topk(k).indices] = 1.0
            pruned.append(d * mask.view_as(d))
        stacked = torch.stack(pruned)
        elected = torch.sign(stacked.sum(dim=0))  # sign of the total mass per entry
        agree = stacked.sign() == elected
        weighted = stacked * w
        kept = (weighted * agree).sum(dim=0)
        return kept / agree.sum(dim=0).clamp(min=1).to(kept.dtype)
    if strategy == "dare":
        assert generators is not None
        dropped = []
        for d, g in zip(deltas, generators):
            keep = torch.rand(d.shape, generator=g, device=d.device, dtype=torch.float32) < density
            dropped.append(d * keep / density)
        return (torch.stack(dropped) * w).sum(dim=0)
    raise AdapterError(f"no full-delta merge for strategy {strategy!r}")


def factorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-`rank` factors (Eckart-Young) B [out, r], A [r, in] and the relative truncation error."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    total = float(s.square().sum())
    err = math.sqrt(float(s[r:].square().sum()) / total) if total > 0 else 0.0
    return u[:, :r] * root, root[:, None] * vh[:r], err


def fuse_merge(resolved: ResolvedMix, members: list[tuple[AdapterWeights, float]], dtype: torch.dtype,
               compute_device: torch.device) -> tuple[AdapterWeights, FusionReport]:
    """ties / dare: merge full deltas per (module, layer), then SVD back to the mix's rank."""
    report = FusionReport(resolved.strategy, resolved.rank)
    out = {}
    locs = sorted({loc for w, _ in members for loc in w.tensors})
    for loc in locs:
        module, layer = loc
        present = [(w, weight) for w, weight in members if loc in w.tensors]
        deltas = []
        for w, _ in present:
            a, b = w.tensors[loc]
            deltas.append(w.scale * (b.to(compute_device, torch.float32) @ a.to(compute_device, torch.float32)))
        gens = None
        if resolved.strategy == "dare":
            gens = [member_generator(resolved.seed, w.content_hash, module, layer, compute_device) for w, _ in present]
        merged = merged_delta(resolved.strategy, deltas, [weight for _, weight in present], resolved.density, gens)
        b, a, err = factorize(merged, resolved.rank)
        report.errors[loc] = err
        out[loc] = (a.to("cpu", dtype).contiguous(), b.to("cpu", dtype).contiguous())
    rank = max(a.shape[0] for a, _ in out.values())
    return AdapterWeights(content_hash=resolved.key, rank=rank, scale=1.0, tensors=out), report
