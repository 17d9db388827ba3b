"""EIP-712 receipts and vouchers: our digest equals eth-account's, signatures recover, tampering fails."""

from __future__ import annotations

import json

import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_utils import keccak

from attribution.eip712 import Domain, hex32
from attribution.errors import InvalidInput, SignatureError
from attribution.receipts import (
    ReceiptData, VoucherData, attribution_digest, request_hash, sign_digest, to_signed_json, typed_data,
    verify_signed_json,
)
from attribution.shares import ContributorShare

DOMAIN = Domain(31337, "0x5FbDB2315678afecb367f032d93F642f64180aa3")
KEY = "0x" + "4c" * 32


def receipt(**kw) -> ReceiptData:
    base = dict(request_id=request_hash("req-1"), payer="0x" + "b2" * 20, node_id=1, adapter_ids=(1, 7),
                input_tokens=100, output_tokens=50, cost=2**70 + 3, attribution_digest=b"\x00" * 32, timestamp=1_767_225_600)
    base.update(kw)
    return ReceiptData(**base)


@pytest.mark.parametrize("r", [receipt(), receipt(adapter_ids=()), receipt(attribution_digest=b"\x11" * 32, cost=0)])
def test_receipt_digest_matches_eth_account_typed_data_encoder(r):
    signable = encode_typed_data(full_message=typed_data(DOMAIN, "Receipt", r.message_json()))
    assert keccak(b"\x19" + signable.version + signable.header + signable.body) == r.digest(DOMAIN)


def test_voucher_digest_matches_eth_account_and_signature_recovers():
    v = VoucherData("0x" + "b2" * 20, 1, 10**21, 1_767_225_600)
    acct = Account.from_key(KEY)
    lib = Account.sign_typed_data(KEY, full_message=typed_data(DOMAIN, "Voucher", v.message_json()))
    assert lib.message_hash == v.digest(DOMAIN)
    assert "0x" + bytes(lib.signature).hex() == sign_digest(v.digest(DOMAIN), KEY)
    assert acct.address == Account._recover_hash(v.digest(DOMAIN), signature=lib.signature)


def test_domain_binds_chain_id_and_contract():
    r = receipt()
    assert r.digest(DOMAIN) != r.digest(Domain(1, DOMAIN.verifying_contract))
    assert r.digest(DOMAIN) != r.digest(Domain(31337, "0x" + "99" * 20))


def test_signed_receipt_json_verifies_offline_and_tampering_is_detected():
    r = receipt()
    doc = to_signed_json(DOMAIN, r, sign_digest(r.digest(DOMAIN), KEY))
    doc = json.loads(json.dumps(doc))  # through a file
    assert verify_signed_json(doc).signer == Account.from_key(KEY).address.lower()
    doc["typedData"]["message"]["cost"] += 1
    with pytest.raises(SignatureError):  # the stored digest no longer matches
        verify_signed_json(doc)
    del doc["digest"]
    assert verify_signed_json(doc).signer != Account.from_key(KEY).address.lower()
    doc["typedData"]["types"]["Receipt"][0]["type"] = "uint256"
    with pytest.raises(InvalidInput):
        verify_signed_json(doc)


def test_attribution_digest_is_canonical_json_of_shares_or_zero():
    assert attribution_digest(None) == b"\x00" * 32 and attribution_digest({1: []}) == b"\x00" * 32
    shares = {12: [ContributorShare("0x" + "C2" * 20, 0.1, 2500), ContributorShare("0x" + "c1" * 20, 0.3, 7500)]}
    expected = '{"12":{"0x' + "c1" * 20 + '":7500,"0x' + "c2" * 20 + '":2500}}'
    assert attribution_digest(shares) == keccak(text=expected)


def test_receipt_fields_are_range_checked():
    with pytest.raises(InvalidInput):
        receipt(input_tokens=2**64)
    with pytest.raises(InvalidInput):
        receipt(payer="0x123")
    assert hex32(request_hash("req-1")) == hex32(keccak(text="req-1"))
