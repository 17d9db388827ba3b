"""Tables of the ledger (SQLAlchemy 2.0 typed declarative). The schema changes only through migrations/.

Usage and influence logs (`requests`, `adapter_usage`, `contributor_influence`, `request_credits`,
`receipts`) are append-only: a request is written once, in one transaction, by `Ledger.record`.
Settlement tables (`settlement_batches`, `batch_receipts`, `batch_debits`, `batch_payouts`) are written
by the batch builder; `batch_receipts.request_id` is UNIQUE, so the database itself refuses to put one
receipt in two batches. Addresses are lowercase 0x-hex (42 chars); chain ids (adapter, Datanet, node)
are the integers the registries assigned.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from attribution.db import Amount, UTCDateTime

# Named constraints so batch migrations on SQLite (which recreate tables) can address them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ADDRESS = 42  # "0x" + 40 hex digits
HASH = 66  # "0x" + 64 hex digits

BATCH_STATUSES = ("pending", "submitted", "confirmed", "failed")
REQUEST_STATUSES = ("completed", "failed", "cancelled")
PAYEE_ROLES = ("owner", "contributor", "operator")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Payer(Base):
    __tablename__ = "payers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    address: Mapped[str] = mapped_column(String(ADDRESS), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class ApiKey(Base):
    """A payer's API key. Only the SHA-256 of the key is kept: keys are 256-bit random, so a plain
    hash is enough (no password stretching needed) and a stolen database cannot be used to call the API."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    payer_id: Mapped[int] = mapped_column(ForeignKey("payers.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart in listings
    label: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class Datanet(Base):
    """Mirror of DatanetRegistry."""

    __tablename__ = "datanets"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner: Mapped[str] = mapped_column(String(ADDRESS))
    name: Mapped[str] = mapped_column(String(200), default="")
    metadata_uri: Mapped[str] = mapped_column(Text, default="")
    synced_block: Mapped[int] = mapped_column(BigInteger, default=0)


