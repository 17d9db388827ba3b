"""What a request costs and who it pays (integer base units only).

Cost (docs/formats.md): prices are base units per 1,000,000 tokens and
    cost = ceil((input_tokens * price_in + output_tokens * price_out) / 1_000_000).
A fused request (several adapters with weights in bps summing to 10000) is charged the weighted price:
    cost = ceil(sum_a w_a * (input_tokens * in_a + output_tokens * out_a) / (10_000 * 1_000_000)),
which is the formula above when there is one adapter. A request without adapters is charged the
node's base price and pays the operator only.

Split, all with `shares.apportion` (deterministic remainders):
1. the cost between the adapters of the mix, by each adapter's weighted value w_a * (in*in_a + out*out_a);
2. each adapter's part by its registered revenue split into owner / contributors / operator;
3. the contributors' part by the request's contributor shares (positive influence only).
   When the adapter has no Datanet or no contributor has a positive share, the contributors' part goes
   to the adapter owner: the owner trained the adapter, and nobody else can be shown to have earned it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from attribution.db import check_amount
from attribution.errors import InvalidInput
from attribution.shares import BPS, ContributorShare, apportion

PER_TOKENS = 1_000_000
BASE_MODEL = 0  # adapter id used in credits of requests served by the base model alone


@dataclass(frozen=True)
class AdapterTerms:
    """An adapter's registered economics (mirrored from AdapterRegistry)."""

    adapter_id: int
    owner: str
    price_per_m_input: int
    price_per_m_output: int
    owner_bps: int
    contributors_bps: int
    operator_bps: int
    has_datanet: bool = False

    def __post_init__(self) -> None:
        check_amount(self.price_per_m_input, "price_per_m_input")
        check_amount(self.price_per_m_output, "price_per_m_output")
        bps = (self.owner_bps, self.contributors_bps, self.operator_bps)
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 0 for b in bps) or sum(bps) != BPS:
            raise InvalidInput(f"adapter {self.adapter_id}: revenue split {bps} must be non-negative bps summing to {BPS}")


@dataclass(frozen=True)
class Credit:
    payee: str
    role: str  # owner | contributor | operator
    adapter_id: int
    amount: int


@dataclass(frozen=True)
class Pricing:
    cost: int
    price_per_m_input: int  # weighted price actually charged (informational; cost is exact)
    price_per_m_output: int
    adapter_parts: tuple[tuple[int, int], ...]  # (adapter_id, part of the cost)
    credits: tuple[Credit, ...]


def request_cost(input_tokens: int, output_tokens: int, price_per_m_input: int, price_per_m_output: int) -> int:
    """docs/formats.md: ceil((in * pIn + out * pOut) / 1e6), in integers."""
    _check_tokens(input_tokens, output_tokens)
    return -(-(input_tokens * price_per_m_input + output_tokens * price_per_m_output) // PER_TOKENS)


def price_request(
    mix: Sequence[tuple[AdapterTerms, int]],
    input_tokens: int,
    output_tokens: int,
    *,
    operator: str,
    contributor_shares: Mapping[int, Sequence[ContributorShare]] | None = None,
    base_price_per_m_input: int = 0,
    base_price_per_m_output: int = 0,
) -> Pricing:
    """Cost and credits of one request; `mix` is [(terms, weight_bps)] with weights summing to 10000."""
    _check_tokens(input_tokens, output_tokens)
    shares = contributor_shares or {}
    if not mix:
        cost = request_cost(input_tokens, output_tokens, base_price_per_m_input, base_price_per_m_output)
        credits = (Credit(operator, "operator", BASE_MODEL, cost),) if cost else ()
        return Pricing(cost, base_price_per_m_input, base_price_per_m_output, (), credits)

    ids = [t.adapter_id for t, _ in mix]
    if len(set(ids)) != len(ids):
        raise InvalidInput(f"adapter mix names an adapter twice: {ids}")
    weights = [w for _, w in mix]
    if any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in weights) or sum(weights) != BPS:
        raise InvalidInput(f"adapter weights {weights} must be positive bps summing to {BPS}")
    unknown = set(shares) - set(ids)
    if unknown:
        raise InvalidInput(f"contributor shares given for adapters not in the mix: {sorted(unknown)}")

    values = [w * (input_tokens * t.price_per_m_input + output_tokens * t.price_per_m_output) for t, w in mix]
    cost = -(-sum(values) // (BPS * PER_TOKENS))
    price_in = sum(w * t.price_per_m_input for t, w in mix) // BPS
    price_out = sum(w * t.price_per_m_output for t, w in mix) // BPS
    parts = apportion(cost, list(zip(ids, values)))

    credits: dict[tuple[str, str, int], int] = {}

    def add(payee: str, role: str, adapter_id: int, amount: int) -> None:
        if amount:
            key = (payee.lower(), role, adapter_id)
            credits[key] = credits.get(key, 0) + amount

    for (terms, _), (_, part) in zip(mix, parts):
        owner_part, contrib_part, op_part = (p for _, p in apportion(part, [
            ("owner", terms.owner_bps), ("contributors", terms.contributors_bps), ("operator", terms.operator_bps)]))
        add(terms.owner, "owner", terms.adapter_id, owner_part)
        add(operator, "operator", terms.adapter_id, op_part)
        positive = _positive_shares(terms, shares.get(terms.adapter_id, ()))
        if positive:
            for address, amount in apportion(contrib_part, positive):
                add(address, "contributor", terms.adapter_id, amount)
        else:
            add(terms.owner, "owner", terms.adapter_id, contrib_part)

    ordered = tuple(Credit(p, r, a, amt) for (p, r, a), amt in sorted(credits.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])))
    return Pricing(cost, price_in, price_out, tuple(parts), ordered)


def _positive_shares(terms: AdapterTerms, shares: Sequence[ContributorShare]) -> list[tuple[str, int]]:
    if shares and not terms.has_datanet:
        raise InvalidInput(f"adapter {terms.adapter_id} has no Datanet, so it cannot have contributor shares")
    seen: set[str] = set()
    out = []
    for s in shares:
        if isinstance(s.share_bps, bool) or not isinstance(s.share_bps, int) or not 0 <= s.share_bps <= BPS:
            raise InvalidInput(f"contributor share of {s.address} must be integer bps in [0, {BPS}], got {s.share_bps!r}")
        addr = s.address.lower()
        if addr in seen:
            raise InvalidInput(f"contributor {addr} listed twice for adapter {terms.adapter_id}")
        seen.add(addr)
        if s.share_bps > 0:
            out.append((addr, s.share_bps))
    if sum(b for _, b in out) > BPS:
        raise InvalidInput(f"contributor shares of adapter {terms.adapter_id} sum to more than {BPS} bps")
    return sorted(out)


def _check_tokens(input_tokens: int, output_tokens: int) -> None:
    for name, v in (("input_tokens", input_tokens), ("output_tokens", output_tokens)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**64:
            raise InvalidInput(f"{name} must be an integer in [0, 2**64), got {v!r}")
