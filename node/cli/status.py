"""`openlora status`: this node's identity, chain, and settlement state."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="node, chain and settlement status",
                       description="Show this node's identity, chain and settlement status.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)


def _status(args, settings) -> int:
    from attribution.db import open_database
    from node import keys, settlement
    from node.cli.node_cmd import chain_parts

    out = {"node_id": settings.node_id, "rpc_url": settings.rpc_url, "database": settings.resolved_database_url}
    if settings.resolved_keystore_file.exists():
        out["node_key"] = keys.keystore_address(settings.resolved_keystore_file)
    w3, dep, contract = chain_parts(settings)
    out["chain_id"] = w3.eth.chain_id
    out["block"] = w3.eth.block_number
    out["contracts"] = dep.contracts
    if settings.node_id is not None:
        signer, active = contract("NodeRegistry").functions.signerAndStatus(settings.node_id).call()
        out["signer_on_chain"], out["active"] = signer, active
        db = open_database(settings.resolved_database_url)
        try:
            st = settlement.status(db, settings.node_id, limit=10)
        finally:
            db.dispose()
        out["unbatched_receipts"] = st["unbatched_receipts"]
        out["recent_batches"] = [{k: b[k] for k in ("batch_id", "status", "receipt_count", "total", "tx_hash", "last_error")}
                                 for b in st["batches"]]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for k, v in out.items():
        if k == "recent_batches":
            print("recent batches:")
            for b in v:
                print(f"  {b['batch_id'][:18]}… {b['status']:10} {b['receipt_count']:>6} receipts  total {b['total']}"
                      + (f"  error: {b['last_error']}" if b["last_error"] else ""))
        else:
            print(f"{k:20} {v}")
    return 0