class Adapter(Base):
    """Mirror of AdapterRegistry: owner, Datanet, prices (base units per 1M tokens) and revenue split."""

    __tablename__ = "adapters"
    __table_args__ = (
        CheckConstraint("owner_bps + contributors_bps + operator_bps = 10000", name="split_sums_to_10000"),
        CheckConstraint("owner_bps >= 0 AND contributors_bps >= 0 AND operator_bps >= 0", name="split_non_negative"),
    )
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    owner: Mapped[str] = mapped_column(String(ADDRESS), index=True)
    datanet_id: Mapped[int | None] = mapped_column(ForeignKey("datanets.id"), nullable=True, index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    content_hash: Mapped[str] = mapped_column(String(HASH), default="")
    price_per_m_input: Mapped[int] = mapped_column(Amount())
    price_per_m_output: Mapped[int] = mapped_column(Amount())
    owner_bps: Mapped[int] = mapped_column(Integer)
    contributors_bps: Mapped[int] = mapped_column(Integer)
    operator_bps: Mapped[int] = mapped_column(Integer)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    synced_block: Mapped[int] = mapped_column(BigInteger, default=0)


class Contributor(Base):
    """A Datanet contributor (an address that contributed examples to one Datanet)."""

    __tablename__ = "contributors"
    __table_args__ = (UniqueConstraint("datanet_id", "address", name="uq_contributors_datanet_address"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    datanet_id: Mapped[int] = mapped_column(ForeignKey("datanets.id"))
    address: Mapped[str] = mapped_column(String(ADDRESS), index=True)
    examples: Mapped[int] = mapped_column(Integer, default=0)


class Request(Base):
    """One served request: who paid, what it used, what it cost."""

    __tablename__ = "requests"
    __table_args__ = (
        CheckConstraint("status IN ('completed', 'failed', 'cancelled')", name="status_known"),
        CheckConstraint("prompt_tokens >= 0 AND completion_tokens >= 0", name="tokens_non_negative"),
        Index("ix_requests_payer_finished", "payer_id", "finished_at"),
        Index("ix_requests_finished", "finished_at"),
    )
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    payer_id: Mapped[int] = mapped_column(ForeignKey("payers.id"))
    node_id: Mapped[int] = mapped_column(BigInteger)
    adapter_mix: Mapped[str] = mapped_column(Text)  # canonical JSON [[adapter_id, weight_bps], ...]
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    first_token_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    price_per_m_input: Mapped[int] = mapped_column(Amount())  # effective (weighted) price actually charged
    price_per_m_output: Mapped[int] = mapped_column(Amount())
    cost: Mapped[int] = mapped_column(Amount())
    status: Mapped[str] = mapped_column(String(16))
    content_hash: Mapped[str] = mapped_column(String(HASH))  # of the recorded input, for idempotency checks


class AdapterUsage(Base):
    """Per-request, per-adapter usage; `finished_at` is copied from the request so range queries by
    adapter read one index without a join."""

    __tablename__ = "adapter_usage"
    __table_args__ = (
        Index("ix_adapter_usage_adapter_finished", "adapter_id", "finished_at"),
        Index("ix_adapter_usage_datanet_finished", "datanet_id", "finished_at"),
    )
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), primary_key=True)
    datanet_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    weight_bps: Mapped[int] = mapped_column(Integer)
    cost_share: Mapped[int] = mapped_column(Amount())
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    finished_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class ContributorInfluence(Base):
    """Per-request influence of each Datanet contributor on one adapter's part of the answer."""

    __tablename__ = "contributor_influence"
    __table_args__ = (
        CheckConstraint("share_bps >= 0 AND share_bps <= 10000", name="share_in_range"),
        Index("ix_contributor_influence_contributor", "contributor_id", "request_id"),
    )
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id"), primary_key=True)
    contributor_id: Mapped[int] = mapped_column(ForeignKey("contributors.id"), primary_key=True)
    score: Mapped[float] = mapped_column(Float)  # raw similarity, not money: a float is fine here
    share_bps: Mapped[int] = mapped_column(Integer)


class RequestCredit(Base):
    """What one request owes each payee (adapter owner, contributor, operator); sums to the cost."""

    __tablename__ = "request_credits"
    __table_args__ = (
        CheckConstraint("role IN ('owner', 'contributor', 'operator')", name="role_known"),
        Index("ix_request_credits_payee_request", "payee", "request_id"),
    )
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), primary_key=True)
    payee: Mapped[str] = mapped_column(String(ADDRESS), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), primary_key=True)
    adapter_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # 0: base model, no adapter
    amount: Mapped[int] = mapped_column(Amount())


class Receipt(Base):
    """The node-signed EIP-712 receipt of one request (docs/formats.md `Receipt`)."""

    __tablename__ = "receipts"
    __table_args__ = (Index("ix_receipts_payer_timestamp", "payer", "timestamp"),)
    request_id: Mapped[str] = mapped_column(ForeignKey("requests.id"), primary_key=True)
    digest: Mapped[str] = mapped_column(String(HASH), unique=True)
    request_hash: Mapped[str] = mapped_column(String(HASH))
    payer: Mapped[str] = mapped_column(String(ADDRESS))
    node_id: Mapped[int] = mapped_column(BigInteger)
    adapter_ids: Mapped[str] = mapped_column(Text)  # JSON list of ints, in signed order
    input_tokens: Mapped[int] = mapped_column(BigInteger)
    output_tokens: Mapped[int] = mapped_column(BigInteger)
    cost: Mapped[int] = mapped_column(Amount())
    attribution_digest: Mapped[str] = mapped_column(String(HASH))
    timestamp: Mapped[int] = mapped_column(BigInteger)  # unix seconds, as signed
    chain_id: Mapped[int] = mapped_column(BigInteger)
    verifying_contract: Mapped[str] = mapped_column(String(ADDRESS))
    signer: Mapped[str] = mapped_column(String(ADDRESS))
    signature: Mapped[str] = mapped_column(String(132))


