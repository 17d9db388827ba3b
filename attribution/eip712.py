"""EIP-712 typed-data hashing for the two structs of docs/formats.md, written out from the standard
(https://eips.ethereum.org/EIPS/eip-712) so the digest the contract computes can be read off this file:

    digest      = keccak256(0x19 0x01 ‖ domainSeparator ‖ hashStruct(message))
    hashStruct  = keccak256(typeHash ‖ encodeData)      typeHash = keccak256(type string)
    encodeData  = each field as one 32-byte word; a dynamic array (uint256[]) is keccak256 of its
                  concatenated words; bytes32/uint/address are abi-encoded in place.

Signing and recovery use eth-account; the tests check this digest against eth-account's own encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

from eth_abi import encode as abi_encode
from eth_utils import is_address, keccak, to_checksum_address

from attribution.errors import InvalidInput

DOMAIN_NAME = "OpenLoRA"
DOMAIN_VERSION = "1"
DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
RECEIPT_TYPE = ("Receipt(bytes32 requestId,address payer,uint256 nodeId,uint256[] adapterIds,uint64 inputTokens,"
                "uint64 outputTokens,uint256 cost,bytes32 attributionDigest,uint64 timestamp)")
VOUCHER_TYPE = "Voucher(address payer,uint256 nodeId,uint256 cumulativeValue,uint64 timestamp)"

ZERO32 = b"\x00" * 32


@dataclass(frozen=True)
class Domain:
    chain_id: int
    verifying_contract: str  # the UsageSettlement address

    def __post_init__(self) -> None:
        object.__setattr__(self, "verifying_contract", normalize_address(self.verifying_contract, "verifyingContract"))
        if isinstance(self.chain_id, bool) or not isinstance(self.chain_id, int) or self.chain_id <= 0:
            raise InvalidInput(f"chain id must be a positive integer, got {self.chain_id!r}")

    def separator(self) -> bytes:
        return keccak(abi_encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [keccak(text=DOMAIN_TYPE), keccak(text=DOMAIN_NAME), keccak(text=DOMAIN_VERSION),
             self.chain_id, self.verifying_contract],
        ))

    def as_json(self) -> dict:
        return {"name": DOMAIN_NAME, "version": DOMAIN_VERSION, "chainId": self.chain_id,
                "verifyingContract": to_checksum_address(self.verifying_contract)}


DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]


def fields_of(type_string: str) -> list[dict]:
    """'Name(t1 a,t2 b)' -> [{'name': 'a', 'type': 't1'}, ...] (the `types` entry of typed-data JSON)."""
    inner = type_string[type_string.index("(") + 1 : -1]
    return [{"name": n, "type": t} for t, n in (f.split(" ") for f in inner.split(","))]


def typed_data_digest(domain: Domain, struct_hash: bytes) -> bytes:
    return keccak(b"\x19\x01" + domain.separator() + struct_hash)


def hash_uint256_array(values: list[int]) -> bytes:
    return keccak(b"".join(abi_encode(["uint256"], [v]) for v in values))


def normalize_address(value: str, what: str = "address") -> str:
    if not isinstance(value, str) or not is_address(value) or not value.startswith("0x"):
        raise InvalidInput(f"{what} must be a 0x-prefixed 20-byte hex address, got {value!r}")
    return value.lower()


def to_bytes32(value: str | bytes, what: str) -> bytes:
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str) and value.startswith("0x"):
        try:
            raw = bytes.fromhex(value[2:])
        except ValueError:
            raise InvalidInput(f"{what} is not hex: {value!r}") from None
    else:
        raise InvalidInput(f"{what} must be 0x-prefixed hex, got {value!r}")
    if len(raw) != 32:
        raise InvalidInput(f"{what} must be 32 bytes, got {len(raw)}")
    return raw


def hex32(b: bytes) -> str:
    return "0x" + b.hex()
