"""Deploying to anvil, the deployment file, and detecting a deployment that is not on the chain."""

from __future__ import annotations

import json

import pytest
from eth_account import Account

from node.chain.anvil import DEV_KEYS, Anvil
from node.chain.client import ChainClient
from node.chain.deploy import (
    CONTRACT_KEYS,
    Deployment,
    deploy,
    deployer_account,
    deployment_problems,
    ensure_deployed,
    load_deployment,
)
from node.chain.errors import DeploymentError
from node.chain.tx import connect

pytestmark = pytest.mark.anvil


def test_deploy_records_every_contract(fresh_chain, tmp_path):
    w3 = fresh_chain
    dep = deploy(w3, Account.from_key(DEV_KEYS[0]), thawing_period=3600)
    assert set(dep.contracts) == set(CONTRACT_KEYS)
    assert dep.chain_id == 31337 and dep.test_token and dep.thawing_period == 3600
    assert deployment_problems(w3, dep) == []
    path = dep.save(tmp_path / "d" / "deployment.json")
    data = json.loads(path.read_text())
    assert data["chainId"] == 31337 and data["contracts"]["UsageSettlement"] == dep.contracts["UsageSettlement"]
    assert load_deployment(path) == dep
    c = ChainClient.connect(w3.provider.endpoint_uri, path)
    assert c.thawing_period() == 3600
    assert c.settlement.functions.owner().call() == dep.deployer
    assert c.settlement.functions.token().call() == dep.contracts["Token"]
    assert c.adapters.functions.datanets().call() == dep.contracts["DatanetRegistry"]
    assert c.settlement.functions.nodes().call() == dep.contracts["NodeRegistry"]


def test_ensure_deployed_reuses_a_matching_deployment(fresh_chain, tmp_path):
    path = tmp_path / "deployment.json"
    acct = Account.from_key(DEV_KEYS[0])
    first, now = ensure_deployed(fresh_chain, acct, path)
    assert now
    again, now = ensure_deployed(fresh_chain, acct, path)
    assert not now and again == first


def test_ensure_deployed_redeploys_when_the_chain_lost_it(fresh_chain, tmp_path):
    path = tmp_path / "deployment.json"
    stale = Deployment(chain_id=31337, block=1, deployer=Account.from_key(DEV_KEYS[0]).address,
                       contracts={k: "0x" + "11" * 20 for k in CONTRACT_KEYS}, thawing_period=60, test_token=True)
    stale.save(path)
    assert deployment_problems(fresh_chain, stale)
    dep, now = ensure_deployed(fresh_chain, Account.from_key(DEV_KEYS[0]), path)
    assert now and dep != stale and load_deployment(path) == dep


def test_wrong_chain_is_reported(fresh_chain, deployment):
    other = Deployment(**{**deployment.__dict__, "chain_id": 5})
    assert deployment_problems(fresh_chain, other) == ["deployment is for chain 5, the RPC serves chain 31337"]
    with pytest.raises(DeploymentError, match="does not match"):
        ChainClient.connect(fresh_chain.provider.endpoint_uri, other)


def test_bad_deployment_files(tmp_path):
    with pytest.raises(DeploymentError, match="no deployment file"):
        load_deployment(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DeploymentError, match="cannot read"):
        load_deployment(bad)
    bad.write_text(json.dumps({"chainId": 1}))
    with pytest.raises(DeploymentError, match="invalid deployment"):
        load_deployment(bad)


def test_public_chains_need_a_token_and_a_key():
    with pytest.raises(DeploymentError, match="not a local chain"):
        deployer_account(8453)
    assert deployer_account(8453, DEV_KEYS[3]).address == Account.from_key(DEV_KEYS[3]).address
    with pytest.raises(DeploymentError, match="invalid deployer key"):
        deployer_account(31337, "0x1234")
    with Anvil(chain_id=8453) as node:
        w3 = connect(node.url)
        with pytest.raises(DeploymentError, match="--token"):
            deploy(w3, Account.from_key(DEV_KEYS[0]))
        # a token address without code is refused before anything is deployed against it
        with pytest.raises(DeploymentError, match="no contract at token"):
            deploy(w3, Account.from_key(DEV_KEYS[0]), token="0x" + "22" * 20)


def test_deploy_with_an_existing_token(fresh_chain, deployment):
    dep = deploy(fresh_chain, Account.from_key(DEV_KEYS[0]), token=deployment.contracts["Token"], thawing_period=60)
    assert dep.contracts["Token"] == deployment.contracts["Token"] and not dep.test_token
    assert not deployment_problems(fresh_chain, dep)
