"""`openlora datanet validate|hash|create`: check a Datanet file, print its content hash, register it.

`create` registers the hash in DatanetRegistry (`createDatanet(metadataURI, contentHash)`) from the
node key; the file itself stays where it is, and `--uri` says where others can fetch it (default: its
file:// URI, enough for a local chain). The file is validated before any transaction is sent.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from node.datanet import load_datanet


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datanet", help="validate, hash and register Datanets",
                       description="Datanets: JSONL files of contributed examples (see node/datanet.py).")
    dsub = p.add_subparsers(dest="datanet_command", metavar="ACTION")
    dsub.required = True

    v = dsub.add_parser("validate", help="check a Datanet file and summarise it",
                        description="Check every line of a Datanet file; print its examples per contributor.")
    v.add_argument("file", type=Path)
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=_validate)

    h = dsub.add_parser("hash", help="print a Datanet's canonical content hash",
                        description="Print the canonical content hash (bytes32, 0x-hex) of a valid Datanet.")
    h.add_argument("file", type=Path)
    h.set_defaults(func=_hash)

    c = dsub.add_parser("create", help="register a Datanet in DatanetRegistry",
                        description="Validate a Datanet and register its content hash on chain, owned by the "
                                    "node key.")
    c.add_argument("file", type=Path)
    c.add_argument("--uri", help="metadata URI where the Datanet can be fetched (default: the file's file:// URI)")
    c.set_defaults(func=_create)


def _summary(d) -> dict:
    counts = d.counts()
    return {"file": d.source, "content_hash": d.content_hash, "examples": len(d.examples),
            "chat_examples": sum(e.is_chat for e in d.examples),
            "text_examples": sum(not e.is_chat for e in d.examples), "contributors": counts}


def _validate(args, settings) -> int:
    s = _summary(load_datanet(args.file))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"{s['file']}: valid, {s['examples']} examples ({s['chat_examples']} chat, {s['text_examples']} text) "
          f"from {len(s['contributors'])} contributors")
    for addr, n in s["contributors"].items():
        print(f"  {addr}  {n:>5}")
    print(f"content hash {s['content_hash']}")
    return 0


def _hash(args, settings) -> int:
    print(load_datanet(args.file).content_hash)
    return 0


def _create(args, settings) -> int:
    from node import keys
    from node.chain.client import ChainClient

    d = load_datanet(args.file)  # refuse a bad file before touching the key or the chain
    uri = args.uri or args.file.expanduser().resolve().as_uri()
    key = keys.load_key(settings.resolved_keystore_file)
    client = ChainClient.connect(settings.rpc_url, settings.resolved_deployment_file, key)
    datanet_id = client.create_datanet(uri, d.content_hash)
    print(f"datanet {datanet_id} created: {uri} (content hash {d.content_hash}, {len(d.examples)} examples, "
          f"{len(d.counts())} contributors, owner {client.address})")
    return 0
