"""A real anvil (npm @foundry-rs/anvil) with the contracts deployed once per session; every test runs
inside an EVM snapshot that is reverted afterwards, so tests see a fresh deployment and stay fast."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from eth_account import Account

from node.chain.anvil import DEV_KEYS, Anvil, find_anvil
from node.chain.client import ChainClient
from node.chain.deploy import deploy
from node.chain.tx import connect

THAW = 120  # seconds; tests move time with evm_increaseTime


@dataclass(frozen=True)
class Actor:
    key: str
    address: str


def _actor(i: int) -> Actor:
    return Actor(DEV_KEYS[i], Account.from_key(DEV_KEYS[i]).address)


@pytest.fixture(scope="session")
def anvil_node():
    find_anvil()  # installed by `make test`; raises AnvilError (a failure, never a skip) when missing
    with Anvil() as node:
        yield node


@pytest.fixture(scope="session")
def w3(anvil_node):
    return connect(anvil_node.url)


@pytest.fixture(scope="session")
def deployment(w3):
    return deploy(w3, Account.from_key(DEV_KEYS[0]), thawing_period=THAW)


@pytest.fixture
def fresh_chain(w3, deployment):
    """Reverts every change a test makes to the chain."""
    snap = w3.provider.make_request("evm_snapshot", [])["result"]
    yield w3
    w3.provider.make_request("evm_revert", [snap])


@pytest.fixture
def actors():
    """Named dev accounts: deployer 0, operator 1, signer 2, payer 3, adapter owner 4, contributor 5, stranger 6,
    second payer 7."""
    names = ("deployer", "operator", "signer", "payer", "adapter_owner", "contributor", "stranger", "payer2")
    return type("Actors", (), {n: _actor(i) for i, n in enumerate(names)})


@pytest.fixture
def chain(fresh_chain, deployment):
    """A read-only client; `chain.with_account(actors.x.key)` to act."""
    return ChainClient(fresh_chain, deployment)


@pytest.fixture
def advance_time(fresh_chain):
    """advance_time(seconds): moves the chain's clock forward and mines a block."""

    def advance(seconds: int) -> None:
        fresh_chain.provider.make_request("evm_increaseTime", [seconds])
        fresh_chain.provider.make_request("evm_mine", [])

    return advance
