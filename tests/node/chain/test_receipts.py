"""Cross-implementation checks: EIP-712 digests, signatures and Merkle proofs made in Python (the
ledger's attribution.receipts / attribution.merkle, and eth-account's generic typed-data signer) are
accepted by UsageSettlement on anvil."""

from __future__ import annotations

import pytest
from eth_account import Account

from attribution import merkle
from attribution.eip712 import Domain
from attribution.receipts import ReceiptData, VoucherData, request_hash, sign_digest, typed_data
from node.chain.client import compute_batch_id

pytestmark = pytest.mark.anvil


def _domain(chain) -> Domain:
    return Domain(chain_id=chain.deployment.chain_id, verifying_contract=chain.settlement.address)


def _receipt(i: int, payer: str, node_id: int, ts: int = 1_750_000_000) -> ReceiptData:
    return ReceiptData(request_id=request_hash(f"req-{i}"), payer=payer, node_id=node_id,
                       adapter_ids=tuple(range(1, 1 + i % 4)), input_tokens=100 + i, output_tokens=7 * i,
                       cost=1_000 + 13 * i, attribution_digest=bytes([i % 256]) * 32, timestamp=ts + i)


def _register_node(chain, actors) -> int:
    return chain.with_account(actors.operator.key).register_node(actors.signer.address, "http://n", "m")


def test_digests_agree_with_the_contract(chain, actors):
    dom = _domain(chain)
    assert chain.settlement.functions.DOMAIN_SEPARATOR().call() == dom.separator()
    r = _receipt(3, actors.payer.address, 1)
    assert chain.hash_receipt(r) == r.digest(dom)
    v = VoucherData(payer=actors.payer.address, node_id=1, cumulative_value=10**18 + 7, timestamp=1_750_000_123)
    assert chain.hash_voucher(v) == v.digest(dom)
    # an empty adapter list hashes as keccak256("")
    r0 = _receipt(0, actors.payer.address, 1)
    assert r0.adapter_ids == () and chain.hash_receipt(r0) == r0.digest(dom)


def test_a_receipt_signed_with_eth_account_verifies_on_chain(chain, actors):
    node_id = _register_node(chain, actors)
    dom = _domain(chain)
    r = _receipt(1, actors.payer.address, node_id)
    # eth-account's own EIP-712 encoder signs the typed-data JSON (independent of attribution.eip712)
    signed = Account.sign_typed_data(actors.signer.key, full_message=typed_data(dom, "Receipt", r.message_json()))
    assert bytes(signed.message_hash) == r.digest(dom) == chain.hash_receipt(r)
    leaf = merkle.leaf_of(r.digest(dom))
    assert chain.receipt_leaf(r.digest(dom)) == leaf
    signer = chain.with_account(actors.signer.key)
    batch = signer.settle_batch(node_id, leaf, 1, [], [])  # one leaf: root = leaf, empty proof
    assert batch.batch_id == merkle.batch_id_of(node_id, leaf) == compute_batch_id(node_id, leaf)
    assert chain.verify_receipt(node_id, batch.batch_id, r, bytes(signed.signature), [])
    # the ledger's own signer produces the same acceptable signature
    assert chain.verify_receipt(node_id, batch.batch_id, r, sign_digest(r.digest(dom), actors.signer.key), [])
    # another key's signature, or another receipt, is refused
    assert not chain.verify_receipt(node_id, batch.batch_id, r, sign_digest(r.digest(dom), actors.payer.key), [])
    other = _receipt(2, actors.payer.address, node_id)
    assert not chain.verify_receipt(node_id, batch.batch_id, other, sign_digest(other.digest(dom), actors.signer.key), [])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 16, 33])
def test_python_merkle_roots_and_proofs_verify_on_chain(chain, actors, n):
    node_id = _register_node(chain, actors)
    dom = _domain(chain)
    receipts = [_receipt(i, actors.payer.address, node_id) for i in range(n)]
    digests = [r.digest(dom) for r in receipts]
    leaves = merkle.sorted_leaves(digests)
    root = merkle.root_of(leaves)
    batch = chain.with_account(actors.signer.key).settle_batch(node_id, root, n, [], [])
    info = chain.get_batch(node_id, batch.batch_id)
    assert (info.root, info.signer, info.receipt_count) == (root, actors.signer.address, n)
    for r, d in zip(receipts, digests, strict=True):
        proof = merkle.proof_for(leaves, leaves.index(merkle.leaf_of(d)))
        sig = sign_digest(d, actors.signer.key)
        assert chain.verify_receipt(node_id, batch.batch_id, r, sig, proof), r.request_id.hex()
        if proof:
            assert not chain.verify_receipt(node_id, batch.batch_id, r, sig, proof[:-1])
