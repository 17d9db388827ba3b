"""Usage and earnings: a payer's own usage (API key), and public per-adapter and per-Datanet earnings."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from attribution import queries
from node.accounting import Money, get_money, ledger_errors
from node.errors import BadRequest

router = APIRouter(tags=["usage"])
MoneyDep = Annotated[Money, Depends(get_money)]
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
# ids are stored as SQL BIGINT: a larger one cannot exist, and binding it would overflow (a 500) in SQLite
LedgerId = Annotated[int, Path(ge=0, le=2**63 - 1)]


def _range(start: int | None, end: int | None) -> tuple[dt.datetime, dt.datetime]:
    """Unix seconds -> a half-open UTC range; default: all time."""
    try:
        lo = EPOCH if start is None else dt.datetime.fromtimestamp(start, dt.UTC)
        hi = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1) if end is None else dt.datetime.fromtimestamp(end, dt.UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise BadRequest(f"bad time range: {exc}") from None
    if hi < lo:
        raise BadRequest("end is before start")
    return lo, hi


def _body(u: queries.Usage, **key) -> dict:
    return {**key, "requests": u.requests, "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "cost": str(u.cost)}


@router.get("/v1/usage")
@ledger_errors
async def my_usage(request: Request, money: MoneyDep, start: Annotated[int | None, Query()] = None,
                   end: Annotated[int | None, Query()] = None) -> dict:
    """The caller's usage (identified like a paid request: API key or voucher header)."""
    payer, _ = await money.accountant.identify(request)
    lo, hi = _range(start, end)
    u = await asyncio.to_thread(queries.usage_by_payer, money.db, payer, lo, hi)
    return _body(u, payer=payer, start=int(lo.timestamp()), end=int(hi.timestamp()))


@router.get("/v1/usage/adapters/{adapter_id}")
@ledger_errors
async def adapter_usage(adapter_id: LedgerId, money: MoneyDep, start: Annotated[int | None, Query()] = None,
                        end: Annotated[int | None, Query()] = None) -> dict:
    """An adapter's usage and earnings (its part of the cost of the requests that used it)."""
    lo, hi = _range(start, end)
    return _body(await asyncio.to_thread(queries.usage_by_adapter, money.db, adapter_id, lo, hi), adapter_id=adapter_id)


@router.get("/v1/usage/datanets/{datanet_id}")
@ledger_errors
async def datanet_usage(datanet_id: LedgerId, money: MoneyDep, start: Annotated[int | None, Query()] = None,
                        end: Annotated[int | None, Query()] = None) -> dict:
    """A Datanet's usage and earnings, over every adapter trained from it."""
    lo, hi = _range(start, end)
    return _body(await asyncio.to_thread(queries.usage_by_datanet, money.db, datanet_id, lo, hi), datanet_id=datanet_id)
