"""Registry sync against a real anvil: mirror into the ledger, verified download, tampered archive refused."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
from eth_account import Account

sys.path.insert(0, str(Path(__file__).resolve().parent / "payments"))
import chainkit  # noqa: E402
from chainkit import BASE_MODEL, db, ledger, send  # noqa: E402,F401

from attribution import models as m  # noqa: E402
from node.errors import NotFound  # noqa: E402
from node.registry import AdapterFetcher, pack_adapter  # noqa: E402
from node.registry_sync import RegistrySync  # noqa: E402


@pytest.fixture
def chain():
    """A fresh chain per test: registrations are global on chain, and names are first come, first served."""
    anvil = chainkit.Anvil()
    try:
        yield chainkit.deploy_all(anvil)
    finally:
        anvil.stop()


def make_adapter(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                                                            "peft_type": "LORA", "seed": seed}))
    (folder / "adapter_model.safetensors").write_bytes(bytes([seed]) * 256)
    return folder


def register(chain, owner_key, name, sha_hex, uri, *, datanet=0, split=(7000, 2000, 1000), prices=(500_000, 1_500_000)):
    params = (name, BASE_MODEL, bytes.fromhex(sha_hex), uri, datanet, prices[0], prices[1], *split)
    send(chain.w3, owner_key, chain.adapters.functions.registerAdapter(params))


@pytest.fixture
def published(chain, tmp_path):
    """Three registrations: 'pirate' (good, with a Datanet), 'forged' (registry hash differs from the file),
    and 'other-base' for another base model."""
    owner = chain.anvil.funded_key()
    chain.extra["owner_key"] = owner
    send(chain.w3, owner, chain.datanets.functions.createDatanet("ipfs://datanet-meta", b"\x01" * 32))
    datanet_id = chain.datanets.functions.datanetCount().call()
    good = tmp_path / "pub" / "pirate.tar.gz"
    good.parent.mkdir()
    sha = pack_adapter(make_adapter(tmp_path / "src" / "pirate", 1), good)
    register(chain, owner, "pirate", sha, good.as_uri(), datanet=datanet_id)
    bad = tmp_path / "pub" / "forged.tar.gz"
    pack_adapter(make_adapter(tmp_path / "src" / "forged", 2), bad)
    register(chain, owner, "forged", hashlib.sha256(b"what the owner registered").hexdigest(), bad.as_uri(),
             split=(9000, 0, 1000))
    params = ("other-base", "some-other-model", b"\x02" * 32, good.as_uri(), 0, 1, 1, 10000, 0, 0)
    send(chain.w3, owner, chain.adapters.functions.registerAdapter(params))
    return Account.from_key(owner).address.lower(), datanet_id


@pytest.fixture
def sync(chain, ledger, tmp_path):
    return RegistrySync(chain.adapters, chain.datanets, ledger, BASE_MODEL, AdapterFetcher(tmp_path / "store"))


def test_sync_mirrors_adapters_and_datanets_of_this_base_model(sync, ledger, published):
    owner, datanet_id = published
    states = sync.sync()
    assert states == {"pirate": "mirrored", "forged": "mirrored"}
    with ledger.db.reader.begin() as s:
        rows = {a.name: a for a in s.query(m.Adapter)}
        assert set(rows) == {"pirate", "forged"}
        p = rows["pirate"]
        assert (p.owner, p.datanet_id, p.price_per_m_input, p.price_per_m_output) == (owner, datanet_id, 500_000, 1_500_000)
        assert (p.owner_bps, p.contributors_bps, p.operator_bps) == (7000, 2000, 1000)
        assert s.get(m.Datanet, datanet_id).metadata_uri == "ipfs://datanet-meta"
    assert not (sync.fetcher.store_dir / "pirate").exists()  # mirroring alone downloads nothing


def test_cold_start_pulls_a_registered_adapter_and_verifies_it(sync, published):
    path = sync.resolve_unknown("pirate")
    assert path == sync.fetcher.store_dir / "pirate"
    assert json.loads((path / "adapter_config.json").read_text())["seed"] == 1
    assert sync.sync(download=True)["pirate"] == "present"  # verified once, not fetched again


def test_tampered_adapter_is_refused_and_never_lands_in_the_store(sync, published, caplog):
    with pytest.raises(NotFound, match="could not be served"):
        sync.resolve_unknown("forged")
    assert not (sync.fetcher.store_dir / "forged").exists()
    assert "refused" in caplog.text and "sha256" in caplog.text
    assert sync.sync(download=True)["forged"] == "refused"


def test_unregistered_or_other_base_model_is_none(sync, published):
    assert sync.resolve_unknown("nobody") is None
    assert sync.resolve_unknown("other-base") is None
    assert sync.resolve_unknown("../etc") is None


def test_incremental_sync_follows_registry_events(sync, ledger, chain, published):
    owner, _ = published
    first = sync.sync_changes()
    assert set(first) == {"pirate", "forged"}
    assert sync.sync_changes() == {}  # nothing happened since
    owner_key = chain.extra["owner_key"]
    pirate_id = next(i for i in chain.adapters.functions.adaptersByBaseModel(BASE_MODEL).call()
                     if chain.adapters.functions.getAdapter(i).call()[12] == "pirate")
    send(chain.w3, owner_key, chain.adapters.functions.updatePrice(pirate_id, 7, 9))
    assert sync.sync_changes() == {"pirate": "mirrored"}
    with ledger.db.reader.begin() as s:
        row = s.get(m.Adapter, pirate_id)
        assert (row.price_per_m_input, row.price_per_m_output) == (7, 9)
    send(chain.w3, owner_key, chain.adapters.functions.deactivateAdapter(pirate_id))
    assert sync.sync_changes() == {"pirate": "inactive"}
    assert sync.resolve_unknown("pirate") is None  # a deactivated adapter is not pulled
