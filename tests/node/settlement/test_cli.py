"""The operator CLI end to end on a real anvil: init, node register, adapters publish/sync/list, a paid
request, settle --now, status, rewards, claim."""

from __future__ import annotations

import asyncio
import json
import tomllib

import pytest
from eth_account import Account
from starlette.requests import Request

from node.accounting import build_money, close_money
from node.cli import main
from node.config import load_settings
from node.payments import VOUCHER_HEADER, encode_voucher_header, sign_voucher
from node.serving_types import MaxCostInput, Usage

from chainkit import BASE_MODEL, send


@pytest.fixture
def env(chain, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENLORA_KEY_PASSWORD", "correct horse battery staple")
    monkeypatch.delenv("OPENLORA_CONFIG", raising=False)
    dep_file = tmp_path / "deployment.json"
    chain.extra["deployment"].save(dep_file)
    cfg = tmp_path / "config.toml"
    cfg.write_text("")  # `--config FILE` must exist for the CLI to start; init fills it
    return cfg, dep_file


def cli(cfg, *argv) -> int:
    return main(["--config", str(cfg), *argv])


def test_operator_cli_from_init_to_claim(env, chain, tmp_path, capsys):
    cfg, dep_file = env
    data = tmp_path / "data"
    assert cli(cfg, "init", "--data-dir", str(data), "--rpc-url", chain.anvil.url, "--deployment-file", str(dep_file)) == 0
    keystore = data / "node-key.json"
    doc = json.loads(keystore.read_text())
    address = Account.from_key(Account.decrypt(doc, "correct horse battery staple")).address
    assert "crypto" in doc and (keystore.stat().st_mode & 0o777) == 0o600
    assert cli(cfg, "init", "--data-dir", str(data)) == 1  # never overwrites a key
    chain.w3.provider.make_request("anvil_setBalance", [address, hex(10**21)])
    with open(cfg, "a") as f:
        f.write(f'model = "{BASE_MODEL}"\nsettle_confirmations = 1\n')

    assert cli(cfg, "node", "register", "--endpoint", "http://127.0.0.1:8000") == 0
    node_id = tomllib.loads(cfg.read_text())["node_id"]
    assert node_id == chain.nodes.functions.nodeCount().call() and node_id > 1
    assert chain.nodes.functions.signerOf(node_id).call() == address

    folder = tmp_path / "pirate"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}')
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    assert cli(cfg, "adapters", "publish", str(folder), "--name", "pirate", "--price-in", "1000000",
               "--price-out", "3000000", "--split", "9000,0,1000") == 0
    assert cli(cfg, "adapters", "publish", str(folder), "--name", "bad", "--price-in", "1", "--price-out", "1",
               "--split", "9000,0,999") == 1
    assert cli(cfg, "adapters", "sync", "--download") == 0
    settings = load_settings(cfg)
    assert (settings.resolved_adapter_dir / "pirate" / "adapter_config.json").exists()
    capsys.readouterr()
    assert cli(cfg, "adapters", "list") == 0
    assert "pirate" in capsys.readouterr().out

    # one paid request through the node's own services (what `serve` builds)
    payer = chain.payer()
    payer_addr = Account.from_key(payer).address
    send(chain.w3, payer, chain.token.functions.mint(payer_addr, 10_000))
    send(chain.w3, payer, chain.token.functions.approve(chain.settlement.address, 10_000))
    send(chain.w3, payer, chain.settlement.functions.deposit(node_id, 10_000))
    money = build_money(settings, start_background=False)
    try:
        hdr = encode_voucher_header(sign_voucher(money.ledger.domain, payer, node_id, 10_000))
        req = Request({"type": "http", "headers": [(VOUCHER_HEADER.lower().encode(), hdr.encode())]})

        async def go():
            t = await money.accountant.authorize(req, model="pirate", adapters=["pirate"],
                                                 max_cost_hint=MaxCostInput(100, 100, ("pirate",)))
            return await money.accountant.complete(t, Usage("r1", "pirate", 100, 100, 0.1, 0.2))
        asyncio.run(go())
    finally:
        close_money(money)

    capsys.readouterr()
    assert cli(cfg, "settle", "--now", "--timeout", "30") == 0
    assert "confirmed" in capsys.readouterr().out
    assert cli(cfg, "status", "--json") == 0
    st = json.loads(capsys.readouterr().out)
    assert st["node_id"] == node_id and st["unbatched_receipts"] == 0 and st["recent_batches"][0]["status"] == "confirmed"
    # cost 100 + 300 = 400: 90% to the owner (the node key published it), 10% operator (also the node key)
    assert cli(cfg, "rewards", address) == 0
    out = capsys.readouterr().out
    assert "settled             400" in out and "claimable on chain  400" in out
    before = chain.token.functions.balanceOf(address).call()
    assert cli(cfg, "claim") == 0
    assert chain.token.functions.balanceOf(address).call() == before + 400
    assert cli(cfg, "claim") == 1  # nothing left
