"""`openlora rewards ADDRESS` and `openlora claim`: earnings and their on-chain withdrawal."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("rewards", help="what an address has earned", description=(
        "Show pending (not yet batched), in-flight, settled and claimable rewards of an address."))
    r.add_argument("address")
    r.set_defaults(func=_rewards)
    c = sub.add_parser("claim", help="claim settled rewards on chain", description=(
        "Send UsageSettlement.claim() from a key: the node key, or --keystore FILE (password from "
        "OPENLORA_KEY_PASSWORD or a prompt)."))
    c.add_argument("--keystore", type=Path, help="keystore of the payee (default: the node key)")
    c.set_defaults(func=_claim)


def _rewards(args, settings) -> int:
    from attribution import queries
    from attribution.db import open_database
    from attribution.eip712 import normalize_address
    from node.cli.node_cmd import chain_parts

    address = normalize_address(args.address, "address")
    db = open_database(settings.resolved_database_url)
    try:
        r = queries.rewards(db, address)
    finally:
        db.dispose()
    w3, _dep, contract = chain_parts(settings)
    on_chain = contract("UsageSettlement").functions.claimable(w3.to_checksum_address(address)).call()
    print(f"address             {address}")
    print(f"pending             {r.pending}")
    print(f"in flight           {r.in_batch}")
    print(f"settled             {r.settled}")
    print(f"claimable on chain  {on_chain}")
    return 0


def _claim(args, settings) -> int:
    from eth_account import Account

    from node import keys
    from node.chain.tx import Transactor
    from node.cli.node_cmd import chain_parts
    from node.errors import ConfigError

    key = keys.load_key(args.keystore or settings.resolved_keystore_file)
    acct = Account.from_key(key)
    w3, _dep, contract = chain_parts(settings)
    settlement = contract("UsageSettlement")
    amount = settlement.functions.claimable(acct.address).call()
    if amount == 0:
        raise ConfigError(f"{acct.address} has nothing to claim")
    receipt = Transactor(w3, acct).send(settlement.functions.claim(), "claim")
    print(f"claimed {amount} to {acct.address} (tx {receipt['transactionHash'].hex()})")
    return 0
