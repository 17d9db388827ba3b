"""Thin typed wrappers of the OpenLoRA contract calls.

    client = ChainClient.connect(settings.rpc_url, settings.resolved_deployment_file, private_key)
    datanet_id = client.create_datanet("ipfs://...", sha256_bytes)
    adapter_id = client.register_adapter(AdapterSpec(name=..., base_model=..., content_hash=..., uri=...))
    node_id = client.register_node(signer_address, "https://node.example", "smollm2-135m-instruct")
    client.deposit(node_id, 1_000_000)                      # as a payer (approves first)
    client.settle_batch(node_id, root, n, debits, credits)  # as the node signer
    client.claim()                                          # as a payee

Reads need no key; writes need one (`with_account`). Reverts raise ContractRevert with the decoded
custom error. Byte arguments (hashes, signatures) take bytes or 0x-hex strings.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_utils import keccak
from web3 import Web3

from node.chain.artifacts import load_artifact
from node.chain.deploy import Deployment, deployment_problems, load_deployment
from node.chain.errors import ChainError, DeploymentError
from node.chain.tx import Transactor, call, connect

# ---------------------------------------------------------------------------------------------- types


def b32(value: bytes | str) -> bytes:
    """32 bytes from bytes or a 0x-hex string."""
    raw = bytes.fromhex(value[2:] if value.startswith("0x") else value) if isinstance(value, str) else bytes(value)
    if len(raw) != 32:
        raise ValueError(f"expected 32 bytes, got {len(raw)}")
    return raw


def _bytes(value: bytes | str) -> bytes:
    if isinstance(value, str):
        return bytes.fromhex(value[2:] if value.startswith("0x") else value)
    return bytes(value)


@dataclass(frozen=True)
class DatanetInfo:
    datanet_id: int
    owner: str
    created_at: int
    updated_at: int
    content_hash: bytes
    metadata_uri: str


@dataclass(frozen=True)
class AdapterSpec:
    """What `register_adapter` takes; bps must sum to 10000 and contributors need a Datanet."""

    name: str
    base_model: str
    content_hash: bytes
    uri: str
    datanet_id: int = 0
    price_per_m_input: int = 0
    price_per_m_output: int = 0
    owner_bps: int = 10_000
    contributors_bps: int = 0
    operator_bps: int = 0

    def as_tuple(self) -> tuple:
        return (self.name, self.base_model, b32(self.content_hash), self.uri, self.datanet_id,
                self.price_per_m_input, self.price_per_m_output, self.owner_bps, self.contributors_bps,
                self.operator_bps)


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: int
    owner: str
    version: int
    active: bool
    owner_bps: int
    contributors_bps: int
    operator_bps: int
    price_per_m_input: int
    price_per_m_output: int
    datanet_id: int
    content_hash: bytes
    created_at: int
    updated_at: int
    name: str
    base_model: str
    uri: str


@dataclass(frozen=True)
class NodeInfo:
    node_id: int
    operator: str
    active: bool
    registered_at: int
    signer: str
    updated_at: int
    endpoint: str
    base_model: str


@dataclass(frozen=True)
class Escrow:
    balance: int
    thawing: int
    thaw_end: int


@dataclass(frozen=True)
class BatchInfo:
    root: bytes
    signer: str
    receipt_count: int
    settled_at: int

    @property
    def settled(self) -> bool:
        return self.settled_at != 0


@dataclass(frozen=True)
class Voucher:
    """Voucher(address payer,uint256 nodeId,uint256 cumulativeValue,uint64 timestamp)."""

    payer: str
    node_id: int
    cumulative_value: int
    timestamp: int

    def as_tuple(self) -> tuple:
        return voucher_tuple(self)


@dataclass(frozen=True)
class SignedVoucher:
    """A voucher (this module's Voucher or anything with the same attributes, such as the ledger's
    VoucherData) with the payer's signature (bytes or 0x-hex)."""

    voucher: Any
    signature: bytes | str

    def as_tuple(self) -> tuple:
        return (voucher_tuple(self.voucher), _bytes(self.signature))


