"""Registry round trips through the Python client against the deployed contracts."""

from __future__ import annotations

import hashlib

import pytest

from node.chain.client import AdapterSpec
from node.chain.errors import ChainError, ContractRevert

pytestmark = pytest.mark.anvil


def test_datanet_round_trip(chain, actors):
    owner = chain.with_account(actors.contributor.key)
    h = hashlib.sha256(b"datanet metadata").digest()
    did = owner.create_datanet("ipfs://datanet-1", h)
    assert did == 1 and chain.datanet_count() == 1
    d = chain.get_datanet(did)
    assert (d.owner, d.metadata_uri, d.content_hash) == (actors.contributor.address, "ipfs://datanet-1", h)
    owner.update_datanet_metadata(did, "ipfs://datanet-1b", "0x" + "ab" * 32)
    assert chain.get_datanet(did).metadata_uri == "ipfs://datanet-1b"
    owner.transfer_datanet(did, actors.stranger.address)
    assert chain.get_datanet(did).owner == actors.stranger.address
    with pytest.raises(ContractRevert) as exc:
        owner.update_datanet_metadata(did, "x", h)
    assert exc.value.error == "NotDatanetOwner"
    assert exc.value.error_args == {"datanetId": did, "caller": actors.contributor.address}
    with pytest.raises(ContractRevert, match=r"UnknownDatanet\(datanetId=9\)"):
        chain.get_datanet(9)


def test_adapter_round_trip(chain, actors):
    did = chain.with_account(actors.contributor.key).create_datanet("ipfs://d", b"\x01" * 32)
    owner = chain.with_account(actors.adapter_owner.key)
    weights = hashlib.sha256(b"adapter weights").digest()
    spec = AdapterSpec(name="sql-helper", base_model="smollm2-135m-instruct", content_hash=weights,
                       uri="file:///adapters/sql-helper.tar", datanet_id=did, price_per_m_input=2_000_000,
                       price_per_m_output=6_000_000, owner_bps=6_000, contributors_bps=3_000, operator_bps=1_000)
    aid = owner.register_adapter(spec)
    other = owner.register_adapter(AdapterSpec(name="chat", base_model="other-base", content_hash=weights, uri="u"))
    a = chain.get_adapter(aid)
    assert (a.adapter_id, a.owner, a.name, a.base_model, a.content_hash, a.uri, a.datanet_id) == (
        aid, actors.adapter_owner.address, "sql-helper", "smollm2-135m-instruct", weights, spec.uri, did)
    assert (a.price_per_m_input, a.price_per_m_output, a.version, a.active) == (2_000_000, 6_000_000, 1, True)
    assert (a.owner_bps, a.contributors_bps, a.operator_bps) == (6_000, 3_000, 1_000)
    assert chain.adapters_by_base_model("smollm2-135m-instruct") == [aid]
    assert chain.adapters_by_base_model("other-base") == [other]
    assert chain.quote(aid, 1_000, 500) == 1_000 * 2 + 500 * 6
    assert owner.update_adapter_content(aid, "file:///v2.tar", b"\x02" * 32) == 2
    assert owner.update_adapter_price(aid, 1, 1) == 3
    a = chain.get_adapter(aid)
    assert (a.version, a.uri, a.content_hash, a.price_per_m_input) == (3, "file:///v2.tar", b"\x02" * 32, 1)
    assert [x.adapter_id for x in chain.iter_adapters(page=1)] == [aid, other]
    assert chain.adapter_count() == 2
    owner.deactivate_adapter(aid)
    assert not chain.get_adapter(aid).active
    with pytest.raises(ContractRevert) as exc:
        owner.update_adapter_price(aid, 5, 5)
    assert exc.value.error == "AdapterInactive"


def test_adapter_registration_is_validated(chain, actors):
    owner = chain.with_account(actors.adapter_owner.key)
    base = dict(name="a", base_model="m", content_hash=b"\x01" * 32, uri="u")
    with pytest.raises(ContractRevert) as exc:
        owner.register_adapter(AdapterSpec(**base, owner_bps=5_000))
    assert exc.value.error == "BadSplit" and exc.value.error_args["ownerBps"] == 5_000
    with pytest.raises(ContractRevert, match="ContributorsWithoutDatanet"):
        owner.register_adapter(AdapterSpec(**base, owner_bps=5_000, contributors_bps=5_000))
    with pytest.raises(ContractRevert, match="UnknownDatanet"):
        owner.register_adapter(AdapterSpec(**base, datanet_id=3))


def test_node_round_trip(chain, actors):
    op = chain.with_account(actors.operator.key)
    nid = op.register_node(actors.signer.address, "http://127.0.0.1:8000", "smollm2-135m-instruct")
    n = chain.get_node(nid)
    assert (n.node_id, n.operator, n.signer, n.endpoint, n.base_model, n.active) == (
        nid, actors.operator.address, actors.signer.address, "http://127.0.0.1:8000", "smollm2-135m-instruct", True)
    op.rotate_signer(nid, actors.stranger.address)
    assert chain.signer_of(nid) == actors.stranger.address
    op.update_endpoint(nid, "https://node.example")
    assert chain.get_node(nid).endpoint == "https://node.example"
    with pytest.raises(ContractRevert, match="SameSigner"):
        op.rotate_signer(nid, actors.stranger.address)
    op.deactivate_node(nid)
    assert not chain.get_node(nid).active and chain.node_count() == 1


def test_writes_need_an_account(chain):
    with pytest.raises(ChainError, match="no account"):
        chain.create_datanet("ipfs://x", b"\x00" * 32)
