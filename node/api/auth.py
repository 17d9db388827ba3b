"""Payer sign-in (EIP-4361 style challenge, then an API key) and a payer's spending view."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from attribution.eip712 import normalize_address
from attribution.errors import InvalidInput
from node.accounting import Money, get_money
from node.errors import BadRequest
from node.payments import voucher_from_json

router = APIRouter(tags=["payments"])
MoneyDep = Annotated[Money, Depends(get_money)]


class ChallengeIn(BaseModel):
    address: str = Field(description="the payer's 0x address")


class LoginIn(BaseModel):
    message: str = Field(description="the challenge message, exactly as issued")
    signature: str = Field(description="personal_sign (EIP-191) signature of the message")
    voucher: dict = Field(description='{"voucher": {payer, nodeId, cumulativeValue, timestamp}, "signature": "0x.."}: '
                                      "the key's spending cap")
    label: str = Field(default="", max_length=100)


@router.post("/v1/auth/challenge")
async def challenge(body: ChallengeIn, money: MoneyDep) -> dict:
    c = money.signin.challenge(body.address)
    return {"message": c.message, "nonce": c.nonce, "expires_at": int(c.expires_at), "node_id": money.node_id,
            "eip712_domain": money.ledger.domain.as_json()}


@router.post("/v1/auth/login")
async def login(body: LoginIn, money: MoneyDep) -> dict:
    voucher = voucher_from_json(body.voucher)
    payer, key = await asyncio.to_thread(money.signin.login, body.message, body.signature, voucher, body.label)
    # the key is shown here once; the ledger keeps only its SHA-256
    return {"api_key": key, "payer": payer, "spending_cap": str(voucher.voucher.cumulative_value)}


@router.get("/v1/payers/{address}")
async def payer_balance(address: str, money: MoneyDep) -> dict:
    """What the payer can spend here, and the EIP-712 domain its vouchers must be signed for."""
    try:
        address = normalize_address(address, "address")
    except InvalidInput as exc:
        raise BadRequest(str(exc), param="address") from None
    bal = await money.gate.balance(address)
    return {**bal.as_json(), "node_id": money.node_id, "eip712_domain": money.ledger.domain.as_json()}
