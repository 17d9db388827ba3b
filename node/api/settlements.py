"""`GET /v1/settlements`: settlement batches of this node and how many receipts wait for one."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from node import settlement
from node.accounting import Money, get_money

router = APIRouter(tags=["settlement"])
MoneyDep = Annotated[Money, Depends(get_money)]


@router.get("/v1/settlements")
async def list_settlements(money: MoneyDep, limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict:
    return await asyncio.to_thread(settlement.status, money.db, money.node_id, limit=limit)
