"""`openlora node register`: register this node (its key as signer) in NodeRegistry; saves node_id."""

from __future__ import annotations

import argparse

from eth_account import Account
from web3.logs import DISCARD  # other contracts' logs in the same receipt are not ours

from node.errors import ConfigError


def chain_parts(settings):
    """(web3, deployment, contract factory) from the settings' RPC URL and deployment file."""
    from node.chain.artifacts import load_artifact
    from node.chain.deploy import load_deployment
    from node.chain.tx import connect

    w3 = connect(settings.rpc_url)
    dep = load_deployment(settings.resolved_deployment_file)

    def contract(name: str):
        key = "Token" if name == "TestToken" else name
        return w3.eth.contract(address=dep.address(key), abi=load_artifact(name).abi)

    return w3, dep, contract


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("node", help="this node on chain", description="Manage this node's on-chain registration.")
    nsub = p.add_subparsers(dest="node_command", metavar="ACTION")
    nsub.required = True
    r = nsub.add_parser("register", help="register in NodeRegistry", description=(
        "Register this node in NodeRegistry with the node key as signer (and operator), and save the "
        "assigned node_id in the config file."))
    r.add_argument("--endpoint", required=True, help="the node's public URL")
    r.add_argument("--base-model", help="base model id (default: the served model name)")
    r.set_defaults(func=_register)


def _register(args, settings) -> int:
    from pathlib import Path

    from node import keys
    from node.chain.tx import Transactor
    from node.cli.init import config_path, update_config

    if settings.node_id is not None:
        raise ConfigError(f"this node is already registered as node {settings.node_id}")
    key = keys.load_key(settings.resolved_keystore_file)
    acct = Account.from_key(key)
    w3, _dep, contract = chain_parts(settings)
    nodes = contract("NodeRegistry")
    base = args.base_model or settings.served_model_name or Path(settings.model).name
    receipt = Transactor(w3, acct).send(nodes.functions.registerNode(acct.address, args.endpoint, base), "registerNode")
    (event,) = nodes.events.NodeRegistered().process_receipt(receipt, errors=DISCARD)
    node_id = int(event["args"]["nodeId"])
    update_config(config_path(args), node_id=node_id)
    print(f"registered node {node_id} (signer {acct.address}, base model {base}); node_id saved to {config_path(args)}")
    return 0
