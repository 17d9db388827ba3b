"""Runtime fusion against explicitly merged full-weight references."""

from __future__ import annotations

import pytest
import torch
from peft.utils.merge_utils import ties as peft_ties

from engine.adapters import AdapterCache, FusedMix
from engine.adapters.fusion import member_generator
from engine.errors import AdapterError, AdapterNotFound

from .conftest import slot_delta

NAMES = ("qv4", "qv4b", "all8", "mlp2", "o1")


@pytest.fixture
def cache(model_config, adapters):
    c = AdapterCache(model_config, num_slots=4, max_rank=8, background=False)
    for n in NAMES:
        c.register(n, adapters.root / n)
    return c


def truncate(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    err = (s[rank:].square().sum() / s.square().sum()).sqrt().item()
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).float(), err


def locations(adapters, names):
    return sorted({loc for n in names for loc in adapters.refs[n]})


def test_linear_mix_is_the_exact_weighted_sum(cache, adapters):
    members = (("qv4", 0.7), ("mlp2", -1.3), ("o1", 2.0))
    mix = FusedMix(members=members, strategy="linear")
    slot = cache.request(mix)
    assert float(cache.pool.scale[slot]) == 1.0
    assert int(cache.pool.rank[slot]) == cache.spec(mix).rank == 4
    for loc in locations(adapters, [n for n, _ in members]):
        ref = sum(w * adapters.refs[n][loc] for n, w in members if loc in adapters.refs[n])
        torch.testing.assert_close(slot_delta(cache.pool, slot, *loc), ref, rtol=1e-5, atol=1e-6)


