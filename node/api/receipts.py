"""`GET /v1/receipts/{id}`: the node-signed EIP-712 receipt of a request and, once batched, its Merkle proof.

A non-streaming answer carries its receipt id and is sent before the request is booked (a payer is never
charged for an answer that was not sent), so a client asking right after the answer may arrive while the
booking runs: the route waits for a booking in flight for that id (at most BOOKING_WAIT_S), then answers.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Depends

from attribution import models as m
from attribution.batches import receipt_proof
from attribution.eip712 import to_bytes32
from attribution.errors import NotFound as LedgerNotFound
from attribution.receipts import ReceiptData, to_signed_json
from node.accounting import Money, get_money
from node.errors import NotFound

router = APIRouter(tags=["receipts"])
MoneyDep = Annotated[Money, Depends(get_money)]
BOOKING_WAIT_S = 5.0


def receipt_document(money: Money, receipt_id: str) -> dict:
    with money.db.reader.begin() as s:
        rc = s.get(m.Receipt, receipt_id)
        if rc is None:
            raise NotFound(f"no receipt {receipt_id!r} on this node", param="receipt_id")
        data = ReceiptData(request_id=to_bytes32(rc.request_hash, "requestId"), payer=rc.payer, node_id=rc.node_id,
                           adapter_ids=tuple(json.loads(rc.adapter_ids)), input_tokens=rc.input_tokens,
                           output_tokens=rc.output_tokens, cost=rc.cost,
                           attribution_digest=to_bytes32(rc.attribution_digest, "attributionDigest"),
                           timestamp=rc.timestamp)
        signer = rc.signer
    doc = {"id": receipt_id, "object": "receipt", "signer": signer, **to_signed_json(money.ledger.domain, data, rc.signature)}
    try:
        p = receipt_proof(money.db, receipt_id)
    except LedgerNotFound:
        doc["settlement"] = None  # not in a batch yet
    else:
        doc["settlement"] = {"batch_id": p.batch_id, "status": p.status, "merkle_root": p.root, "leaf": p.leaf,
                             "proof": list(p.proof), "settled": p.status == "confirmed"}
    return doc


@router.get("/v1/receipts/{receipt_id}")
async def get_receipt(receipt_id: str, money: MoneyDep) -> dict:
    if not 0 < len(receipt_id) <= 128:
        raise NotFound("no such receipt", param="receipt_id")
    wait = getattr(money.accountant, "wait_booked", None)
    if wait is not None:
        await wait(receipt_id, BOOKING_WAIT_S)
    return await asyncio.to_thread(receipt_document, money, receipt_id)
