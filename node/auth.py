"""API keys for payers who prove control of an address (EIP-4361 "Sign-In with Ethereum" style).

    POST /v1/auth/challenge {address}                  -> a message with a fresh nonce and an expiry
    POST /v1/auth/login {message, signature, voucher}  -> an API key, shown once

The message is signed with `personal_sign` (EIP-191). Login checks that the message is one this node
issued (the nonce is known, unused and unexpired, and the text is exactly what was issued), that the
signature recovers to the challenged address, and that the voucher is signed by that same address for
this node: the voucher's cumulativeValue is the key's spending cap (a later voucher header raises it).
Nonces are single-use and kept in memory: a restart only invalidates sign-ins in progress.
"""

from __future__ import annotations

import datetime as dt
import secrets
import threading
import time
from dataclasses import dataclass

from eth_account import Account
from eth_account.messages import encode_defunct
from eth_utils import is_address, to_checksum_address

from attribution.db import Database
from attribution.eip712 import Domain
from attribution.errors import SignatureError, VoucherError
from attribution.payers import create_api_key, store_voucher
from node.errors import BadRequest, PaymentRequired, Unauthorized
from node.payments import SignedVoucher, check_voucher

CHALLENGE_TTL_S = 300
MAX_OPEN_CHALLENGES = 10_000


@dataclass(frozen=True)
class Challenge:
    address: str
    nonce: str
    message: str
    expires_at: float


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class SignIn:
    def __init__(self, db: Database, domain: Domain, node_id: int, *, site: str = "localhost", uri: str = "http://localhost",
                 ttl_s: float = CHALLENGE_TTL_S, clock=time.time):
        self.db, self.domain, self.node_id = db, domain, node_id
        self.site, self.uri, self.ttl_s, self.clock = site, uri, ttl_s, clock
        self._open: dict[str, Challenge] = {}
        self._lock = threading.Lock()

    def challenge(self, address: str) -> Challenge:
        if not isinstance(address, str) or not is_address(address):
            raise BadRequest(f"address must be a 0x-prefixed 20-byte hex address, got {address!r}", param="address")
        now = self.clock()
        nonce = secrets.token_hex(16)
        message = (
            f"{self.site} wants you to sign in with your Ethereum account:\n"
            f"{to_checksum_address(address)}\n\n"
            f"Sign in to OpenLoRA node {self.node_id} to receive an API key. "
            f"Requests made with the key are paid from your escrow, up to the voucher you sign with this login.\n\n"
            f"URI: {self.uri}\nVersion: 1\nChain ID: {self.domain.chain_id}\nNonce: {nonce}\n"
            f"Issued At: {_iso(now)}\nExpiration Time: {_iso(now + self.ttl_s)}")
        c = Challenge(address.lower(), nonce, message, now + self.ttl_s)
        with self._lock:
            self._expire(now)
            if len(self._open) >= MAX_OPEN_CHALLENGES:
                raise BadRequest("too many sign-ins in progress; retry in a few minutes", code="too_many_challenges")
            self._open[nonce] = c
        return c

    def _expire(self, now: float) -> None:
        for n in [n for n, c in self._open.items() if c.expires_at <= now]:
            del self._open[n]

    def login(self, message: str, signature: str, voucher: SignedVoucher, label: str = "") -> tuple[str, str]:
        """(payer address, API key). Raises Unauthorized / PaymentRequired and changes nothing on failure."""
        if not isinstance(message, str) or not isinstance(signature, str):
            raise BadRequest("message and signature must be strings")
        nonce = next((line.removeprefix("Nonce: ") for line in message.splitlines() if line.startswith("Nonce: ")), None)
        with self._lock:
            self._expire(self.clock())
            c = self._open.get(nonce or "")
            if c is None or c.message != message:
                raise Unauthorized("unknown, used or expired sign-in challenge; request a new one", code="invalid_challenge")
            try:
                signer = Account.recover_message(encode_defunct(text=message), signature=signature).lower()
            except Exception:  # eth-keys raises several types for malformed signatures
                raise Unauthorized("sign-in signature is malformed", code="invalid_signature") from None
            if signer != c.address:
                raise Unauthorized(f"sign-in message is signed by {signer}, not {c.address}", code="invalid_signature")
            if voucher.voucher.payer != c.address:
                raise PaymentRequired("the spending-cap voucher must be signed by the signed-in address", code="invalid_voucher")
            check_voucher(self.domain, self.node_id, voucher)
            del self._open[nonce]  # single use, consumed only by a sign-in that succeeds
        try:
            store_voucher(self.db, self.domain, voucher.voucher, voucher.signature)
        except (SignatureError, VoucherError) as exc:
            raise PaymentRequired(f"voucher refused: {exc}", code="invalid_voucher") from None
        return c.address, create_api_key(self.db, c.address, label)


__all__ = ["Challenge", "SignIn"]