@dataclass(frozen=True)
class Debit:
    signed_voucher: SignedVoucher
    amount: int

    def as_tuple(self) -> tuple:
        return (self.signed_voucher.as_tuple(), self.amount)


@dataclass(frozen=True)
class Credit:
    payee: str
    amount: int

    def as_tuple(self) -> tuple:
        return (Web3.to_checksum_address(self.payee), self.amount)


def voucher_tuple(v: Any) -> tuple:
    """The ABI tuple of a voucher-like object (payer, node_id, cumulative_value, timestamp)."""
    return (Web3.to_checksum_address(v.payer), int(v.node_id), int(v.cumulative_value), int(v.timestamp))


def receipt_tuple(r: Any) -> tuple:
    """The ABI tuple of a receipt-like object (the ledger's attribution.receipts.ReceiptData)."""
    return (b32(r.request_id), Web3.to_checksum_address(r.payer), int(r.node_id), [int(a) for a in r.adapter_ids],
            int(r.input_tokens), int(r.output_tokens), int(r.cost), b32(r.attribution_digest), int(r.timestamp))


@dataclass(frozen=True)
class SettledBatch:
    node_id: int
    batch_id: bytes
    root: bytes
    total: int
    tx_hash: str
    block: int


def compute_batch_id(node_id: int, root: bytes | str) -> bytes:
    """keccak256(abi.encode(uint256 nodeId, bytes32 root)) (docs/formats.md)."""
    return keccak(abi_encode(["uint256", "bytes32"], [node_id, b32(root)]))


# ---------------------------------------------------------------------------------------------- client


