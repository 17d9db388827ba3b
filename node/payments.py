"""Who may spend what: payer vouchers, the escrow view, and per-request reservations.

Every paid request ends in the payer-signed cumulative voucher (docs/formats.md `Voucher`) that
UsageSettlement redeems. Before a request runs, the node checks two independent limits and reserves the
request's maximum cost against both:

    voucher cap   the payer's latest cumulativeValue must cover everything this node ever billed the
                  payer (the sum of its receipts) + outstanding reservations + this request's maximum;
    escrow        available = escrow balance - thawing - (billed - collected) - reservations, where
                  balance/thawing/collected are read from UsageSettlement in one block: `balance` is
                  already net of collected debits, so billed - collected is the spend not yet settled.

Both checks and the reservation happen under one asyncio lock per payer, and a finished request is
booked (the ledger's one-transaction `record`) before its reservation is released, so at every instant
billed + reserved counts each request exactly once and concurrent requests cannot overdraw.

The voucher header (`X-OpenLoRA-Voucher`) is base64 of the JSON
    {"voucher": {"payer": "0x..", "nodeId": 1, "cumulativeValue": "123", "timestamp": 1700000000},
     "signature": "0x<65 bytes>"}
(integers may be JSON numbers or decimal strings; cumulative values can exceed 2**53).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy import select

from attribution import models as m
from attribution.db import Database, amount_sum
from attribution.eip712 import Domain
from attribution.errors import InvalidInput, NotFound, SignatureError, VoucherError
from attribution.payers import latest_voucher, store_voucher
from attribution.receipts import VoucherData, recover_signer, sign_digest
from node.errors import NotReady, PaymentRequired

log = logging.getLogger(__name__)

VOUCHER_HEADER = "X-OpenLoRA-Voucher"
MAX_HEADER_BYTES = 4096


# -- vouchers -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SignedVoucher:
    voucher: VoucherData
    signature: str

    def to_json(self) -> dict:
        v = self.voucher
        return {"voucher": {"payer": v.payer, "nodeId": v.node_id, "cumulativeValue": str(v.cumulative_value),
                            "timestamp": v.timestamp}, "signature": self.signature}


def sign_voucher(domain: Domain, private_key, node_id: int, cumulative_value: int, timestamp: int | None = None) -> SignedVoucher:
    """A voucher signed with `private_key` (the payer's): what clients send and what login takes as a cap."""
    from eth_account import Account

    payer = Account.from_key(private_key).address
    v = VoucherData(payer, node_id, cumulative_value, int(time.time()) if timestamp is None else timestamp)
    return SignedVoucher(v, sign_digest(v.digest(domain), private_key))


def encode_voucher_header(sv: SignedVoucher) -> str:
    return base64.b64encode(json.dumps(sv.to_json(), separators=(",", ":")).encode()).decode()


def _as_int(value, what: str) -> int:
    if isinstance(value, bool):
        raise InvalidInput(f"voucher {what} must be an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise InvalidInput(f"voucher {what} must be an integer (a JSON number or decimal string), got {value!r}")


def voucher_from_json(doc) -> SignedVoucher:
    """Parse {"voucher": {...}, "signature": "0x.."}; raises PaymentRequired with the reason."""
    try:
        if not isinstance(doc, dict) or not isinstance(doc.get("voucher"), dict):
            raise InvalidInput('expected {"voucher": {...}, "signature": "0x..."}')
        v = doc["voucher"]
        data = VoucherData(payer=v.get("payer"), node_id=_as_int(v.get("nodeId"), "nodeId"),
                           cumulative_value=_as_int(v.get("cumulativeValue"), "cumulativeValue"),
                           timestamp=_as_int(v.get("timestamp"), "timestamp"))
        sig = doc.get("signature")
        if not isinstance(sig, str):
            raise InvalidInput("voucher signature must be a 0x-hex string")
        return SignedVoucher(data, sig)
    except InvalidInput as exc:
        raise PaymentRequired(f"malformed voucher: {exc}", code="invalid_voucher") from None


def decode_voucher_header(value: str) -> SignedVoucher:
    if len(value) > MAX_HEADER_BYTES:
        raise PaymentRequired(f"{VOUCHER_HEADER} is longer than {MAX_HEADER_BYTES} bytes", code="invalid_voucher")
    try:
        doc = json.loads(base64.b64decode(value.strip(), validate=True))
    except (binascii.Error, ValueError) as exc:
        raise PaymentRequired(f"{VOUCHER_HEADER} must be base64 of a JSON voucher: {exc}", code="invalid_voucher") from None
    return voucher_from_json(doc)


def check_voucher(domain: Domain, node_id: int, sv: SignedVoucher) -> None:
    """The voucher is for this node and this settlement contract, and signed by its payer."""
    if sv.voucher.node_id != node_id:
        raise PaymentRequired(f"voucher is for node {sv.voucher.node_id}; this is node {node_id}", code="invalid_voucher")
    try:
        signer = recover_signer(sv.voucher.digest(domain), sv.signature)
    except SignatureError as exc:
        raise PaymentRequired(f"voucher signature is invalid: {exc}", code="invalid_voucher") from None
    if signer != sv.voucher.payer:
        # Also what a voucher signed for another chain or contract looks like: the digest differs.
        raise PaymentRequired(f"voucher signature does not recover to the payer {sv.voucher.payer} "
                              f"(EIP-712 domain: chainId {domain.chain_id}, verifyingContract {domain.verifying_contract})",
                              code="invalid_voucher")


# -- escrow ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EscrowState:
    """A payer's escrow with this node, read from UsageSettlement at one block."""

    balance: int  # already net of everything collected
    thawing: int  # requested for withdrawal; leaves once thawed, so never spendable
    collected: int  # UsageSettlement.collected[payer][nodeId]
    block: int = 0


class EscrowSource(Protocol):
    def escrow_state(self, payer: str, node_id: int) -> EscrowState: ...


class ContractEscrowSource:
    """UsageSettlement's escrowOf + collected for a payer, both read at the same block so a settlement
    landing between the two calls cannot make the spend look settled twice or not at all."""

    def __init__(self, settlement_contract):
        self.contract = settlement_contract

    def escrow_state(self, payer: str, node_id: int) -> EscrowState:
        from web3 import Web3

        addr = Web3.to_checksum_address(payer)
        block = self.contract.w3.eth.block_number
        balance, thawing, _thaw_end = self.contract.functions.escrowOf(addr, node_id).call(block_identifier=block)
        collected = self.contract.functions.collected(addr, node_id).call(block_identifier=block)
        return EscrowState(int(balance), int(thawing), int(collected), block)


class CachedEscrow:
    """Reads escrow through `source` (blocking web3 calls, run in a thread) and caches each payer's state
    for `ttl_s`. A short cache is safe: deposits only raise availability; settlement lowers balance and
    raises collected by the same amount (net zero to `available`); a withdrawal needs the thawing period
    (at least a minute on chain) before money leaves, far longer than the cache lives."""

    def __init__(self, source: EscrowSource, node_id: int, *, ttl_s: float = 2.0, clock: Callable[[], float] = time.monotonic):
        self.source, self.node_id, self.ttl_s, self.clock = source, node_id, ttl_s, clock
        self._cache: dict[str, tuple[float, EscrowState]] = {}

    async def get(self, payer: str) -> EscrowState:
        hit = self._cache.get(payer)
        now = self.clock()
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        try:
            state = await asyncio.to_thread(self.source.escrow_state, payer, self.node_id)
        except Exception as exc:  # an RPC outage must refuse the request (503), never grant it
            log.warning("escrow read failed for %s: %s", payer, exc)
            raise NotReady("cannot read the payer's escrow from chain right now; retry later",
                           code="escrow_unavailable", retry_after=5) from None
        self._cache[payer] = (now, state)
        return state

    def forget(self, payer: str) -> None:
        self._cache.pop(payer, None)


# -- reservations ---------------------------------------------------------------------------------

@dataclass
class Reservation:
    id: int
    payer: str
    amount: int
    done: bool = False


@dataclass(frozen=True)
class Balance:
    """What a payer can still spend at this node, and why (all integers, base units)."""

    payer: str
    escrow: int
    thawing: int
    collected: int
    billed: int  # sum of every receipt this node signed for the payer
    reserved: int  # running requests' maximum costs
    voucher_cap: int  # latest stored cumulativeValue (0 without a voucher)

    @property
    def unsettled(self) -> int:
        return max(self.billed - self.collected, 0)

    @property
    def available(self) -> int:
        """Escrow not yet spoken for."""
        return self.escrow - self.thawing - self.unsettled - self.reserved

    @property
    def voucher_headroom(self) -> int:
        return self.voucher_cap - self.billed - self.reserved

    def as_json(self) -> dict:
        return {"payer": self.payer, "escrow": str(self.escrow), "thawing": str(self.thawing),
                "collected": str(self.collected), "billed": str(self.billed), "unsettled": str(self.unsettled),
                "reserved": str(self.reserved), "available": str(self.available),
                "voucher_cumulative_value": str(self.voucher_cap)}


def billed_total(db: Database, payer: str, node_id: int) -> int:
    """Sum of the costs of every receipt this node signed for `payer` (exact on every dialect)."""
    with db.reader.begin() as s:
        return s.scalar(select(amount_sum(s, m.Receipt.cost)).where(m.Receipt.payer == payer, m.Receipt.node_id == node_id)) or 0


class PaymentGate:
    """Reservations against the voucher cap and the escrow; one instance per node process."""

    def __init__(self, db: Database, domain: Domain, node_id: int, escrow: CachedEscrow):
        self.db, self.domain, self.node_id, self.escrow = db, domain, node_id, escrow
        self._locks: dict[str, asyncio.Lock] = {}
        self._reserved: dict[str, dict[int, int]] = {}
        self._ids = itertools.count(1)

    def lock(self, payer: str) -> asyncio.Lock:
        # setdefault is atomic under the event loop (no await in between), so one lock per payer
        return self._locks.setdefault(payer, asyncio.Lock())

    def reserved(self, payer: str) -> int:
        return sum(self._reserved.get(payer, {}).values())

    def _voucher_cap(self, payer: str) -> int:
        try:
            return latest_voucher(self.db, payer, self.node_id).voucher.cumulative_value
        except NotFound:
            return 0

    async def balance(self, payer: str) -> Balance:
        payer = payer.lower()
        state = await self.escrow.get(payer)
        billed, cap = await asyncio.to_thread(lambda: (billed_total(self.db, payer, self.node_id), self._voucher_cap(payer)))
        return Balance(payer, state.balance, state.thawing, state.collected, billed, self.reserved(payer), cap)

    async def reserve(self, payer: str, max_cost: int, voucher: SignedVoucher | None = None) -> Reservation:
        """Reserve `max_cost` for `payer`, first storing `voucher` (checked, monotonic) as the new cap.

        Raises PaymentRequired, with what would be needed, and changes nothing, when the voucher is bad
        or too small or the escrow is short."""
        payer = payer.lower()
        if isinstance(max_cost, bool) or not isinstance(max_cost, int) or max_cost < 0:
            raise ValueError(f"max_cost must be a non-negative integer, got {max_cost!r}")
        if voucher is not None:
            check_voucher(self.domain, self.node_id, voucher)
            if voucher.voucher.payer != payer:
                raise PaymentRequired(f"voucher payer {voucher.voucher.payer} is not the caller {payer}", code="invalid_voucher")
        async with self.lock(payer):
            bal = await self.balance(payer)
            need_cap = bal.billed + bal.reserved + max_cost
            cap = bal.voucher_cap
            # the 402 body carries the amount to sign as a field (node.client reads it), not only in prose
            short = {"required": str(need_cap), "node_id": self.node_id}
            if voucher is not None:
                offered = voucher.voucher.cumulative_value
                if offered < bal.voucher_cap:
                    raise PaymentRequired(
                        f"voucher cumulativeValue {offered} is below the latest accepted {bal.voucher_cap}; "
                        f"sign a voucher for at least {need_cap}", code="voucher_too_low", param="cumulativeValue",
                        extra=short)
                cap = offered
            if cap < need_cap:
                raise PaymentRequired(
                    f"voucher does not cover this request: cumulativeValue {cap}, needed at least {need_cap} "
                    f"(billed {bal.billed} + reserved {bal.reserved} + this request's maximum {max_cost})",
                    code="voucher_too_low", param="cumulativeValue", extra=short)
            if bal.available < max_cost:
                raise PaymentRequired(
                    f"insufficient escrow: available {max(bal.available, 0)} (escrow {bal.escrow}, thawing {bal.thawing}, "
                    f"unsettled {bal.unsettled}, reserved {bal.reserved}), this request may cost up to {max_cost}; "
                    f"deposit to UsageSettlement for node {self.node_id}", code="insufficient_escrow",
                    extra={"node_id": self.node_id, "available": str(max(bal.available, 0)), "max_cost": str(max_cost)})
            if voucher is not None:  # store_voucher keeps the newest and ignores a replay
                try:
                    await asyncio.to_thread(store_voucher, self.db, self.domain, voucher.voucher, voucher.signature)
                except (SignatureError, VoucherError) as exc:
                    raise PaymentRequired(f"voucher refused: {exc}", code="invalid_voucher") from None
            r = Reservation(next(self._ids), payer, max_cost)
            self._reserved.setdefault(payer, {})[r.id] = max_cost
            return r

    async def release(self, r: Reservation) -> None:
        """Drop a reservation (idempotent). Call after the request is booked in the ledger, or to cancel."""
        async with self.lock(r.payer):
            self._release_now(r)

    def _release_now(self, r: Reservation) -> None:
        if r.done:
            return
        r.done = True
        held = self._reserved.get(r.payer, {})
        held.pop(r.id, None)
        if not held:
            self._reserved.pop(r.payer, None)

    async def book(self, r: Reservation, record: Callable[[], object]):
        """Run `record` (the ledger write, blocking) and then release `r`, under the payer's lock, so a
        concurrent `reserve` sees the request either as reserved or as billed, never as neither."""
        async with self.lock(r.payer):
            try:
                return await asyncio.to_thread(record)
            finally:
                self._release_now(r)


__all__ = ["VOUCHER_HEADER", "Balance", "CachedEscrow", "ContractEscrowSource", "EscrowSource", "EscrowState", "PaymentGate", "Reservation",
           "SignedVoucher", "billed_total", "check_voucher", "decode_voucher_header", "encode_voucher_header",
           "sign_voucher", "voucher_from_json"]
