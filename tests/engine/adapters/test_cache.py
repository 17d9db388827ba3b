"""AdapterCache: tiers, background loading, reference counts, eviction, pinning, counters, threads."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import torch

from engine.adapters import AdapterCache, AdapterStore
from engine.errors import AdapterError, AdapterNotFound

from .conftest import edit_config, slot_delta

NAMES = ("qv4", "all8", "mlp2", "pattern", "o1", "qv4b")


def make_cache(model_config, adapters, names=NAMES, **kw):
    kw.setdefault("num_slots", 3)
    kw.setdefault("max_rank", 8)
    cache = AdapterCache(model_config, **kw)
    for n in names:
        cache.register(n, adapters.root / n)
    return cache


@pytest.fixture
def cache(model_config, adapters):
    c = make_cache(model_config, adapters)
    yield c
    c.close()


def wait_slot(cache, ref, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        slot = cache.request(ref)
        if slot is not None:
            return slot
        time.sleep(0.002)
    raise AssertionError(f"{ref} never became resident")


def assert_holds(cache, adapters, slot, name):
    for (module, layer), ref in adapters.refs[name].items():
        torch.testing.assert_close(slot_delta(cache.pool, slot, module, layer), ref, rtol=1e-5, atol=1e-6)


def tier_of(cache, name):
    return {spec.name: (tier, slot, refs, pinned) for spec, tier, slot, refs, pinned in cache.list()}[name]


def test_uncached_request_returns_none_then_becomes_ready(cache, adapters):
    assert cache.request("qv4") is None  # the load runs in the background
    slot = wait_slot(cache, "qv4")
    assert_holds(cache, adapters, slot, "qv4")
    assert tier_of(cache, "qv4") == ("device", slot, 1, False)
    cache.release(slot)
    assert tier_of(cache, "qv4")[2] == 0


def test_a_load_does_not_disturb_slots_in_use(cache, adapters):
    a = wait_slot(cache, "all8")
    before = {m: cache.pool.lora_a[m][0][a].clone() for m in cache.pool.lora_a}
    assert cache.request("mlp2") is None
    # while mlp2 loads, all8's slot keeps serving: still referenced, still ready, bytes unchanged
    assert cache.request("all8") == a
    b = wait_slot(cache, "mlp2")
    assert b != a
    for m, t in before.items():
        assert torch.equal(cache.pool.lora_a[m][0][a], t)
    assert_holds(cache, adapters, a, "all8")
    assert_holds(cache, adapters, b, "mlp2")
    assert cache.pool.slots[a].refcount == 2


def test_ranks_share_the_pool_with_zero_padding(cache, adapters):
    slots = {n: wait_slot(cache, n) for n in ("o1", "all8", "mlp2")}
    assert [int(cache.pool.rank[slots[n]]) for n in ("o1", "all8", "mlp2")] == [1, 8, 2]
    o1 = slots["o1"]
    assert cache.pool.lora_a["o_proj"][0][o1][1:].abs().sum() == 0
    assert cache.pool.lora_b["o_proj"][0][o1][:, 1:].abs().sum() == 0
    assert cache.pool.lora_a["q_proj"][0][o1].abs().sum() == 0  # a module o1 does not target is zero
    assert float(cache.pool.scale[o1]) == 2.0


def test_slots_in_use_are_never_evicted(model_config, adapters):
    with make_cache(model_config, adapters, num_slots=2) as cache:
        held = [wait_slot(cache, "qv4"), wait_slot(cache, "all8")]
        for _ in range(20):
            assert cache.request("mlp2") is None
            time.sleep(0.005)
        assert {cache.pool.slots[s].key for s in held} == {cache.spec("qv4").content_hash,
                                                           cache.spec("all8").content_hash}
        assert_holds(cache, adapters, held[0], "qv4")
        # the host tier was warmed meanwhile, so the device copy later needs no disk read
        assert tier_of(cache, "mlp2")[0] == "host"
        cache.release(held[1])
        slot = wait_slot(cache, "mlp2")
        assert slot == held[1]  # the only unreferenced slot was taken
        assert_holds(cache, adapters, held[0], "qv4")
        assert tier_of(cache, "all8")[0] == "host"
        assert cache.stats()["host_to_device"]["evictions"] == 1


def test_eviction_takes_the_least_recently_used_free_slot(model_config, adapters):
    with make_cache(model_config, adapters, num_slots=3) as cache:
        for n in ("qv4", "all8", "mlp2"):
            cache.release(wait_slot(cache, n))
        cache.release(wait_slot(cache, "qv4"))  # qv4 is now the most recent; all8 the least
        wait_slot(cache, "o1")
        assert tier_of(cache, "all8")[0] == "host"
        assert {tier_of(cache, n)[0] for n in ("qv4", "mlp2", "o1")} == {"device"}


def test_pinned_adapters_are_not_evicted(model_config, adapters):
    with make_cache(model_config, adapters, num_slots=2) as cache:
        cache.pin("qv4")
        cache.load("qv4")
        for n in ("all8", "mlp2", "o1"):
            cache.release(wait_slot(cache, n))
            assert tier_of(cache, "qv4")[0] == "device"
        assert tier_of(cache, "qv4")[3] is True
        with pytest.raises(AdapterError, match="at most 1"):
            cache.pin("all8")  # pinning every slot would starve everyone else
        cache.unpin("qv4")
        cache.release(wait_slot(cache, "all8"))
        cache.release(wait_slot(cache, "mlp2"))
        assert tier_of(cache, "qv4")[0] == "host"


def test_host_tier_is_lru_by_bytes(model_config, adapters):
    sizes = {n: None for n in ("qv4", "qv4b", "o1")}
    probe = make_cache(model_config, adapters, background=False)
    sizes = {n: probe.spec(n).nbytes for n in sizes}
    probe.close()
    assert sizes["qv4"] == sizes["qv4b"] and sizes["o1"] < sizes["qv4"]
    # room for two rank-4 adapters; a third (small) one needs one eviction
    with make_cache(model_config, adapters, num_slots=1, host_bytes=2 * sizes["qv4"] + 16) as cache:
        for n in ("qv4", "qv4b"):
            cache.load(n)
        cache.load("qv4")  # touch: qv4b is now least recently used on the host
        stats = cache.stats()
        assert stats["disk_to_host"]["misses"] == 2 and stats["disk_to_host"]["hits"] == 1
        cache.load("o1")
        assert stats["host_bytes_capacity"] >= cache.stats()["host_bytes_used"]
        assert cache.stats()["disk_to_host"]["evictions"] == 1
        assert "qv4b" not in [s.name for s, tier, *_ in cache.list() if tier != "disk"]
        assert tier_of(cache, "qv4")[0] == "host"


def test_counters_track_each_tier(model_config, adapters):
    with make_cache(model_config, adapters) as cache:
        spec = cache.spec("qv4")
        cache.release(wait_slot(cache, "qv4"))
        cache.release(wait_slot(cache, "qv4"))
        s = cache.stats()
        assert s["disk_to_host"]["misses"] == 1 and s["disk_to_host"]["bytes"] == spec.file_bytes
        assert s["disk_to_host"]["ms"] > 0
        assert s["host_to_device"]["misses"] == 1 and s["host_to_device"]["hits"] == 2
        assert s["host_to_device"]["bytes"] == spec.nbytes and s["host_to_device"]["ms"] > 0
        assert s["slots_used"] == 1 and s["slots_referenced"] == 0


def test_unload_is_refused_while_in_use(cache, adapters):
    slot = wait_slot(cache, "qv4")
    with pytest.raises(AdapterError, match="in use"):
        cache.unload("qv4")
    assert tier_of(cache, "qv4")[0] == "device"
    cache.release(slot)
    cache.unload("qv4")
    assert tier_of(cache, "qv4") == ("disk", None, 0, False)
    assert int(cache.pool.rank[slot]) == 0 and cache.pool.lora_a["q_proj"][0][slot].abs().sum() == 0
    with pytest.raises(AdapterError, match="without a reference"):
        cache.release(slot)


def test_unknown_names_raise_at_once(cache):
    with pytest.raises(AdapterNotFound):
        cache.request("nope")
    with pytest.raises(AdapterNotFound):
        cache.pin("nope")


def test_reregistering_changed_content_evicts_the_old_copy(model_config, adapters, tmp_path):
    folder = tmp_path / "live"
    shutil.copytree(adapters.root / "qv4", folder)
    with make_cache(model_config, adapters, names=()) as cache:
        old = cache.register("live", folder)
        slot = wait_slot(cache, "live")
        edit_config(folder, lora_alpha=4)  # scale 2 -> 1
        new = cache.register("live", folder)
        assert new.content_hash != old.content_hash
        # the old copy is in use, so it stays until released, then its slot is freed
        assert cache.pool.slots[slot].key == old.content_hash
        cache.release(slot)
        assert cache.pool.slots[slot].key is None and old.content_hash not in cache.host
        fresh = wait_slot(cache, "live")
        assert float(cache.pool.scale[fresh]) == 1.0


def test_a_file_changed_after_registration_is_refused_by_the_loader(model_config, adapters, tmp_path):
    folder = tmp_path / "moving"
    shutil.copytree(adapters.root / "qv4", folder)
    with make_cache(model_config, adapters, names=("mlp2",)) as cache:
        cache.register("moving", folder)
        shutil.copy(adapters.root / "qv4b" / "adapter_model.safetensors", folder / "adapter_model.safetensors")
        assert cache.request("moving") is None
        with pytest.raises(AdapterError, match="changed on disk"):
            wait_slot(cache, "moving")
        assert tier_of(cache, "moving") == ("disk", None, 0, False)
        assert cache.stats()["slots_used"] == 0
        assert wait_slot(cache, "mlp2") is not None  # the loader thread survived


def test_synchronous_fallback_returns_the_slot_at_once(model_config, adapters):
    cache = make_cache(model_config, adapters, background=False)
    slot = cache.request("pattern")
    assert slot is not None
    assert_holds(cache, adapters, slot, "pattern")


def test_threads_share_the_cache_safely(model_config, adapters):
    """Four threads request/release a random mix through three slots; every slot handed out holds the
    adapter asked for, and every reference is returned."""
    errors = []
    with make_cache(model_config, adapters, num_slots=3) as cache:
        hashes = {n: cache.spec(n).content_hash for n in NAMES}

        def worker(seed):
            g = torch.Generator().manual_seed(seed)
            try:
                for _ in range(40):
                    name = NAMES[int(torch.randint(len(NAMES), (1,), generator=g))]
                    slot = None
                    deadline = time.monotonic() + 10
                    while slot is None and time.monotonic() < deadline:
                        slot = cache.request(name)
                        if slot is None:
                            time.sleep(0.001)
                    assert slot is not None, f"{name} starved"
                    assert cache.pool.slots[slot].key == hashes[name]
                    assert int(cache.pool.rank[slot]) == cache.spec(name).rank
                    cache.release(slot)
            except Exception as e:  # collected and re-raised in the main thread
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert all(s.refcount == 0 for s in cache.pool.slots)
        assert cache.stats()["host_to_device"]["hits"] + cache.stats()["host_to_device"]["misses"] >= 160


def test_close_stops_the_worker(model_config, adapters):
    cache = make_cache(model_config, adapters, names=("qv4",))
    cache.load("qv4")
    cache.close()
    assert not cache._worker.is_alive()


def test_store_lists_safe_adapter_folders(adapters, model_config, tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    for n in ("qv4", "mlp2"):
        shutil.copytree(adapters.root / n, root / n)
    shutil.copytree(adapters.root / "o1", root / "bad name")
    (root / "empty").mkdir()
    store = AdapterStore(root)
    assert store.names() == ["mlp2", "qv4"]
    assert "qv4" in store and "../qv4" not in store and "empty" not in store
    with pytest.raises(AdapterError, match="invalid adapter name"):
        store.path("../store/qv4")
    with pytest.raises(AdapterNotFound):
        store.path("missing")
    edit_config(root / "mlp2", use_dora=True)
    with make_cache(model_config, adapters, names=()) as cache:
        refused = store.register_all(cache)
        assert list(refused) == ["mlp2"] and "DoRA" in str(refused["mlp2"])
        assert [s.name for s, *_ in cache.list()] == ["qv4"]


def test_admit_wait_is_a_cuda_path_and_changes_nothing_on_cpu(cache, adapters):
    """On CPU, request(wait_s=...) behaves as before: the load starts in the background and None comes back."""
    assert cache.request("qv4", wait_s=5.0) is None
    slot = wait_slot(cache, "qv4")
    assert_holds(cache, adapters, slot, "qv4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device copy and its stream wait need CUDA "
                    "(run on the GPU: pytest --confcutdir=tests/engine/adapters tests/engine/adapters)")
def test_admit_wait_hands_out_a_slot_whose_copy_is_queued(model_config, adapters):
    """With wait_s, the first request returns the slot as soon as the loader has queued the device copy; the
    current stream waits for it, so what runs on that stream next reads the adapter's weights; the load's
    bookkeeping completes on a later request."""
    cache = make_cache(model_config, adapters, device="cuda")
    try:
        slot = cache.request("all8", wait_s=5.0)
        assert slot is not None
        for (module, layer), ref in adapters.refs["all8"].items():  # read on the current stream, after the copy
            torch.testing.assert_close(slot_delta(cache.pool, slot, module, layer).cpu(), ref, rtol=1e-5, atol=1e-6)
        torch.cuda.synchronize()
        other = wait_slot(cache, "qv4")  # any later request reaps finished loads
        assert cache.pool.slots[slot].ready and cache.pool.slots[other].ready
        assert tier_of(cache, "all8")[2] == 1
        cache.release(slot)
        cache.release(other)
    finally:
        cache.close()
