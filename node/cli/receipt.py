"""`openlora receipt verify FILE` / `receipt show REQUEST_ID`: node-signed EIP-712 usage receipts.

`verify` works offline on a JSON document {"typedData": {...}, "signature": "0x...", "digest"?: "0x..."}
(the typed data of docs/formats.md) and prints the signer the signature recovers to; with --signer it
fails unless that is the expected node signer. `show` prints a stored receipt of the local ledger in
that format.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("receipt", help="verify or show signed usage receipts",
                       description="Verify or show node-signed EIP-712 usage receipts.")
    rsub = p.add_subparsers(dest="receipt_command", metavar="ACTION")
    rsub.required = True
    v = rsub.add_parser("verify", help="check a signed receipt file offline and print its signer")
    v.add_argument("file", type=Path, help="JSON file with typedData and signature ('-' for stdin)")
    v.add_argument("--signer", help="fail unless the receipt was signed by this address")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    v.set_defaults(func=_verify)
    s = rsub.add_parser("show", help="print the signed receipt of a recorded request")
    s.add_argument("request_id")
    s.set_defaults(func=_show)


def _verify(args, settings) -> int:
    import sys

    from attribution.eip712 import hex32, normalize_address
    from attribution.errors import InvalidInput, SignatureError
    from attribution.receipts import verify_signed_json

    try:
        text = sys.stdin.read() if str(args.file) == "-" else args.file.read_text()
        doc = json.loads(text)
    except OSError as exc:
        raise InvalidInput(f"cannot read {args.file}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"{args.file} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInput(f"{args.file} is not a signed receipt document")
    result = verify_signed_json(doc)
    if args.signer and normalize_address(args.signer, "--signer") != result.signer:
        raise SignatureError(f"receipt is signed by {result.signer}, not by {args.signer.lower()}")
    r = result.receipt
    if args.json:
        print(json.dumps({"signer": result.signer, "digest": hex32(result.digest), "chainId": result.domain.chain_id,
                          "verifyingContract": result.domain.verifying_contract, "message": r.message_json()}))
    else:
        print(f"signer  {result.signer}")
        print(f"digest  {hex32(result.digest)}")
        print(f"domain  chainId {result.domain.chain_id}, contract {result.domain.verifying_contract}")
        print(f"receipt request {hex32(r.request_id)}, payer {r.payer}, node {r.node_id}, adapters {list(r.adapter_ids)}, "
              f"tokens {r.input_tokens}+{r.output_tokens}, cost {r.cost}")
    return 0


def _show(args, settings) -> int:
    from attribution.db import open_database
    from attribution.ledger import signed_receipt_json

    db = open_database(settings.resolved_database_url)
    try:
        print(json.dumps(signed_receipt_json(db, args.request_id), indent=2))
    finally:
        db.dispose()
    return 0
