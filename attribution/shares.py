"""Exact integer apportionment: split an integer total by integer weights with deterministic remainders.

Every split in the ledger (money by revenue split, money by contributor shares, influence scores into
basis points) goes through `apportion`, so all of them share one rounding rule: each part gets the floor
of its exact share; the units left over go one each to the parts with the largest fractional remainders,
ties to the earlier part in the order given (callers order parts by a stable key such as an address).
The parts therefore always sum to the total, are never negative, and depend only on the input.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from attribution.errors import InvalidInput

BPS = 10_000
K = TypeVar("K", bound=Hashable)


def apportion(total: int, weights: Sequence[tuple[K, int]]) -> list[tuple[K, int]]:
    """Split `total` by `weights` ([(key, weight)], weights >= 0); returns [(key, part)] in the same order."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 0:
        raise InvalidInput(f"total to split must be a non-negative integer, got {total!r}")
    for key, w in weights:
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise InvalidInput(f"weight of {key!r} must be a non-negative integer, got {w!r}")
    weight_sum = sum(w for _, w in weights)
    if weight_sum == 0:
        if total == 0:
            return [(k, 0) for k, _ in weights]
        raise InvalidInput(f"cannot split {total} by weights that are all zero")
    parts = [total * w // weight_sum for _, w in weights]
    left = total - sum(parts)
    # largest remainder first; among equal remainders the earlier position wins
    order = sorted(range(len(weights)), key=lambda i: (-((total * weights[i][1]) % weight_sum), i))
    for i in order[:left]:
        parts[i] += 1
    return [(weights[i][0], parts[i]) for i in range(len(weights))]


@dataclass(frozen=True)
class ContributorShare:
    """One contributor's influence on one request for one adapter: the raw score and its share in bps."""

    address: str
    score: float
    share_bps: int


def scores_to_bps(scores: Sequence[tuple[str, float]], *, resolution: int = 10**9) -> list[ContributorShare]:
    """Turn raw influence scores into shares in basis points summing to 10000.

    Only positive scores earn (a contributor whose data pushes the answer the other way is not paid
    for it); scores are quantized to integers at `resolution` so the split is exact integer arithmetic.
    Returns [] when no score is positive. Contributors are ordered by address for the remainder rule.
    """
    positive = sorted((a.lower(), float(s)) for a, s in scores if s == s and s > 0)  # s == s drops NaN
    weights = [(a, int(s * resolution)) for a, s in positive]
    weights = [(a, w) for a, w in weights if w > 0]
    if not weights:
        return []
    score_of = dict(positive)
    return [ContributorShare(a, score_of[a], bps) for a, bps in apportion(BPS, weights) if bps > 0]
