"""Payers: API keys (stored as SHA-256 only) and the latest signed cumulative voucher per (payer, node).

A voucher (docs/formats.md) is the payer's signed promise that the node may collect up to
`cumulativeValue` in total; the ledger keeps only the newest one, refuses one that lowers the total, and
checks its signature recovers to the payer before storing it. Settlement debits are backed by it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import select

from attribution import models as m
from attribution.db import Database, utcnow
from attribution.eip712 import Domain, normalize_address
from attribution.errors import NotFound, SignatureError, VoucherError
from attribution.ledger import _payer_id
from attribution.receipts import VoucherData, recover_signer

KEY_PREFIX = "olk_"


def _hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_api_key(db: Database, payer: str, label: str = "") -> str:
    """A new API key for `payer`; the plaintext is returned once and never stored."""
    payer = normalize_address(payer, "payer")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with db.writer.begin() as s:
        s.add(m.ApiKey(payer_id=_payer_id(s, payer), key_hash=_hash_key(key), prefix=key[:10], label=label[:100],
                       created_at=utcnow()))
    return key


def payer_for_api_key(db: Database, key: str) -> str:
    """The payer address an API key belongs to; NotFound for unknown or revoked keys."""
    if not isinstance(key, str) or not key.startswith(KEY_PREFIX):
        raise NotFound("unknown API key")
    with db.reader.begin() as s:
        row = s.execute(select(m.Payer.address, m.ApiKey.revoked_at).join(m.ApiKey, m.ApiKey.payer_id == m.Payer.id)
                        .where(m.ApiKey.key_hash == _hash_key(key))).first()
    if row is None or row.revoked_at is not None:
        raise NotFound("unknown or revoked API key")
    return row.address


def revoke_api_key(db: Database, key: str) -> None:
    with db.writer.begin() as s:
        row = s.scalar(select(m.ApiKey).where(m.ApiKey.key_hash == _hash_key(key)))
        if row is None:
            raise NotFound("unknown API key")
        row.revoked_at = row.revoked_at or utcnow()


@dataclass(frozen=True)
class StoredVoucher:
    voucher: VoucherData
    signature: str


def store_voucher(db: Database, domain: Domain, voucher: VoucherData, signature: str) -> StoredVoucher:
    """Keep `voucher` as the payer's latest for its node, after checking it is signed by the payer and
    does not lower the cumulative value (an older voucher replayed changes nothing and is refused)."""
    signer = recover_signer(voucher.digest(domain), signature)
    if signer != voucher.payer:
        raise SignatureError(f"voucher is signed by {signer}, not by the payer {voucher.payer}")
    with db.writer.begin() as s:
        payer_id = _payer_id(s, voucher.payer)
        row = s.get(m.PayerVoucher, (payer_id, voucher.node_id))
        if row is None:
            s.add(m.PayerVoucher(payer_id=payer_id, node_id=voucher.node_id, cumulative_value=voucher.cumulative_value,
                                 timestamp=voucher.timestamp, signature=signature, updated_at=utcnow()))
        elif voucher.cumulative_value < row.cumulative_value:
            raise VoucherError(f"voucher lowers the cumulative value from {row.cumulative_value} to {voucher.cumulative_value}")
        elif voucher.cumulative_value == row.cumulative_value and voucher.timestamp <= row.timestamp:
            pass  # a replay or an equal older voucher: keep the stored one
        else:
            row.cumulative_value, row.timestamp, row.signature, row.updated_at = (
                voucher.cumulative_value, voucher.timestamp, signature, utcnow())
    return latest_voucher(db, voucher.payer, voucher.node_id)


def latest_voucher(db: Database, payer: str, node_id: int) -> StoredVoucher:
    payer = normalize_address(payer, "payer")
    with db.reader.begin() as s:
        row = s.execute(select(m.PayerVoucher).join(m.Payer, m.Payer.id == m.PayerVoucher.payer_id)
                        .where(m.Payer.address == payer, m.PayerVoucher.node_id == node_id)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"no voucher from payer {payer} for node {node_id}")
        return StoredVoucher(VoucherData(payer, node_id, row.cumulative_value, row.timestamp), row.signature)


