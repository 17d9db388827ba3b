"""GET /v1/models on a paid node (issue 7): the base model, the adapters the engine holds, and every adapter
registered on chain for this base model (mirrored into the ledger by the registry sync) that is not
downloaded yet, each with its registry metadata and whether it is local or pulled on first use.

Real anvil with the contracts, real SQLite ledger, the tiny model under a real uvicorn, adapters packed
and registered on chain with file:// URIs."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import httpx
import openai
import pytest
from eth_account import Account

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "payments"))
from chainkit import BASE_MODEL, chain, send  # noqa: E402,F401
from paidnode import PaidServer, make_lora, paid_settings  # noqa: E402

from node.client import VoucherAuth  # noqa: E402
from node.registry import pack_adapter  # noqa: E402

MESSAGES = [{"role": "user", "content": "Say hello"}]


def _register(chain, owner, name, sha_hex: str, uri: str, datanet: int, prices, split):
    send(chain.w3, owner, chain.adapters.functions.registerAdapter(
        (name, BASE_MODEL, bytes.fromhex(sha_hex), uri, datanet, *prices, *split)))


@pytest.fixture(scope="module")
def registry_node(chain, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("models-node")
    owner = chain.anvil.funded_key()
    pub = root / "published"
    pub.mkdir()
    sha = pack_adapter(make_lora(tiny_llama_dir, root / "src" / "parrot", 3), pub / "parrot.tar.gz")
    uri = (pub / "parrot.tar.gz").as_uri()
    _register(chain, owner, "parrot", sha, uri, 0, (1_000_000, 3_000_000), (8000, 0, 2000))
    send(chain.w3, owner, chain.datanets.functions.createDatanet("ipfs://datanet-1", b"\x01" * 32))
    _register(chain, owner, "macaw", sha, uri, 1, (5, 7), (5000, 3000, 2000))
    _register(chain, owner, "forged", hashlib.sha256(b"not the archive").hexdigest(), uri, 0, (1, 1), (10000, 0, 0))
    server = PaidServer(paid_settings(chain, tiny_llama_dir, root))
    try:
        yield server, owner, sha, uri
    finally:
        server.stop()


def _cards(server) -> dict[str, dict]:
    r = httpx.get(f"{server.url}/v1/models", timeout=30)
    assert r.status_code == 200, r.text
    return {c["id"]: c for c in r.json()["data"]}


def test_registered_adapters_are_listed_before_first_use_with_registry_metadata(registry_node, chain):
    server, owner, sha, uri = registry_node
    owner_addr = Account.from_key(owner).address.lower()
    cards = _cards(server)
    assert set(cards) == {BASE_MODEL, "parrot", "macaw", "forged"}
    assert not (server.app.state.node.settings.resolved_adapter_dir / "parrot").exists()  # nothing pulled yet
    parrot = cards["parrot"]
    assert parrot["parent"] == BASE_MODEL and parrot["object"] == "model"
    assert parrot["openlora"]["kind"] == "adapter" and parrot["openlora"]["availability"] == "on_first_use"
    reg = parrot["openlora"]["registry"]
    assert reg["adapter_id"] == 1 and reg["owner"] == owner_addr
    assert (reg["price_per_m_input"], reg["price_per_m_output"]) == ("1000000", "3000000")
    assert reg["revenue_split"] == {"owner_bps": 8000, "contributors_bps": 0, "operator_bps": 2000}
    assert reg["datanet_id"] is None and reg["content_hash"] == "0x" + sha and reg["uri"] == uri
    macaw = cards["macaw"]["openlora"]["registry"]
    assert macaw["datanet_id"] == 1 and macaw["adapter_id"] == 2 and macaw["price_per_m_output"] == "7"
    assert macaw["revenue_split"] == {"owner_bps": 5000, "contributors_bps": 3000, "operator_bps": 2000}
    one = httpx.get(f"{server.url}/v1/models/macaw").json()
    assert one["openlora"] == cards["macaw"]["openlora"]
    assert httpx.get(f"{server.url}/v1/models/no-such-adapter").status_code == 404
    # the official client lists them too
    listed = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).models.list()
    assert {m.id for m in listed.data} == set(cards)


def test_first_use_makes_it_local_refused_ones_disappear_and_new_registrations_appear(registry_node, chain):
    server, owner, sha, uri = registry_node
    payer = chain.payer(deposit=10**9)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                           http_client=httpx.Client(auth=VoucherAuth(payer), timeout=120))
    client.chat.completions.create(model="parrot", messages=MESSAGES, max_tokens=3)  # pulled and verified
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="forged", messages=MESSAGES, max_tokens=3)  # hash mismatch
    _register(chain, owner, "finch", sha, uri, 0, (2, 4), (10000, 0, 0))
    server.money.registry_sync.sync_changes()  # what the background sync does every registry_sync_s
    cards = _cards(server)
    assert set(cards) == {BASE_MODEL, "parrot", "macaw", "finch"}  # forged is never served: not listed
    parrot = cards["parrot"]["openlora"]
    assert parrot["availability"] == "local" and parrot["rank"] == 4
    assert parrot["registry"]["adapter_id"] == 1 and parrot["registry"]["uri"] == uri
    assert cards["macaw"]["openlora"]["availability"] == "on_first_use"
    finch = cards["finch"]["openlora"]
    assert finch["availability"] == "on_first_use" and finch["registry"]["price_per_m_input"] == "2"
    assert finch["registry"]["adapter_id"] == 4
