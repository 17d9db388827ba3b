"""`GET /v1/rewards/{address}`: what a payee (adapter owner, contributor, operator) has earned here."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends

from attribution import queries
from attribution.eip712 import normalize_address
from attribution.errors import InvalidInput
from node.accounting import Money, get_money
from node.errors import BadRequest, NotReady

router = APIRouter(tags=["rewards"])
MoneyDep = Annotated[Money, Depends(get_money)]


def rewards_of(money: Money, address: str) -> dict:
    try:
        address = normalize_address(address, "address")
    except InvalidInput as exc:
        raise BadRequest(str(exc), param="address") from None
    r = queries.rewards(money.db, address)
    try:
        on_chain = money.settlement_contract.functions.claimable(money.w3.to_checksum_address(address)).call()
    except Exception as exc:  # the ledger's figures are still worth showing when the RPC is down
        raise NotReady(f"cannot read claimable balance from chain: {exc}", code="chain_unavailable", retry_after=5) from None
    return {"address": address, "pending": str(r.pending), "in_flight": str(r.in_batch), "settled": str(r.settled),
            "claimable_on_chain": str(on_chain), "total": str(r.total)}


@router.get("/v1/rewards/{address}")
async def get_rewards(address: str, money: MoneyDep) -> dict:
    """pending: earned, not yet in a batch; in_flight: in a batch awaiting the chain; settled: in confirmed
    batches; claimable_on_chain: what `claim()` would pay now (everything settled, less what was claimed,
    across every node)."""
    return await asyncio.to_thread(rewards_of, money, address)
