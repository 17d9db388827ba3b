"""Node-signed usage receipts and payer vouchers: EIP-712 typed data of docs/formats.md.

A receipt is built from a recorded request, signed with the node key (eth-account), stored next to the
request, and later becomes a leaf of a settlement batch. `verify_signed_json` checks one offline from the
typed-data JSON that `to_signed_json` writes (what `openlora receipt verify FILE` reads).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak, to_checksum_address

from attribution.eip712 import (
    DOMAIN_FIELDS,
    RECEIPT_TYPE,
    VOUCHER_TYPE,
    ZERO32,
    Domain,
    fields_of,
    hash_uint256_array,
    hex32,
    normalize_address,
    to_bytes32,
    typed_data_digest,
)
from attribution.errors import InvalidInput, SignatureError
from attribution.shares import ContributorShare

U64 = 2**64


def request_hash(request_id: str) -> bytes:
    """requestId = keccak256 of the node's request id string (UTF-8)."""
    return keccak(request_id.encode("utf-8"))


def attribution_digest(shares: Mapping[int, Sequence[ContributorShare]] | None) -> bytes:
    """keccak256 of the canonical JSON of the per-contributor shares, zero when there are none.

    Canonical JSON (docs/formats.md): {"<adapterId>": {"<contributor address, lowercase>": <bps>}},
    adapters with no positive share left out, sorted keys, no spaces (separators "," and ":").
    """
    doc = {str(a): {s.address.lower(): s.share_bps for s in ss if s.share_bps > 0} for a, ss in (shares or {}).items()}
    doc = {a: m for a, m in doc.items() if m}
    if not doc:
        return ZERO32
    return keccak(text=json.dumps(doc, sort_keys=True, separators=(",", ":")))


