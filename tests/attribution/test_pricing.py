"""Cost and revenue splits: integers only, credits sum to the cost, nothing negative, deterministic."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attribution.errors import InvalidInput
from attribution.pricing import AdapterTerms, price_request, request_cost
from attribution.shares import ContributorShare, apportion, scores_to_bps

OP = "0x" + "0e" * 20


def terms(i, pin, pout, split=(5000, 3000, 2000), datanet=True):
    return AdapterTerms(i, "0x" + f"{i:040x}", pin, pout, *split, has_datanet=datanet)


def test_cost_is_ceil_of_token_prices_per_million():
    assert request_cost(1, 0, 1, 0) == 1  # 1e-6 rounds up to one base unit
    assert request_cost(1_000_000, 0, 7, 0) == 7
    assert request_cost(1_000_001, 0, 7, 0) == 8
    assert request_cost(10, 20, 3 * 10**15, 9 * 10**15) == (10 * 3 * 10**15 + 20 * 9 * 10**15) // 10**6
    assert request_cost(0, 0, 10**30, 10**30) == 0


def test_split_follows_owner_contributors_operator_bps_and_shares():
    t = terms(1, 10**6, 0)  # 1 base unit per input token
    shares = {1: [ContributorShare("0x" + "c1" * 20, 0.9, 7500), ContributorShare("0x" + "c2" * 20, 0.3, 2500)]}
    p = price_request([(t, 10_000)], 1000, 0, operator=OP, contributor_shares=shares)
    got = {(c.payee, c.role): c.amount for c in p.credits}
    assert p.cost == 1000
    assert got == {(t.owner, "owner"): 500, (OP, "operator"): 200,
                   ("0x" + "c1" * 20, "contributor"): 225, ("0x" + "c2" * 20, "contributor"): 75}


def test_contributors_part_goes_to_owner_without_datanet_or_positive_shares():
    no_datanet = price_request([(terms(2, 10**6, 0, datanet=False), 10_000)], 1000, 0, operator=OP)
    zero_shares = price_request([(terms(2, 10**6, 0), 10_000)], 1000, 0, operator=OP,
                                contributor_shares={2: [ContributorShare("0x" + "c1" * 20, 0.0, 0)]})
    for p in (no_datanet, zero_shares):
        got = {c.role: c.amount for c in p.credits}
        assert got == {"owner": 800, "operator": 200}


def test_shares_for_an_adapter_without_datanet_are_refused():
    with pytest.raises(InvalidInput):
        price_request([(terms(2, 1, 1, datanet=False), 10_000)], 1, 1, operator=OP,
                      contributor_shares={2: [ContributorShare("0x" + "c1" * 20, 1.0, 10_000)]})


def test_fused_request_splits_by_weighted_value():
    a, b = terms(1, 2 * 10**6, 0), terms(2, 10**6, 0)
    p = price_request([(a, 5000), (b, 5000)], 1000, 0, operator=OP)
    assert p.cost == 1500  # half of 2000 + half of 1000
    assert dict(p.adapter_parts) == {1: 1000, 2: 500}


@pytest.mark.parametrize("weights", [(5000, 4000), (0, 10_000), (10_000, 10_000)])
def test_bad_weights_are_refused(weights):
    with pytest.raises(InvalidInput):
        price_request([(terms(1, 1, 1), weights[0]), (terms(2, 1, 1), weights[1])], 1, 1, operator=OP)


def test_base_model_request_pays_the_operator():
    p = price_request([], 1_000_000, 1_000_000, operator=OP, base_price_per_m_input=3, base_price_per_m_output=4)
    assert p.cost == 7 and [(c.payee, c.role, c.amount) for c in p.credits] == [(OP, "operator", 7)]


def test_apportion_gives_remainders_to_largest_fraction_then_earlier_key():
    assert apportion(10, [("a", 1), ("b", 1), ("c", 1)]) == [("a", 4), ("b", 3), ("c", 3)]
    assert apportion(5, [("a", 1), ("b", 3)]) == [("a", 1), ("b", 4)]  # 1.25 / 3.75: b's .75 wins
    with pytest.raises(InvalidInput):
        apportion(1, [("a", 0)])


def test_scores_to_bps_pays_only_positive_influence():
    out = scores_to_bps([("0x" + "c3" * 20, -0.5), ("0x" + "c1" * 20, 0.2), ("0x" + "c2" * 20, 0.6), ("0x" + "c4" * 20, float("nan"))])
    assert [(s.address[-2:], s.share_bps) for s in out] == [("c1", 2500), ("c2", 7500)]
    assert scores_to_bps([("0x" + "c1" * 20, -1.0)]) == []


addresses = st.integers(1, 30).map(lambda i: "0x" + f"{i:040x}")
bps_split = st.tuples(st.integers(0, 10_000), st.integers(0, 10_000)).map(
    lambda t: (min(t), max(t) - min(t), 10_000 - max(t)))
big_price = st.integers(0, 10**24)


@st.composite
def requests(draw):
    n = draw(st.integers(0, 3))
    mix = []
    cuts = sorted(draw(st.lists(st.integers(1, 9_999), min_size=n - 1, max_size=n - 1, unique=True))) if n else []
    weights = [b - a for a, b in zip([0, *cuts], [*cuts, 10_000])] if n else []
    shares = {}
    for i, w in enumerate(weights, start=1):
        datanet = draw(st.booleans())
        mix.append((AdapterTerms(i, draw(addresses), draw(big_price), draw(big_price), *draw(bps_split), has_datanet=datanet), w))
        if datanet:
            contributors = draw(st.lists(addresses, max_size=4, unique=True))
            raw = draw(st.lists(st.floats(-1, 1, allow_nan=False), min_size=len(contributors), max_size=len(contributors)))
            shares[i] = scores_to_bps(list(zip(contributors, raw)))
    return mix, draw(st.integers(0, 2**20)), draw(st.integers(0, 2**20)), shares


@settings(max_examples=300, deadline=None)
@given(requests(), big_price, big_price)
def test_credits_sum_to_cost_are_non_negative_and_deterministic(req, base_in, base_out):
    mix, tin, tout, shares = req
    p = price_request(mix, tin, tout, operator=OP, contributor_shares=shares,
                      base_price_per_m_input=base_in, base_price_per_m_output=base_out)
    assert all(isinstance(c.amount, int) and c.amount > 0 for c in p.credits)
    assert sum(c.amount for c in p.credits) == p.cost
    assert sum(part for _, part in p.adapter_parts) == (p.cost if mix else 0)
    if len(mix) == 1:
        t = mix[0][0]
        assert p.cost == request_cost(tin, tout, t.price_per_m_input, t.price_per_m_output)
    again = price_request(list(mix), tin, tout, operator=OP, contributor_shares=dict(shares),
                          base_price_per_m_input=base_in, base_price_per_m_output=base_out)
    assert again == p


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**256 - 1), st.lists(st.integers(0, 2**64), min_size=1, max_size=8).filter(lambda w: sum(w) > 0))
def test_apportion_is_exact_and_within_one_unit_of_the_true_share(total, weights):
    parts = [p for _, p in apportion(total, list(enumerate(weights)))]
    assert sum(parts) == total and all(p >= 0 for p in parts)
    w_sum = sum(weights)
    for p, w in zip(parts, weights):
        assert total * w // w_sum <= p <= total * w // w_sum + 1
