"""The ledger's write side: `Ledger.record(FinishedRequest)` and the chain mirror it prices against.

`record` is one transaction: the request, its per-adapter usage, per-contributor influence, the credits
it owes each payee, the running payee balances and the node-signed receipt are written together or not
at all. It is idempotent by request id: recording the same request again returns the first result;
recording a different request under a used id is a ConflictError. Concurrent writers are safe: on SQLite
write transactions take the write lock up front (BEGIN IMMEDIATE, see db.py); on PostgreSQL a racing
insert of the same id hits the primary key and is re-read.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from eth_account import Account
from eth_utils import keccak
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from attribution import models as m
from attribution.db import Database, utcnow
from attribution.eip712 import Domain, hex32, normalize_address
from attribution.errors import ConflictError, InvalidInput, NotFound
from attribution.pricing import AdapterTerms, Pricing, price_request
from attribution.receipts import ReceiptData, attribution_digest, request_hash, sign_digest
from attribution.shares import BPS, ContributorShare


@dataclass(frozen=True)
class AdapterUse:
    adapter_id: int
    weight_bps: int = BPS


@dataclass(frozen=True)
class FinishedRequest:
    """A served request as plain data, handed to the ledger by the node when the stream ends."""

    request_id: str
    payer: str
    node_id: int
    adapters: tuple[AdapterUse, ...]
    prompt_tokens: int
    completion_tokens: int
    received_at: dt.datetime
    finished_at: dt.datetime
    first_token_at: dt.datetime | None = None
    status: str = "completed"
    # adapter id -> contributor shares from Proof of Attribution (poa.score_shares); None: not scored
    contributor_shares: Mapping[int, Sequence[ContributorShare]] | None = None

    def canonical_json(self) -> str:
        """Everything that defines the request, canonically; its hash decides 'same request or not'."""
        shares = {str(a): sorted([s.address.lower(), repr(float(s.score)), s.share_bps] for s in ss)
                  for a, ss in (self.contributor_shares or {}).items()}
        return json.dumps({
            "id": self.request_id, "payer": self.payer.lower(), "node": self.node_id,
            "adapters": [[u.adapter_id, u.weight_bps] for u in self.adapters],
            "tokens": [self.prompt_tokens, self.completion_tokens],
            "times": [_iso(self.received_at), _iso(self.first_token_at), _iso(self.finished_at)],
            "status": self.status, "shares": shares,
        }, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class LedgerConfig:
    node_id: int
    operator: str  # address credited with the operator's part
    chain_id: int
    settlement_contract: str  # UsageSettlement address, the EIP-712 verifyingContract
    base_price_per_m_input: int = 0  # price of requests served by the base model alone
    base_price_per_m_output: int = 0

    @property
    def domain(self) -> Domain:
        return Domain(self.chain_id, self.settlement_contract)


@dataclass(frozen=True)
class Recorded:
    request_id: str
    cost: int
    receipt_digest: str
    created: bool  # False when the request had been recorded before (idempotent replay)
    credits: tuple[tuple[str, str, int, int], ...] = field(default=())  # (payee, role, adapter_id, amount)


@dataclass(frozen=True)
class AdapterInfo:
    """An AdapterRegistry entry, as node/chain reads it."""

    adapter_id: int
    owner: str
    price_per_m_input: int
    price_per_m_output: int
    owner_bps: int
    contributors_bps: int
    operator_bps: int
    datanet_id: int | None = None
    name: str = ""
    content_hash: str = ""
    active: bool = True
    synced_block: int = 0


class Ledger:
    """Records requests and mirrors the registries. One instance per process; thread-safe."""

    def __init__(self, db: Database, config: LedgerConfig, node_key) -> None:
        self.db = db
        self.config = config
        self.operator = normalize_address(config.operator, "operator")
        self.domain = config.domain
        self._key = node_key  # never logged; only used to sign receipts
        self.signer = Account.from_key(node_key).address.lower()

    # -- chain mirror -----------------------------------------------------------------------------

    def upsert_datanet(self, datanet_id: int, owner: str, *, name: str = "", metadata_uri: str = "", synced_block: int = 0) -> None:
        _check_id(datanet_id, "datanet id")
        owner = normalize_address(owner, "datanet owner")
        with self.db.writer.begin() as s:
            row = s.get(m.Datanet, datanet_id)
            if row is None:
                s.add(m.Datanet(id=datanet_id, owner=owner, name=name, metadata_uri=metadata_uri, synced_block=synced_block))
            else:
                row.owner, row.name, row.metadata_uri, row.synced_block = owner, name, metadata_uri, synced_block

    def upsert_adapter(self, info: AdapterInfo) -> None:
        _check_id(info.adapter_id, "adapter id")
        terms = _terms(info)  # validates prices and split
        with self.db.writer.begin() as s:
            if info.datanet_id is not None and s.get(m.Datanet, info.datanet_id) is None:
                raise NotFound(f"adapter {info.adapter_id}: Datanet {info.datanet_id} is not mirrored yet")
            values = dict(owner=terms.owner, datanet_id=info.datanet_id, name=info.name, content_hash=info.content_hash,
                          price_per_m_input=info.price_per_m_input, price_per_m_output=info.price_per_m_output,
                          owner_bps=info.owner_bps, contributors_bps=info.contributors_bps,
                          operator_bps=info.operator_bps, active=info.active, synced_block=info.synced_block)
            row = s.get(m.Adapter, info.adapter_id)
            if row is None:
                s.add(m.Adapter(id=info.adapter_id, **values))
            else:
                for k, v in values.items():
                    setattr(row, k, v)

    # -- the request log --------------------------------------------------------------------------

    def record(self, req: FinishedRequest) -> Recorded:
        """Write one finished request (see the module docstring). Raises LedgerError on bad input."""
        _validate(req, self.config.node_id)
        content = hex32(keccak(text=req.canonical_json()))
        for attempt in range(3):
            try:
                with self.db.writer.begin() as s:
                    existing = s.get(m.Request, req.request_id)
                    if existing is not None:
                        return _replay(s, existing, content)
                    return self._insert(s, req, content)
            except IntegrityError:
                # PostgreSQL: another writer inserted the same request id, or the same new rollup or
                # balance row, between our read and our insert. Replay, or retry the transaction.
                with self.db.reader.begin() as s:
                    existing = s.get(m.Request, req.request_id)
                    if existing is not None:
                        return _replay(s, existing, content)
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _insert(self, s: Session, req: FinishedRequest, content: str) -> Recorded:
        payer_id = _payer_id(s, req.payer)
        adapters = {}
        for use in req.adapters:
            row = s.get(m.Adapter, use.adapter_id)
            if row is None:
                raise NotFound(f"adapter {use.adapter_id} is not in the ledger (not mirrored from the registry)")
            adapters[use.adapter_id] = row
        mix = [(_terms(adapters[u.adapter_id]), u.weight_bps) for u in req.adapters]
        shares = req.contributor_shares or {}
        pricing: Pricing = price_request(
            mix, req.prompt_tokens, req.completion_tokens, operator=self.operator, contributor_shares=shares,
            base_price_per_m_input=self.config.base_price_per_m_input,
            base_price_per_m_output=self.config.base_price_per_m_output)

        mix_json = json.dumps([[u.adapter_id, u.weight_bps] for u in req.adapters], separators=(",", ":"))
        s.execute(insert(m.Request).values(
            id=req.request_id, payer_id=payer_id, node_id=req.node_id, adapter_mix=mix_json,
            prompt_tokens=req.prompt_tokens, completion_tokens=req.completion_tokens, received_at=req.received_at,
            first_token_at=req.first_token_at, finished_at=req.finished_at,
            price_per_m_input=pricing.price_per_m_input, price_per_m_output=pricing.price_per_m_output,
            cost=pricing.cost, status=req.status, content_hash=content))
        part_of = dict(pricing.adapter_parts)
        if req.adapters:
            s.execute(insert(m.AdapterUsage), [dict(
                request_id=req.request_id, adapter_id=u.adapter_id, datanet_id=adapters[u.adapter_id].datanet_id,
                weight_bps=u.weight_bps, cost_share=part_of[u.adapter_id], prompt_tokens=req.prompt_tokens,
                completion_tokens=req.completion_tokens, finished_at=req.finished_at) for u in req.adapters])
        influence = []
        for adapter_id, ss in sorted(shares.items()):
            datanet_id = adapters[adapter_id].datanet_id
            for sh in ss:
                influence.append(dict(request_id=req.request_id, adapter_id=adapter_id,
                                      contributor_id=_contributor_id(s, datanet_id, sh.address),
                                      score=float(sh.score), share_bps=sh.share_bps))
        if influence:
            s.execute(insert(m.ContributorInfluence), influence)
        if pricing.credits:
            s.execute(insert(m.RequestCredit), [dict(request_id=req.request_id, payee=c.payee, role=c.role,
                                                     adapter_id=c.adapter_id, amount=c.amount) for c in pricing.credits])
            per_payee: dict[str, int] = {}
            for c in pricing.credits:
                per_payee[c.payee] = per_payee.get(c.payee, 0) + c.amount
            add_to_balances(s, per_payee, "credited")

        hour = req.finished_at.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
        rollups = [("payer", payer_id, hour, pricing.cost)]
        for u in req.adapters:
            rollups.append(("adapter", u.adapter_id, hour, part_of[u.adapter_id]))
            if adapters[u.adapter_id].datanet_id is not None:
                rollups.append(("datanet", adapters[u.adapter_id].datanet_id, hour, part_of[u.adapter_id]))
        add_to_rollups(s, rollups,
                       req.prompt_tokens, req.completion_tokens)

        receipt = ReceiptData(
            request_id=request_hash(req.request_id), payer=req.payer, node_id=req.node_id,
            adapter_ids=tuple(sorted(u.adapter_id for u in req.adapters)), input_tokens=req.prompt_tokens,
            output_tokens=req.completion_tokens, cost=pricing.cost, attribution_digest=attribution_digest(shares),
            timestamp=int(req.finished_at.timestamp()))
        digest = receipt.digest(self.domain)
        s.execute(insert(m.Receipt).values(
            request_id=req.request_id, digest=hex32(digest), request_hash=hex32(receipt.request_id),
            payer=receipt.payer, node_id=req.node_id, adapter_ids=json.dumps(list(receipt.adapter_ids)),
            input_tokens=receipt.input_tokens, output_tokens=receipt.output_tokens, cost=receipt.cost,
            attribution_digest=hex32(receipt.attribution_digest), timestamp=receipt.timestamp,
            chain_id=self.domain.chain_id, verifying_contract=self.domain.verifying_contract,
            signer=self.signer, signature=sign_digest(digest, self._key)))
        return Recorded(req.request_id, pricing.cost, hex32(digest), True,
                        tuple((c.payee, c.role, c.adapter_id, c.amount) for c in pricing.credits))


def add_to_balances(s: Session, amounts: Mapping[str, int], column: str) -> None:
    """Add to payee_balances.<column> (credited or batched), creating rows as needed, in payee order
    so concurrent writers on PostgreSQL lock rows in one order and cannot deadlock."""
    for payee in sorted(amounts):
        amount = amounts[payee]
        row = s.get(m.PayeeBalance, payee, with_for_update=True)
        if row is None:
            s.add(m.PayeeBalance(payee=payee, credited=amount if column == "credited" else 0,
                                 batched=amount if column == "batched" else 0))
            s.flush()
        else:
            setattr(row, column, getattr(row, column) + amount)


def add_to_rollups(s: Session, rows, prompt_tokens: int, completion_tokens: int) -> None:
    """Add one request to the hourly rollups [(scope, scope_id, hour, cost)], in key order (no deadlocks)."""
    merged: dict[tuple[str, int, dt.datetime], list[int]] = {}
    for scope, sid, hour, cost in rows:
        acc = merged.setdefault((scope, sid, hour), [0, 0, 0, 0])
        acc[0] += 1
        acc[1] += prompt_tokens
        acc[2] += completion_tokens
        acc[3] += cost
    for key in sorted(merged):
        n, pt, ct, cost = merged[key]
        row = s.get(m.UsageRollup, key, with_for_update=True)
        if row is None:
            s.add(m.UsageRollup(scope=key[0], scope_id=key[1], hour=key[2], requests=n, prompt_tokens=pt,
                                completion_tokens=ct, cost=cost))
            s.flush()
        else:
            row.requests += n
            row.prompt_tokens += pt
            row.completion_tokens += ct
            row.cost += cost


def _replay(s: Session, existing: m.Request, content: str) -> Recorded:
    if existing.content_hash != content:
        raise ConflictError(f"request {existing.id!r} was already recorded with different content")
    digest = s.scalar(select(m.Receipt.digest).where(m.Receipt.request_id == existing.id))
    credits = s.execute(select(m.RequestCredit.payee, m.RequestCredit.role, m.RequestCredit.adapter_id, m.RequestCredit.amount)
                        .where(m.RequestCredit.request_id == existing.id)
                        .order_by(m.RequestCredit.adapter_id, m.RequestCredit.role, m.RequestCredit.payee)).all()
    return Recorded(existing.id, existing.cost, digest, False, tuple(tuple(c) for c in credits))


def _payer_id(s: Session, address: str) -> int:
    address = address.lower()
    pid = s.scalar(select(m.Payer.id).where(m.Payer.address == address))
    if pid is None:
        pid = s.execute(insert(m.Payer).values(address=address, created_at=utcnow()).returning(m.Payer.id)).scalar_one()
    return pid


def _contributor_id(s: Session, datanet_id: int, address: str) -> int:
    address = normalize_address(address, "contributor")
    cid = s.scalar(select(m.Contributor.id).where(m.Contributor.datanet_id == datanet_id, m.Contributor.address == address))
    if cid is None:
        cid = s.execute(insert(m.Contributor).values(datanet_id=datanet_id, address=address, examples=0)
                        .returning(m.Contributor.id)).scalar_one()
    return cid


def _terms(a) -> AdapterTerms:
    adapter_id = a.adapter_id if isinstance(a, AdapterInfo) else a.id
    return AdapterTerms(adapter_id=adapter_id, owner=normalize_address(a.owner, "adapter owner"),
                        price_per_m_input=a.price_per_m_input, price_per_m_output=a.price_per_m_output,
                        owner_bps=a.owner_bps, contributors_bps=a.contributors_bps, operator_bps=a.operator_bps,
                        has_datanet=a.datanet_id is not None)


def _validate(req: FinishedRequest, node_id: int) -> None:
    if not isinstance(req.request_id, str) or not 0 < len(req.request_id) <= 128:
        raise InvalidInput(f"request id must be a non-empty string of at most 128 characters, got {req.request_id!r}")
    normalize_address(req.payer, "payer")
    if req.node_id != node_id:
        raise InvalidInput(f"request {req.request_id!r} is for node {req.node_id}, this ledger is node {node_id}")
    if req.status not in m.REQUEST_STATUSES:
        raise InvalidInput(f"request status must be one of {m.REQUEST_STATUSES}, got {req.status!r}")
    for name in ("received_at", "finished_at", "first_token_at"):
        v = getattr(req, name)
        if v is None and name == "first_token_at":
            continue
        if not isinstance(v, dt.datetime) or v.tzinfo is None:
            raise InvalidInput(f"{name} must be a timezone-aware datetime, got {v!r}")
    if req.finished_at < req.received_at:
        raise InvalidInput("finished_at is before received_at")
    if not isinstance(req.adapters, tuple) or not all(isinstance(u, AdapterUse) for u in req.adapters):
        raise InvalidInput("adapters must be a tuple of AdapterUse")
    for u in req.adapters:
        _check_id(u.adapter_id, "adapter id")


def _check_id(v, what: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v < 2**63:
        raise InvalidInput(f"{what} must be a positive integer below 2**63, got {v!r}")


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(dt.UTC).isoformat()


__all__ = ["AdapterInfo", "AdapterUse", "FinishedRequest", "Ledger", "LedgerConfig", "Recorded", "signed_receipt_json"]


def signed_receipt_json(db: Database, request_id: str) -> dict:
    """The stored receipt of a request as the signed typed-data document `openlora receipt verify` reads."""
    from attribution.receipts import to_signed_json
    from attribution.eip712 import to_bytes32

    with db.reader.begin() as s:
        r = s.get(m.Receipt, request_id)
        if r is None:
            raise NotFound(f"no receipt for request {request_id!r}")
        data = ReceiptData(request_id=to_bytes32(r.request_hash, "requestId"), payer=r.payer, node_id=r.node_id,
                           adapter_ids=tuple(json.loads(r.adapter_ids)), input_tokens=r.input_tokens,
                           output_tokens=r.output_tokens, cost=r.cost,
                           attribution_digest=to_bytes32(r.attribution_digest, "attributionDigest"), timestamp=r.timestamp)
        return to_signed_json(Domain(r.chain_id, r.verifying_contract), data, r.signature)
