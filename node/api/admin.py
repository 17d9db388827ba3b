"""Operator endpoints for the adapter cache: list, load, unload, pin, unpin.

All need `Authorization: Bearer <admin_token>` (settings.admin_token) except in dev mode without a
token. Loading blocks until the adapter is resident in a device slot, so an operator can warm the
adapters they expect before traffic arrives.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from engine.errors import AdapterError, AdapterNotFound
from node.api.deps import EngineDep, require_admin
from node.api.errors import error_responses
from node.errors import ApiError, NotFound

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=error_responses(401, 403, 503))  # noqa: E501

LOAD_TIMEOUT_S = 120.0


class Conflict(ApiError):
    status_code = 409
    error_type = "conflict_error"


class AdapterRow(BaseModel):
    name: str
    tier: str = Field(description="device | loading | host | disk")
    slot: int | None
    refcount: int
    pinned: bool
    rank: int
    content_hash: str
    path: str | None


class AdapterListing(BaseModel):
    adapters: list[AdapterRow]
    stats: dict[str, Any]


def _row(entry) -> AdapterRow:
    spec, tier, slot, refs, pinned = entry
    return AdapterRow(name=spec.name, tier=tier, slot=slot, refcount=refs, pinned=pinned, rank=spec.rank,
                      content_hash=spec.content_hash, path=str(spec.path) if spec.path else None)


def _find(engine, name: str) -> AdapterRow:
    for entry in engine.adapters.list():
        if entry[0].path is not None and entry[0].name == name:
            return _row(entry)
    raise NotFound(f"no adapter named {name!r} is registered", param="name", code="adapter_not_found")


async def _known(request: Request, engine, name: str) -> None:
    """Registered already, or pulled now through the registry sync's hook when the node has one."""
    if engine.has_adapter(name):
        return
    from node.api.openai import resolve_adapter

    await resolve_adapter(request, engine, name, "name")


@router.get("/adapters", response_model=AdapterListing, summary="Every registered adapter and its tier")
async def list_adapters(engine: EngineDep) -> AdapterListing:
    return AdapterListing(adapters=[_row(e) for e in engine.adapters.list() if e[0].path is not None],
                          stats=engine.adapters.stats())


@router.post("/adapters/{name}/load", response_model=AdapterRow, responses=error_responses(404, 409),
             summary="Bring an adapter into a device slot (waits until it is resident)")
async def load_adapter(name: str, request: Request, engine: EngineDep) -> AdapterRow:
    await _known(request, engine, name)
    try:
        slot = await asyncio.to_thread(engine.adapters.load, name, True, LOAD_TIMEOUT_S)
    except AdapterNotFound as exc:
        raise NotFound(str(exc), param="name", code="adapter_not_found") from None
    except AdapterError as exc:
        raise Conflict(str(exc), param="name") from None
    if slot is None:  # every slot held by running requests for the whole wait
        raise Conflict(f"adapter {name!r} did not load within {LOAD_TIMEOUT_S:.0f} s: all slots are in use",
                       param="name", code="load_timeout")
    return _find(engine, name)


@router.post("/adapters/{name}/unload", response_model=AdapterRow, responses=error_responses(404, 409),
             summary="Drop an adapter from the device and host tiers (it stays registered)")
async def unload_adapter(name: str, engine: EngineDep) -> AdapterRow:
    _find(engine, name)
    try:
        engine.adapters.unload(name)
    except AdapterError as exc:  # in use by running requests
        raise Conflict(str(exc), param="name") from None
    return _find(engine, name)


@router.post("/adapters/{name}/pin", response_model=AdapterRow, responses=error_responses(404, 409),
             summary="Keep an adapter resident (never evicted); loads it if needed")
async def pin_adapter(name: str, request: Request, engine: EngineDep) -> AdapterRow:
    await _known(request, engine, name)
    try:
        await asyncio.to_thread(engine.adapters.pin, name)
    except AdapterError as exc:
        raise Conflict(str(exc), param="name") from None
    return _find(engine, name)


@router.delete("/adapters/{name}/pin", response_model=AdapterRow, responses=error_responses(404),
               summary="Let an adapter be evicted again")
async def unpin_adapter(name: str, engine: EngineDep) -> AdapterRow:
    _find(engine, name)
    engine.adapters.unpin(name)
    return _find(engine, name)