def test_linear_mix_rank_is_the_sum_of_member_ranks(cache, adapters):
    mix = FusedMix(members=(("qv4", 0.5), ("qv4b", 0.5)))
    slot = cache.request(mix)
    assert int(cache.pool.rank[slot]) == 8
    loc = ("v_proj", 1)
    ref = 0.5 * adapters.refs["qv4"][loc] + 0.5 * adapters.refs["qv4b"][loc]
    torch.testing.assert_close(slot_delta(cache.pool, slot, *loc), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(AdapterError, match="over max_rank 8"):
        cache.request(FusedMix(members=(("qv4", 1.0), ("all8", 1.0))))


def test_mixes_are_cached_under_an_order_independent_key(cache):
    a = FusedMix(members=(("qv4", 0.3), ("o1", 0.7)))
    b = FusedMix(members=(("o1", 0.7), ("qv4", 0.3)))
    assert cache.spec(a).content_hash == cache.spec(b).content_hash
    assert cache.spec(a).content_hash != cache.spec(FusedMix(members=(("qv4", 0.3), ("o1", 0.8)))).content_hash
    assert cache.spec(a).content_hash != cache.spec(FusedMix(members=a.members, strategy="ties")).content_hash
    slot = cache.request(a)
    assert cache.request(b) == slot  # second request: a device hit, nothing recomputed
    s = cache.stats()
    assert s["host_to_device"]["hits"] == 1 and s["host_to_device"]["misses"] == 1
    assert any(spec.content_hash == cache.spec(a).content_hash and tier == "device"
               for spec, tier, *_ in cache.list())


def test_ties_matches_the_merged_full_delta_truncated_to_the_same_rank(model_config, adapters):
    members = (("qv4", 0.6), ("qv4b", 0.9), ("all8", 0.5))
    for max_rank in (8, 32):  # 8 truncates; 32 covers every delta's full rank (16 or 32)
        cache = AdapterCache(model_config, num_slots=2, max_rank=max_rank, background=False)
        for n, _ in members:
            cache.register(n, adapters.root / n)
        mix = FusedMix(members=members, strategy="ties", density=0.4)
        slot = cache.request(mix)
        report = cache.fusion_reports[cache.spec(mix).content_hash]
        for loc in locations(adapters, [n for n, _ in members]):
            present = [(adapters.refs[n][loc], w) for n, w in members if loc in adapters.refs[n]]
            merged = peft_ties([d for d, _ in present], torch.tensor([w for _, w in present]), 0.4)
            ref, err = truncate(merged, max_rank)
            got = slot_delta(cache.pool, slot, *loc)
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
            assert report.errors[loc] == pytest.approx(err, abs=1e-5)
        print(f"ties max_rank={max_rank}: max relative truncation error {report.max_error:.4f}")
        if max_rank == 8:
            assert report.max_error > 0.01  # the merged delta really has rank > 8
        else:
            assert report.max_error < 1e-5


def test_dare_is_seeded_and_matches_its_reference(model_config, adapters):
    members = (("qv4", 0.8), ("mlp2", 1.1), ("o1", -0.5))

    def run(seed):
        cache = AdapterCache(model_config, num_slots=1, max_rank=8, background=False)
        for n, _ in members:
            cache.register(n, adapters.root / n)
        mix = FusedMix(members=members, strategy="dare", density=0.3, seed=seed)
        slot = cache.request(mix)
        return cache, cache.spec(mix), slot

    cache, spec, slot = run(1234)
    hashes = {n: cache.spec(n).content_hash for n, _ in members}
    for loc in locations(adapters, [n for n, _ in members]):
        merged = 0
        for n, w in members:
            if loc in adapters.refs[n]:
                g = member_generator(1234, hashes[n], *loc, "cpu")
                keep = torch.rand(adapters.refs[n][loc].shape, generator=g) < 0.3
                merged = merged + w * adapters.refs[n][loc] * keep / 0.3
        ref, err = truncate(merged, 8)
        torch.testing.assert_close(slot_delta(cache.pool, slot, *loc), ref, rtol=1e-4, atol=1e-5)
        assert cache.fusion_reports[spec.content_hash].errors[loc] == pytest.approx(err, abs=1e-5)
    again, spec2, slot2 = run(1234)
    other, spec3, slot3 = run(99)
    assert spec2.content_hash == spec.content_hash != spec3.content_hash
    q = ("down_proj", 0)
    assert torch.equal(slot_delta(again.pool, slot2, *q), slot_delta(cache.pool, slot, *q))
    assert not torch.allclose(slot_delta(other.pool, slot3, *q), slot_delta(cache.pool, slot, *q))


def test_dare_without_drops_is_the_linear_delta(cache, adapters):
    members = (("qv4", 0.5), ("qv4b", 1.5))
    slot = cache.request(FusedMix(members=members, strategy="dare", density=1.0))
    for loc in locations(adapters, ["qv4"]):
        ref, _ = truncate(sum(w * adapters.refs[n][loc] for n, w in members), 8)  # rank <= 8: exact
        torch.testing.assert_close(slot_delta(cache.pool, slot, *loc), ref, rtol=1e-4, atol=1e-5)


def test_mix_members_load_in_the_background(model_config, adapters):
    with AdapterCache(model_config, num_slots=2, max_rank=8) as cache:
        for n in ("qv4", "o1"):
            cache.register(n, adapters.root / n)
        mix = FusedMix(members=(("qv4", 1.0), ("o1", 1.0)))
        assert cache.request(mix) is None
        slot = cache.load(mix, timeout=10)
        assert slot is not None and int(cache.pool.rank[slot]) == 4
        assert cache.stats()["disk_to_host"]["misses"] == 3  # two members read from disk + one fusion


@pytest.mark.parametrize("mix, error, match", [
    (FusedMix(members=(("nope", 1.0),)), AdapterNotFound, "nope"),
    (FusedMix(members=(("qv4", 1.0), ("qv4", 2.0))), AdapterError, "twice"),
    (FusedMix(members=(("qv4", 1.0),), strategy="slerp"), AdapterError, "unknown fusion strategy"),
    (FusedMix(members=(("qv4", 1.0),), strategy="ties", density=0.0), AdapterError, "density"),
    (FusedMix(members=(("qv4", float("nan")),)), AdapterError, "finite"),
    (FusedMix(members=()), AdapterError, "at least one"),
    (FusedMix(members=(("qv4", 1.0),), strategy="dare", rank=9), AdapterError, "rank"),
])
def test_bad_mixes_are_refused_immediately(cache, mix, error, match):
    before = cache.stats()
    with pytest.raises(error, match=match):
        cache.request(mix)
    assert cache.stats() == before


def test_reregistering_a_member_drops_its_mixes(cache, adapters, tmp_path):
    import shutil
    from .conftest import edit_config

    shutil.copytree(adapters.root / "o1", tmp_path / "o1")
    cache.register("o1", tmp_path / "o1")
    mix = FusedMix(members=(("qv4", 1.0), ("o1", 1.0)))
    old_key = cache.spec(mix).content_hash
    cache.release(cache.request(mix))
    edit_config(tmp_path / "o1", lora_alpha=1)
    cache.register("o1", tmp_path / "o1")
    assert cache.spec(mix).content_hash != old_key
    assert old_key not in cache.host and all(s.key != old_key for s in cache.pool.slots)