@dataclass(frozen=True)
class ReceiptData:
    request_id: bytes  # 32 bytes: request_hash(node request id)
    payer: str
    node_id: int
    adapter_ids: tuple[int, ...]
    input_tokens: int
    output_tokens: int
    cost: int
    attribution_digest: bytes
    timestamp: int  # unix seconds

    def __post_init__(self) -> None:
        object.__setattr__(self, "payer", normalize_address(self.payer, "payer"))
        for name in ("input_tokens", "output_tokens", "timestamp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < U64:
                raise InvalidInput(f"receipt {name} must be a uint64, got {v!r}")
        for name, v in (("nodeId", self.node_id), ("cost", self.cost), *(("adapterId", a) for a in self.adapter_ids)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**256:
                raise InvalidInput(f"receipt {name} must be a uint256, got {v!r}")
        for name in ("request_id", "attribution_digest"):
            if len(getattr(self, name)) != 32:
                raise InvalidInput(f"receipt {name} must be 32 bytes")

    def struct_hash(self) -> bytes:
        return keccak(abi_encode(
            ["bytes32", "bytes32", "address", "uint256", "bytes32", "uint64", "uint64", "uint256", "bytes32", "uint64"],
            [keccak(text=RECEIPT_TYPE), self.request_id, self.payer, self.node_id, hash_uint256_array(list(self.adapter_ids)),
             self.input_tokens, self.output_tokens, self.cost, self.attribution_digest, self.timestamp],
        ))

    def digest(self, domain: Domain) -> bytes:
        return typed_data_digest(domain, self.struct_hash())

    def message_json(self) -> dict:
        return {"requestId": hex32(self.request_id), "payer": to_checksum_address(self.payer), "nodeId": self.node_id,
                "adapterIds": list(self.adapter_ids), "inputTokens": self.input_tokens,
                "outputTokens": self.output_tokens, "cost": self.cost,
                "attributionDigest": hex32(self.attribution_digest), "timestamp": self.timestamp}

    @classmethod
    def from_message_json(cls, m: Mapping) -> ReceiptData:
        try:
            return cls(
                request_id=to_bytes32(m["requestId"], "requestId"), payer=m["payer"], node_id=_int(m["nodeId"]),
                adapter_ids=tuple(_int(a) for a in m["adapterIds"]), input_tokens=_int(m["inputTokens"]),
                output_tokens=_int(m["outputTokens"]), cost=_int(m["cost"]),
                attribution_digest=to_bytes32(m["attributionDigest"], "attributionDigest"), timestamp=_int(m["timestamp"]))
        except (KeyError, TypeError) as exc:
            raise InvalidInput(f"receipt message is missing or mistypes a field: {exc}") from None


@dataclass(frozen=True)
class VoucherData:
    payer: str
    node_id: int
    cumulative_value: int
    timestamp: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "payer", normalize_address(self.payer, "payer"))
        if isinstance(self.cumulative_value, bool) or not isinstance(self.cumulative_value, int) or not 0 <= self.cumulative_value < 2**256:
            raise InvalidInput(f"voucher cumulativeValue must be a uint256, got {self.cumulative_value!r}")
        if isinstance(self.timestamp, bool) or not isinstance(self.timestamp, int) or not 0 <= self.timestamp < U64:
            raise InvalidInput(f"voucher timestamp must be a uint64, got {self.timestamp!r}")

    def struct_hash(self) -> bytes:
        return keccak(abi_encode(["bytes32", "address", "uint256", "uint256", "uint64"],
                                 [keccak(text=VOUCHER_TYPE), self.payer, self.node_id, self.cumulative_value, self.timestamp]))

    def digest(self, domain: Domain) -> bytes:
        return typed_data_digest(domain, self.struct_hash())

    def message_json(self) -> dict:
        return {"payer": to_checksum_address(self.payer), "nodeId": self.node_id,
                "cumulativeValue": self.cumulative_value, "timestamp": self.timestamp}


def typed_data(domain: Domain, primary: str, message: dict) -> dict:
    type_string = {"Receipt": RECEIPT_TYPE, "Voucher": VOUCHER_TYPE}[primary]
    return {"types": {"EIP712Domain": DOMAIN_FIELDS, primary: fields_of(type_string)},
            "primaryType": primary, "domain": domain.as_json(), "message": message}


def sign_digest(digest: bytes, private_key) -> str:
    """65-byte r ‖ s ‖ v signature (v in {27, 28}) of an EIP-712 digest."""
    return "0x" + bytes(Account.unsafe_sign_hash(digest, private_key).signature).hex()


def recover_signer(digest: bytes, signature: str) -> str:
    try:
        raw = to_bytes_sig(signature)
        return Account._recover_hash(digest, signature=raw).lower()
    except SignatureError:
        raise
    except Exception as exc:  # eth-keys raises several types for malformed signatures
        raise SignatureError(f"signature does not recover: {exc}") from None


def to_bytes_sig(signature: str) -> bytes:
    if not isinstance(signature, str) or not signature.startswith("0x"):
        raise SignatureError("signature must be 0x-prefixed hex")
    try:
        raw = bytes.fromhex(signature[2:])
    except ValueError:
        raise SignatureError("signature is not hex") from None
    if len(raw) != 65:
        raise SignatureError(f"signature must be 65 bytes, got {len(raw)}")
    return raw


def to_signed_json(domain: Domain, receipt: ReceiptData, signature: str) -> dict:
    return {"typedData": typed_data(domain, "Receipt", receipt.message_json()), "signature": signature,
            "digest": hex32(receipt.digest(domain))}


@dataclass(frozen=True)
class VerifiedReceipt:
    receipt: ReceiptData
    domain: Domain
    digest: bytes
    signer: str


def verify_signed_json(doc: Mapping) -> VerifiedReceipt:
    """Check a receipt file offline: well-formed typed data of the agreed types, signature recovers.

    The digest is computed twice, by this module and by eth-account's generic EIP-712 encoder, and
    both must agree, so a file whose `types` differ from docs/formats.md is refused rather than
    verified against a different struct."""
    try:
        td, signature = doc["typedData"], doc["signature"]
        if td.get("primaryType") != "Receipt":
            raise InvalidInput(f"primaryType must be Receipt, got {td.get('primaryType')!r}")
        if td.get("types", {}).get("Receipt") != fields_of(RECEIPT_TYPE):
            raise InvalidInput("Receipt type fields differ from docs/formats.md")
        d = td["domain"]
        if d.get("name") != "OpenLoRA" or d.get("version") != "1":
            raise InvalidInput(f"EIP-712 domain must be name=OpenLoRA version=1, got {d.get('name')!r} {d.get('version')!r}")
        domain = Domain(chain_id=_int(d["chainId"]), verifying_contract=d["verifyingContract"])
        receipt = ReceiptData.from_message_json(td["message"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise InvalidInput(f"not a signed receipt document: missing {exc}") from None
    digest = receipt.digest(domain)
    library = encode_typed_data(full_message=typed_data(domain, "Receipt", receipt.message_json()))
    if keccak(b"\x19" + library.version + library.header + library.body) != digest:
        raise SignatureError("EIP-712 digest mismatch between the ledger and eth-account encoders")
    if "digest" in doc and doc["digest"].lower() != hex32(digest):
        raise SignatureError(f"file digest {doc['digest']} does not match the typed data ({hex32(digest)})")
    return VerifiedReceipt(receipt, domain, digest, recover_signer(digest, signature))


def _int(v) -> int:
    if isinstance(v, bool):
        raise InvalidInput(f"expected an integer, got {v!r}")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v, 0)
        except ValueError:
            pass
    raise InvalidInput(f"expected an integer, got {v!r}")