class PayerVoucher(Base):
    """The latest cumulative voucher a payer signed for a node (docs/formats.md `Voucher`)."""

    __tablename__ = "payer_vouchers"
    payer_id: Mapped[int] = mapped_column(ForeignKey("payers.id"), primary_key=True)
    node_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    cumulative_value: Mapped[int] = mapped_column(Amount())
    timestamp: Mapped[int] = mapped_column(BigInteger)
    signature: Mapped[str] = mapped_column(String(132))
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class SettlementBatch(Base):
    """A Merkle batch of receipts; status moves pending -> submitted -> confirmed, or failed -> submitted."""

    __tablename__ = "settlement_batches"
    __table_args__ = (
        CheckConstraint("status IN ('pending', 'submitted', 'confirmed', 'failed')", name="status_known"),
        Index("ix_settlement_batches_status", "status"),
    )
    id: Mapped[str] = mapped_column(String(HASH), primary_key=True)  # keccak256(abi.encode(nodeId, root))
    node_id: Mapped[int] = mapped_column(BigInteger)
    merkle_root: Mapped[str] = mapped_column(String(HASH))
    receipt_count: Mapped[int] = mapped_column(Integer)
    total_amount: Mapped[int] = mapped_column(Amount())
    status: Mapped[str] = mapped_column(String(16))
    tx_hash: Mapped[str | None] = mapped_column(String(HASH), nullable=True)
    block_number: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class BatchReceipt(Base):
    """Membership of a receipt in a batch. UNIQUE(request_id): a receipt is never in two batches."""

    __tablename__ = "batch_receipts"
    __table_args__ = (UniqueConstraint("batch_id", "leaf_index", name="uq_batch_receipts_batch_leaf"),)
    request_id: Mapped[str] = mapped_column(ForeignKey("receipts.request_id"), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("settlement_batches.id"))
    leaf_index: Mapped[int] = mapped_column(Integer)  # position among the batch's sorted leaves
    leaf: Mapped[str] = mapped_column(String(HASH))


class BatchDebit(Base):
    """What one payer pays in a batch, backed by the voucher the payer had signed when it was built."""

    __tablename__ = "batch_debits"
    batch_id: Mapped[str] = mapped_column(ForeignKey("settlement_batches.id"), primary_key=True)
    payer_id: Mapped[int] = mapped_column(ForeignKey("payers.id"), primary_key=True)
    amount: Mapped[int] = mapped_column(Amount())
    voucher_cumulative_value: Mapped[int] = mapped_column(Amount())
    voucher_timestamp: Mapped[int] = mapped_column(BigInteger)
    voucher_signature: Mapped[str] = mapped_column(String(132))


class BatchPayout(Base):
    """What one payee is credited in a batch (claimable on chain once the batch is confirmed)."""

    __tablename__ = "batch_payouts"
    __table_args__ = (Index("ix_batch_payouts_payee", "payee"),)
    batch_id: Mapped[str] = mapped_column(ForeignKey("settlement_batches.id"), primary_key=True)
    payee: Mapped[str] = mapped_column(String(ADDRESS), primary_key=True)
    amount: Mapped[int] = mapped_column(Amount())


class PayeeBalance(Base):
    """Running totals per payee, updated in the same transaction as the credits and batches they sum:
    `credited` (every credit ever recorded) and `batched` (the part moved into settlement batches).
    Pending rewards are credited - batched, read in O(1) instead of summing a log that, for the
    operator, has one row per request."""

    __tablename__ = "payee_balances"
    payee: Mapped[str] = mapped_column(String(ADDRESS), primary_key=True)
    credited: Mapped[int] = mapped_column(Amount())
    batched: Mapped[int] = mapped_column(Amount())


class UsageRollup(Base):
    """Hourly usage totals per adapter, Datanet and payer, kept in the same transaction as the log.
    A usage query sums whole hours here and reads raw rows only for the partial hours at its edges, so
    its cost does not grow with the traffic inside the range."""

    __tablename__ = "usage_rollups"
    __table_args__ = (CheckConstraint("scope IN ('adapter', 'datanet', 'payer')", name="scope_known"),)
    scope: Mapped[str] = mapped_column(String(8), primary_key=True)
    scope_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    hour: Mapped[dt.datetime] = mapped_column(UTCDateTime(), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger)
    completion_tokens: Mapped[int] = mapped_column(BigInteger)
    cost: Mapped[int] = mapped_column(Amount())
