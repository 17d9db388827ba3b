"""Deploying the OpenLoRA contracts and the deployment file that records where they are.

`deploy(w3, account)` deploys DatanetRegistry, AdapterRegistry(datanets), NodeRegistry and
UsageSettlement(token, nodes, thawingPeriod, owner), plus a TestToken when no token address is given
(local chains only: the TestToken refuses other chain ids). The deployment file (JSON) looks like:

    {"chainId": 31337, "block": 1, "deployer": "0x...", "thawingPeriod": 86400, "testToken": true,
     "sourceHash": "<artifacts' sourceHash>",
     "contracts": {"DatanetRegistry": "0x...", "AdapterRegistry": "0x...", "NodeRegistry": "0x...",
                   "UsageSettlement": "0x...", "Token": "0x..."}}

`block` is the first deployment block (where event sync starts).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from node.chain.anvil import DEV_KEYS, LOCAL_CHAIN_IDS
from node.chain.artifacts import load_artifact
from node.chain.errors import ChainError, DeploymentError
from node.chain.tx import Transactor

DEFAULT_THAWING_PERIOD = 24 * 3600
DEPLOYER_KEY_ENV = "OPENLORA_DEPLOYER_KEY"
CONTRACT_KEYS = ("DatanetRegistry", "AdapterRegistry", "NodeRegistry", "UsageSettlement", "Token")


@dataclass
class Deployment:
    chain_id: int
    block: int
    deployer: str
    contracts: dict[str, str]
    thawing_period: int
    test_token: bool
    source_hash: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def address(self, key: str) -> str:
        try:
            return self.contracts[key]
        except KeyError:
            raise DeploymentError(f"deployment has no {key} address") from None

    def to_json(self) -> dict[str, Any]:
        return {"chainId": self.chain_id, "block": self.block, "deployer": self.deployer,
                "thawingPeriod": self.thawing_period, "testToken": self.test_token,
                "sourceHash": self.source_hash, "contracts": dict(self.contracts), **self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Deployment":
        try:
            contracts = {k: Web3.to_checksum_address(data["contracts"][k]) for k in CONTRACT_KEYS}
            known = {"chainId", "block", "deployer", "thawingPeriod", "testToken", "sourceHash", "contracts"}
            return cls(chain_id=int(data["chainId"]), block=int(data["block"]),
                       deployer=Web3.to_checksum_address(data["deployer"]), contracts=contracts,
                       thawing_period=int(data["thawingPeriod"]), test_token=bool(data["testToken"]),
                       source_hash=str(data.get("sourceHash", "")),
                       extra={k: v for k, v in data.items() if k not in known})
        except (KeyError, TypeError, ValueError) as exc:
            raise DeploymentError(f"invalid deployment data: {exc!r}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Writes the file atomically (temp file + rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)
        return path


def load_deployment(path: str | os.PathLike) -> Deployment:
    """Reads a deployment file; DeploymentError when missing or invalid."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeploymentError(f"no deployment file at {path}; run `openlora chain up` or `openlora deploy`") from None
    except (OSError, ValueError) as exc:
        raise DeploymentError(f"cannot read deployment file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise DeploymentError(f"deployment file {path} is not a JSON object")
    return Deployment.from_json(data)


def deployment_problems(w3: Web3, dep: Deployment) -> list[str]:
    """What is wrong with `dep` on the chain behind `w3` (empty when every contract is there)."""
    problems = []
    chain_id = w3.eth.chain_id
    if chain_id != dep.chain_id:
        return [f"deployment is for chain {dep.chain_id}, the RPC serves chain {chain_id}"]
    for key in CONTRACT_KEYS:
        if len(w3.eth.get_code(dep.contracts[key])) == 0:
            problems.append(f"no code at {key} {dep.contracts[key]}")
    return problems


def deployer_account(chain_id: int, key: str | None = None) -> LocalAccount:
    """The deploying account: `key`, else $OPENLORA_DEPLOYER_KEY, else (local chains only) anvil's
    first development key."""
    key = key or os.environ.get(DEPLOYER_KEY_ENV)
    if key:
        try:
            return Account.from_key(key.strip())
        except (ValueError, TypeError) as exc:
            raise DeploymentError(f"invalid deployer key: {exc}") from None
    if chain_id in LOCAL_CHAIN_IDS:
        return Account.from_key(DEV_KEYS[0])
    raise DeploymentError(f"chain {chain_id} is not a local chain: give a deployer key "
                          f"(--key-file FILE or ${DEPLOYER_KEY_ENV})")


def _deploy_one(tx: Transactor, w3: Web3, name: str, *args) -> tuple[str, int]:
    art = load_artifact(name)
    factory = w3.eth.contract(abi=art.abi, bytecode=art.bytecode)
    receipt = tx.send(factory.constructor(*args), f"deploy {name}")
    address = receipt["contractAddress"]
    if not address:
        raise DeploymentError(f"deploying {name} returned no contract address")
    return Web3.to_checksum_address(address), receipt["blockNumber"]


def deploy(w3: Web3, account: LocalAccount, *, token: str | None = None,
           thawing_period: int = DEFAULT_THAWING_PERIOD, owner: str | None = None,
           token_name: str = "OpenLoRA Test USD", token_symbol: str = "tUSD", token_decimals: int = 6) -> Deployment:
    """Deploys every contract from `account`; `token` is an existing ERC-20 (else a TestToken is
    deployed, local chains only); `owner` may change the thawing period (default: the deployer)."""
    chain_id = w3.eth.chain_id
    if token is None and chain_id not in LOCAL_CHAIN_IDS:
        raise DeploymentError(f"chain {chain_id} is not a local chain: give the ERC-20 to settle in (--token ADDRESS)")
    tx = Transactor(w3, account)
    try:
        datanets, first_block = _deploy_one(tx, w3, "DatanetRegistry")
        adapters, _ = _deploy_one(tx, w3, "AdapterRegistry", datanets)
        nodes, _ = _deploy_one(tx, w3, "NodeRegistry")
        if token is None:
            token_address, _ = _deploy_one(tx, w3, "TestToken", token_name, token_symbol, token_decimals)
        else:
            token_address = Web3.to_checksum_address(token)
            if len(w3.eth.get_code(token_address)) == 0:
                raise DeploymentError(f"no contract at token address {token_address}")
        settlement, _ = _deploy_one(tx, w3, "UsageSettlement", token_address, nodes, int(thawing_period),
                                    Web3.to_checksum_address(owner or account.address))
    except DeploymentError:
        raise
    except ChainError as exc:
        raise DeploymentError(f"deployment failed: {exc}") from None
    return Deployment(
        chain_id=chain_id, block=first_block, deployer=account.address,
        contracts={"DatanetRegistry": datanets, "AdapterRegistry": adapters, "NodeRegistry": nodes,
                   "UsageSettlement": settlement, "Token": token_address},
        thawing_period=int(thawing_period), test_token=token is None,
        source_hash=load_artifact("UsageSettlement").source_hash,
    )


def ensure_deployed(w3: Web3, account: LocalAccount, path: str | os.PathLike, **kwargs) -> tuple[Deployment, bool]:
    """The deployment recorded at `path` when all of it is on this chain, else a fresh one (saved to
    `path`); the flag says whether it deployed now."""
    path = Path(path)
    if path.exists():
        try:
            dep = load_deployment(path)
        except DeploymentError:
            dep = None
        if dep is not None and not deployment_problems(w3, dep):
            return dep, False
    dep = deploy(w3, account, **kwargs)
    dep.save(path)
    return dep, True