class ChainClient:
    """Typed access to one deployment through one RPC endpoint, optionally with a signing account."""

    def __init__(self, w3: Web3, deployment: Deployment, account: LocalAccount | None = None) -> None:
        self.w3 = w3
        self.deployment = deployment
        self.account = account
        self._tx = Transactor(w3, account) if account is not None else None

        def contract(artifact: str, key: str):
            return w3.eth.contract(address=deployment.address(key), abi=load_artifact(artifact).abi)

        self.datanets = contract("DatanetRegistry", "DatanetRegistry")
        self.adapters = contract("AdapterRegistry", "AdapterRegistry")
        self.nodes = contract("NodeRegistry", "NodeRegistry")
        self.settlement = contract("UsageSettlement", "UsageSettlement")
        # the TestToken ABI is a superset of ERC-20; `mint` only works on a test deployment
        self.token = contract("TestToken", "Token")

    @classmethod
    def connect(cls, rpc_url: str, deployment: Deployment | str | os.PathLike,
                private_key: str | LocalAccount | None = None, *, check: bool = True) -> "ChainClient":
        """Connects to `rpc_url` with a Deployment (or the path of a deployment file); with `check`,
        DeploymentError unless every contract of it is on that chain."""
        w3 = connect(rpc_url)
        dep = deployment if isinstance(deployment, Deployment) else load_deployment(deployment)
        if check:
            problems = deployment_problems(w3, dep)
            if problems:
                raise DeploymentError(f"deployment does not match {rpc_url}: {'; '.join(problems)}")
        return cls(w3, dep, _account(private_key))

    def with_account(self, private_key: str | LocalAccount) -> "ChainClient":
        """The same client acting as another account."""
        return ChainClient(self.w3, self.deployment, _account(private_key))

    @property
    def address(self) -> str:
        if self.account is None:
            raise ChainError("this client has no account; use with_account(key) to send transactions")
        return self.account.address

    # ------------------------------------------------------------------ plumbing

    def _send(self, fn, label: str):
        if self._tx is None:
            raise ChainError(f"{label}: this client has no account; use with_account(key) to send transactions")
        return self._tx.send(fn, label)

    @staticmethod
    def _event(contract, receipt, event: str) -> dict[str, Any]:
        for log in getattr(contract.events, event)().process_receipt(receipt, errors=_DISCARD):
            return dict(log["args"])
        raise ChainError(f"transaction {receipt['transactionHash'].hex()} emitted no {event}")

    # ------------------------------------------------------------------ Datanets

    def create_datanet(self, metadata_uri: str, content_hash: bytes | str) -> int:
        r = self._send(self.datanets.functions.createDatanet(metadata_uri, b32(content_hash)), "createDatanet")
        return int(self._event(self.datanets, r, "DatanetCreated")["datanetId"])

    def update_datanet_metadata(self, datanet_id: int, metadata_uri: str, content_hash: bytes | str) -> None:
        self._send(self.datanets.functions.updateMetadata(datanet_id, metadata_uri, b32(content_hash)),
                   "updateMetadata")

    def transfer_datanet(self, datanet_id: int, new_owner: str) -> None:
        self._send(self.datanets.functions.transferDatanet(datanet_id, Web3.to_checksum_address(new_owner)),
                   "transferDatanet")

    def get_datanet(self, datanet_id: int) -> DatanetInfo:
        return DatanetInfo(datanet_id, *call(self.datanets.functions.getDatanet(datanet_id), "getDatanet"))

    def datanet_count(self) -> int:
        return call(self.datanets.functions.datanetCount(), "datanetCount")

    # ------------------------------------------------------------------ adapters

    def register_adapter(self, spec: AdapterSpec) -> int:
        r = self._send(self.adapters.functions.registerAdapter(spec.as_tuple()), "registerAdapter")
        return int(self._event(self.adapters, r, "AdapterRegistered")["adapterId"])

    def update_adapter_content(self, adapter_id: int, uri: str, content_hash: bytes | str) -> int:
        r = self._send(self.adapters.functions.updateContent(adapter_id, uri, b32(content_hash)), "updateContent")
        return int(self._event(self.adapters, r, "AdapterContentUpdated")["version"])

    def update_adapter_price(self, adapter_id: int, price_per_m_input: int, price_per_m_output: int) -> int:
        r = self._send(self.adapters.functions.updatePrice(adapter_id, price_per_m_input, price_per_m_output),
                       "updatePrice")
        return int(self._event(self.adapters, r, "AdapterPriceUpdated")["version"])

    def deactivate_adapter(self, adapter_id: int) -> None:
        self._send(self.adapters.functions.deactivateAdapter(adapter_id), "deactivateAdapter")

    def transfer_adapter(self, adapter_id: int, new_owner: str) -> None:
        self._send(self.adapters.functions.transferAdapter(adapter_id, Web3.to_checksum_address(new_owner)),
                   "transferAdapter")

    def get_adapter(self, adapter_id: int) -> AdapterInfo:
        return AdapterInfo(adapter_id, *call(self.adapters.functions.getAdapter(adapter_id), "getAdapter"))

    def get_adapters(self, from_id: int, max_count: int) -> list[AdapterInfo]:
        rows = call(self.adapters.functions.getAdapters(from_id, max_count), "getAdapters")
        start = max(from_id, 1)
        return [AdapterInfo(start + i, *row) for i, row in enumerate(rows)]

    def iter_adapters(self, page: int = 100) -> Iterator[AdapterInfo]:
        """Every adapter in id order, read `page` at a time (for registry sync)."""
        next_id = 1
        while True:
            rows = self.get_adapters(next_id, page)
            yield from rows
            if len(rows) < page:
                return
            next_id += len(rows)

    def adapter_count(self) -> int:
        return call(self.adapters.functions.adapterCount(), "adapterCount")

    def adapters_by_base_model(self, base_model: str) -> list[int]:
        return list(call(self.adapters.functions.adaptersByBaseModel(base_model), "adaptersByBaseModel"))

    def quote(self, adapter_id: int, input_tokens: int, output_tokens: int) -> int:
        return call(self.adapters.functions.quote(adapter_id, input_tokens, output_tokens), "quote")

    # ------------------------------------------------------------------ nodes

    def register_node(self, signer: str, endpoint: str, base_model: str) -> int:
        r = self._send(self.nodes.functions.registerNode(Web3.to_checksum_address(signer), endpoint, base_model),
                       "registerNode")
        return int(self._event(self.nodes, r, "NodeRegistered")["nodeId"])

    def rotate_signer(self, node_id: int, new_signer: str) -> None:
        self._send(self.nodes.functions.rotateSigner(node_id, Web3.to_checksum_address(new_signer)), "rotateSigner")

    def update_endpoint(self, node_id: int, endpoint: str) -> None:
        self._send(self.nodes.functions.updateEndpoint(node_id, endpoint), "updateEndpoint")

    def deactivate_node(self, node_id: int) -> None:
        self._send(self.nodes.functions.deactivateNode(node_id), "deactivateNode")

    def get_node(self, node_id: int) -> NodeInfo:
        return NodeInfo(node_id, *call(self.nodes.functions.getNode(node_id), "getNode"))

    def signer_of(self, node_id: int) -> str:
        return call(self.nodes.functions.signerOf(node_id), "signerOf")

    def node_count(self) -> int:
        return call(self.nodes.functions.nodeCount(), "nodeCount")

    # ------------------------------------------------------------------ token

    def token_balance(self, owner: str | None = None) -> int:
        return call(self.token.functions.balanceOf(Web3.to_checksum_address(owner or self.address)), "balanceOf")

    def mint(self, to: str, amount: int) -> None:
        """TestToken only (local chains)."""
        if not self.deployment.test_token:
            raise ChainError("mint: this deployment settles in a real ERC-20, not the TestToken")
        self._send(self.token.functions.mint(Web3.to_checksum_address(to), amount), "mint")

    def approve(self, spender: str, amount: int) -> None:
        self._send(self.token.functions.approve(Web3.to_checksum_address(spender), amount), "approve")

    # ------------------------------------------------------------------ escrow

    def deposit(self, node_id: int, amount: int, *, approve: bool = True) -> int:
        """Escrows `amount` for `node_id` (approving the settlement contract first unless told not to);
        returns the escrow balance after it."""
        if approve:
            allowance = call(self.token.functions.allowance(self.address, self.settlement.address), "allowance")
            if allowance < amount:
                self.approve(self.settlement.address, amount)
        r = self._send(self.settlement.functions.deposit(node_id, amount), "deposit")
        return int(self._event(self.settlement, r, "Deposited")["balance"])

    def request_withdrawal(self, node_id: int, amount: int) -> int:
        """Starts thawing; returns the timestamp from which `withdraw` pays."""
        r = self._send(self.settlement.functions.requestWithdrawal(node_id, amount), "requestWithdrawal")
        return int(self._event(self.settlement, r, "WithdrawalRequested")["thawEnd"])

    def cancel_withdrawal(self, node_id: int) -> None:
        self._send(self.settlement.functions.cancelWithdrawal(node_id), "cancelWithdrawal")

    def withdraw(self, node_id: int) -> int:
        """Pays out a thawed withdrawal; returns the amount."""
        r = self._send(self.settlement.functions.withdraw(node_id), "withdraw")
        return int(self._event(self.settlement, r, "Withdrawn")["amount"])

    def escrow(self, payer: str, node_id: int) -> Escrow:
        return Escrow(*call(self.settlement.functions.escrowOf(Web3.to_checksum_address(payer), node_id), "escrowOf"))

    def collected(self, payer: str, node_id: int) -> int:
        return call(self.settlement.functions.collected(Web3.to_checksum_address(payer), node_id), "collected")

    def thawing_period(self) -> int:
        return call(self.settlement.functions.thawingPeriod(), "thawingPeriod")

    def set_thawing_period(self, seconds: int) -> None:
        self._send(self.settlement.functions.setThawingPeriod(seconds), "setThawingPeriod")

    # ------------------------------------------------------------------ settlement

    def settle_batch(self, node_id: int, root: bytes | str, receipt_count: int,
                     debits: Sequence[Debit], credits: Sequence[Credit], batch_id: bytes | str | None = None
                     ) -> SettledBatch:
        """Settles one batch as the node's current signer (this client's account)."""
        root = b32(root)
        batch_id = b32(batch_id) if batch_id is not None else compute_batch_id(node_id, root)
        fn = self.settlement.functions.settleBatch(node_id, batch_id, root, receipt_count,
                                                   [d.as_tuple() for d in debits], [c.as_tuple() for c in credits])
        r = self._send(fn, "settleBatch")
        ev = self._event(self.settlement, r, "BatchSettled")
        return SettledBatch(node_id=node_id, batch_id=batch_id, root=root, total=int(ev["total"]),
                            tx_hash="0x" + bytes(r["transactionHash"]).hex(), block=int(r["blockNumber"]))

    def claim(self) -> int:
        """Pays this account its unclaimed credit; returns the amount."""
        r = self._send(self.settlement.functions.claim(), "claim")
        return int(self._event(self.settlement, r, "Claimed")["amount"])

    def claimable(self, payee: str | None = None) -> int:
        return call(self.settlement.functions.claimable(Web3.to_checksum_address(payee or self.address)), "claimable")

    def get_batch(self, node_id: int, batch_id: bytes | str) -> BatchInfo:
        return BatchInfo(*call(self.settlement.functions.getBatch(node_id, b32(batch_id)), "getBatch"))

    def is_settled(self, node_id: int, batch_id: bytes | str) -> bool:
        return call(self.settlement.functions.isSettled(node_id, b32(batch_id)), "isSettled")

    def verify_receipt(self, node_id: int, batch_id: bytes | str, receipt: Any, signature: bytes | str,
                       proof: Sequence[bytes | str]) -> bool:
        """Whether the settled batch covers `receipt` (a Receipt or the ledger's ReceiptData)."""
        fn = self.settlement.functions.verifyReceipt(node_id, b32(batch_id), receipt_tuple(receipt), _bytes(signature),
                                                     [b32(p) for p in proof])
        return call(fn, "verifyReceipt")

    def hash_voucher(self, voucher: Any) -> bytes:
        """The on-chain EIP-712 digest of a voucher-like object (for cross-checks)."""
        return call(self.settlement.functions.hashVoucher(voucher_tuple(voucher)), "hashVoucher")

    def hash_receipt(self, receipt: Any) -> bytes:
        """The on-chain EIP-712 digest of a receipt-like object (for cross-checks)."""
        return call(self.settlement.functions.hashReceipt(receipt_tuple(receipt)), "hashReceipt")

    def receipt_leaf(self, digest: bytes | str) -> bytes:
        return call(self.settlement.functions.receiptLeaf(b32(digest)), "receiptLeaf")

    def eip712_domain(self) -> dict[str, Any]:
        """The EIP-712 domain vouchers and receipts are signed under (eth-account's domain_data shape)."""
        return {"name": "OpenLoRA", "version": "1", "chainId": self.deployment.chain_id,
                "verifyingContract": self.settlement.address}

    def totals(self) -> dict[str, int]:
        return {"escrowed": call(self.settlement.functions.totalEscrowed(), "totalEscrowed"),
                "unclaimed": call(self.settlement.functions.totalUnclaimed(), "totalUnclaimed"),
                "balance": self.token_balance(self.settlement.address)}


def _account(key: str | LocalAccount | None) -> LocalAccount | None:
    if key is None or isinstance(key, LocalAccount):
        return key
    try:
        return Account.from_key(key)
    except (ValueError, TypeError) as exc:
        raise ChainError(f"invalid private key: {exc}") from None


try:  # web3 names the "skip logs that do not decode" mode here
    from web3.logs import DISCARD as _DISCARD
except ImportError:  # pragma: no cover
    _DISCARD = "discard"

__all__ = [
    "AdapterInfo", "AdapterSpec", "BatchInfo", "ChainClient", "Credit", "DatanetInfo", "Debit", "Escrow",
    "NodeInfo", "Receipt", "SettledBatch", "SignedVoucher", "Voucher", "b32", "compute_batch_id", "receipt_tuple",
    "voucher_tuple",
]
