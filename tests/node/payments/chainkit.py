"""A real anvil chain with the OpenLoRA contracts deployed (node.chain's anvil and deploy), for the money
tests. Fresh random keys are funded with anvil_setBalance, so no well-known key is relied on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from eth_account import Account
from web3 import Web3

from attribution.db import open_database
from attribution.ledger import AdapterInfo, Ledger, LedgerConfig
from migrations import upgrade
from node.payments import CachedEscrow, ContractEscrowSource, PaymentGate

ROOT = Path(__file__).resolve().parents[3]
OUT = ROOT / "contracts" / "out"
BASE_MODEL = "smollm2-135m-instruct"


PACKAGED = ROOT / "node" / "chain" / "artifacts"


def artifact(name: str) -> dict:
    """abi + creation bytecode: node/chain's packaged artifacts, else Foundry's output."""
    if (PACKAGED / f"{name}.json").exists():
        a = json.loads((PACKAGED / f"{name}.json").read_text())
    else:
        a = json.loads((OUT / f"{name}.sol" / f"{name}.json").read_text())
    code = a["bytecode"]["object"] if isinstance(a["bytecode"], dict) else a["bytecode"]
    return {"abi": a["abi"], "bytecode": code}


class Anvil:
    """node.chain's anvil on a free port, plus a web3 and a funded-key helper."""

    def __init__(self) -> None:
        from node.chain.anvil import Anvil as ChainAnvil

        self.proc = ChainAnvil(extra_args=["--silent"]).start()
        self.url = self.proc.url
        self.w3 = Web3(Web3.HTTPProvider(self.url, request_kwargs={"timeout": 10}))

    def stop(self) -> None:
        self.proc.stop()

    def funded_key(self) -> str:
        acct = Account.create()
        self.w3.provider.make_request("anvil_setBalance", [acct.address, hex(10**21)])
        return "0x" + bytes(acct.key).hex()


def send(w3: Web3, key: str, fn, gas: int | None = None):
    """Sign and send a contract call with `key`; wait for the receipt, raise if it reverted.
    Gas is the estimate plus 30%: an exact estimate can run out of gas where storage refunds apply."""
    acct = Account.from_key(key)
    params = {"from": acct.address, "nonce": w3.eth.get_transaction_count(acct.address, "pending"),
              "chainId": w3.eth.chain_id}
    params["gas"] = gas or fn.estimate_gas(params) * 13 // 10
    raw = acct.sign_transaction(fn.build_transaction(params)).raw_transaction
    rcpt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(raw), timeout=30)
    assert rcpt.status == 1, f"transaction reverted: {getattr(fn, 'fn_name', 'deploy')}"
    return rcpt


def deploy(w3: Web3, key: str, name: str, *args):
    a = artifact(name)
    c = w3.eth.contract(abi=a["abi"], bytecode=a["bytecode"])
    rcpt = send(w3, key, c.constructor(*args))
    return w3.eth.contract(address=rcpt.contractAddress, abi=a["abi"])


@dataclass
class Deployment:
    anvil: Anvil
    deployer: str
    operator: str  # registers the node; credited as operator
    node_key: str  # the node signer: signs receipts, sends settleBatch
    node_id: int
    token: object
    nodes: object
    datanets: object
    adapters: object
    settlement: object
    extra: dict = field(default_factory=dict)

    @property
    def w3(self) -> Web3:
        return self.anvil.w3

    @property
    def chain_id(self) -> int:
        return self.w3.eth.chain_id

    def payer(self, deposit: int = 0) -> str:
        """A fresh funded payer key with `deposit` escrowed for this node."""
        key = self.anvil.funded_key()
        if deposit:
            self.deposit(key, deposit)
        return key

    def deposit(self, key: str, amount: int) -> None:
        addr = Account.from_key(key).address
        send(self.w3, key, self.token.functions.mint(addr, amount))
        send(self.w3, key, self.token.functions.approve(self.settlement.address, amount))
        send(self.w3, key, self.settlement.functions.deposit(self.node_id, amount))


def deploy_all(anvil: Anvil) -> Deployment:
    """node.chain's deployment (thawing period 60 s, the contract's minimum) and one registered node."""
    from node.chain.deploy import deploy as chain_deploy

    w3 = anvil.w3
    deployer, operator, node_key = anvil.funded_key(), anvil.funded_key(), anvil.funded_key()
    dep = chain_deploy(w3, Account.from_key(deployer), thawing_period=60)

    def at(key: str, name: str):
        return w3.eth.contract(address=dep.address(key), abi=artifact(name)["abi"])

    nodes = at("NodeRegistry", "NodeRegistry")
    send(w3, operator, nodes.functions.registerNode(Account.from_key(node_key).address, "http://127.0.0.1:8000", BASE_MODEL))
    return Deployment(anvil, deployer, operator, node_key, 1, at("Token", "TestToken"), nodes,
                      at("DatanetRegistry", "DatanetRegistry"), at("AdapterRegistry", "AdapterRegistry"),
                      at("UsageSettlement", "UsageSettlement"), extra={"deployment": dep})


# -- fixtures (conftest.py files re-export these) ---------------------------------------------

@pytest.fixture(scope="module")
def chain():
    anvil = Anvil()
    try:
        yield deploy_all(anvil)
    finally:
        anvil.stop()


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    d = open_database(url)
    yield d
    d.dispose()


@pytest.fixture
def ledger(db, chain):
    cfg = LedgerConfig(node_id=chain.node_id, operator=Account.from_key(chain.operator).address, chain_id=chain.chain_id,
                       settlement_contract=chain.settlement.address, base_price_per_m_input=1_000_000,
                       base_price_per_m_output=2_000_000)
    return Ledger(db, cfg, chain.node_key)


@pytest.fixture
def gate(ledger, chain):
    # ttl 0: every check reads the chain, so the tests see deposits at once
    return PaymentGate(ledger.db, ledger.domain, chain.node_id,
                       CachedEscrow(ContractEscrowSource(chain.settlement), chain.node_id, ttl_s=0))


@pytest.fixture
def adapter(ledger, chain):
    """One adapter mirrored in the ledger: 1 unit per input token, 3 per output token."""
    owner = Account.create().address
    ledger.upsert_adapter(AdapterInfo(adapter_id=1, owner=owner, price_per_m_input=1_000_000, price_per_m_output=3_000_000,
                                      owner_bps=8000, contributors_bps=0, operator_bps=2000, name="pirate"))
    return owner
