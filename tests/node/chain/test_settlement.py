"""End to end on anvil: deposit, node-signed receipts in a Merkle batch, a payer voucher signed with
eth-account, settleBatch with the revenue split, claims, replay protection and thawed withdrawal."""

from __future__ import annotations

import pytest
from eth_account import Account

from attribution import merkle
from attribution.eip712 import Domain
from attribution.receipts import ReceiptData, VoucherData, request_hash, sign_digest, typed_data
from node.chain.client import AdapterSpec, Credit, Debit, SignedVoucher
from node.chain.errors import ContractRevert

pytestmark = pytest.mark.anvil


def _setup(chain, actors):
    did = chain.with_account(actors.contributor.key).create_datanet("ipfs://d", b"\x01" * 32)
    aid = chain.with_account(actors.adapter_owner.key).register_adapter(AdapterSpec(
        name="sql", base_model="m", content_hash=b"\x02" * 32, uri="u", datanet_id=did,
        price_per_m_input=1_000_000, price_per_m_output=3_000_000, owner_bps=6_000, contributors_bps=3_000,
        operator_bps=1_000))
    nid = chain.with_account(actors.operator.key).register_node(actors.signer.address, "http://n", "m")
    deployer = chain.with_account(actors.deployer.key)
    for who in (actors.payer, actors.payer2):
        deployer.mint(who.address, 1_000_000)
    return aid, nid


def _voucher(chain, payer, node_id: int, value: int) -> SignedVoucher:
    dom = Domain(chain_id=chain.deployment.chain_id, verifying_contract=chain.settlement.address)
    v = VoucherData(payer=payer.address, node_id=node_id, cumulative_value=value, timestamp=1_750_000_000)
    signed = Account.sign_typed_data(payer.key, full_message=typed_data(dom, "Voucher", v.message_json()))
    return SignedVoucher(v, bytes(signed.signature))


def _batch(chain, actors, aid: int, nid: int, requests: list[tuple[str, int, int]]):
    """Node-signed receipts for (payer address, inTok, outTok), priced by the chain's quote."""
    dom = Domain(chain_id=chain.deployment.chain_id, verifying_contract=chain.settlement.address)
    receipts = []
    for i, (payer, tin, tout) in enumerate(requests):
        cost = chain.quote(aid, tin, tout)
        receipts.append(ReceiptData(request_id=request_hash(f"r{i}-{payer}"), payer=payer, node_id=nid,
                                    adapter_ids=(aid,), input_tokens=tin, output_tokens=tout, cost=cost,
                                    attribution_digest=b"\x00" * 32, timestamp=1_750_000_000 + i))
    digests = [r.digest(dom) for r in receipts]
    leaves = merkle.sorted_leaves(digests)
    sigs = [sign_digest(d, actors.signer.key) for d in digests]
    return receipts, digests, leaves, sigs


def _split(total: int, actors) -> list[Credit]:
    owner, contributors = total * 6_000 // 10_000, total * 3_000 // 10_000
    return [Credit(actors.adapter_owner.address, owner), Credit(actors.contributor.address, contributors),
            Credit(actors.operator.address, total - owner - contributors)]


def test_settle_batch_end_to_end(chain, actors):
    aid, nid = _setup(chain, actors)
    payer = chain.with_account(actors.payer.key)
    payer2 = chain.with_account(actors.payer2.key)
    assert payer.deposit(nid, 100_000) == 100_000
    payer2.deposit(nid, 50_000)

    receipts, digests, leaves, sigs = _batch(chain, actors, aid, nid, [
        (actors.payer.address, 1_000, 500), (actors.payer.address, 2_000, 10), (actors.payer2.address, 300, 3_000)])
    owed = {actors.payer.address: 0, actors.payer2.address: 0}
    for r in receipts:
        owed[next(a for a in owed if a.lower() == r.payer)] += r.cost
    total = sum(owed.values())
    debits = [Debit(_voucher(chain, actors.payer, nid, owed[actors.payer.address]), owed[actors.payer.address]),
              Debit(_voucher(chain, actors.payer2, nid, owed[actors.payer2.address] + 5), owed[actors.payer2.address])]
    signer = chain.with_account(actors.signer.key)
    batch = signer.settle_batch(nid, merkle.root_of(leaves), len(receipts), debits, _split(total, actors))
    assert batch.total == total

    assert chain.escrow(actors.payer.address, nid).balance == 100_000 - owed[actors.payer.address]
    assert chain.collected(actors.payer2.address, nid) == owed[actors.payer2.address]
    for r, d, s in zip(receipts, digests, sigs, strict=True):
        proof = merkle.proof_for(leaves, leaves.index(merkle.leaf_of(d)))
        assert chain.verify_receipt(nid, batch.batch_id, r, s, proof)

    # claims pay each payee its split
    expected = {a.address: c.amount for a, c in zip((actors.adapter_owner, actors.contributor, actors.operator),
                                                    _split(total, actors), strict=True)}
    for who in (actors.adapter_owner, actors.contributor, actors.operator):
        c = chain.with_account(who.key)
        assert c.claimable() == expected[who.address]
        assert c.claim() == expected[who.address]
        assert c.token_balance() == expected[who.address]
    totals = chain.totals()
    assert totals == {"escrowed": 150_000 - total, "unclaimed": 0, "balance": 150_000 - total}
    with pytest.raises(ContractRevert, match="NothingToClaim"):
        chain.with_account(actors.operator.key).claim()

    # the same batch cannot settle twice; the same voucher pays nothing more
    with pytest.raises(ContractRevert) as exc:
        signer.settle_batch(nid, merkle.root_of(leaves), len(receipts), debits, _split(total, actors))
    assert exc.value.error == "BatchAlreadySettled"
    other_root = merkle.leaf_of(b"\x09" * 32)
    with pytest.raises(ContractRevert) as exc:
        signer.settle_batch(nid, other_root, 1, [Debit(debits[0].signed_voucher, 1)], [Credit(actors.operator.address, 1)])
    assert exc.value.error == "VoucherExceeded"
    # payer2's voucher had 5 left on it
    signer.settle_batch(nid, other_root, 1, [Debit(debits[1].signed_voucher, 5)], [Credit(actors.operator.address, 5)])
    assert chain.collected(actors.payer2.address, nid) == owed[actors.payer2.address] + 5


def test_only_the_current_signer_settles(chain, actors):
    _, nid = _setup(chain, actors)
    chain.with_account(actors.payer.key).deposit(nid, 1_000)
    root = merkle.leaf_of(b"\x01" * 32)
    debits = [Debit(_voucher(chain, actors.payer, nid, 100), 100)]
    credits = [Credit(actors.operator.address, 100)]
    for who in (actors.operator, actors.payer, actors.stranger):
        with pytest.raises(ContractRevert) as exc:
            chain.with_account(who.key).settle_batch(nid, root, 1, debits, credits)
        assert exc.value.error == "NotNodeSigner" and exc.value.error_args["caller"] == who.address
    with pytest.raises(ContractRevert) as exc:
        chain.with_account(actors.signer.key).settle_batch(nid, root, 1, debits, [Credit(actors.operator.address, 99)])
    assert exc.value.error == "UnbalancedBatch"
    forged = Debit(SignedVoucher(debits[0].signed_voucher.voucher, _voucher(chain, actors.stranger, nid, 100).signature), 100)
    with pytest.raises(ContractRevert, match="InvalidVoucherSignature"):
        chain.with_account(actors.signer.key).settle_batch(nid, root, 1, [forged], credits)


def test_withdrawal_thaws(chain, actors, advance_time):
    _, nid = _setup(chain, actors)
    payer = chain.with_account(actors.payer.key)
    payer.deposit(nid, 10_000)
    thaw_end = payer.request_withdrawal(nid, 4_000)
    assert chain.escrow(actors.payer.address, nid).thaw_end == thaw_end
    with pytest.raises(ContractRevert) as exc:
        payer.withdraw(nid)
    assert exc.value.error == "StillThawing"
    # the node settles during the thawing period
    chain.with_account(actors.signer.key).settle_batch(
        nid, merkle.leaf_of(b"\x05" * 32), 1, [Debit(_voucher(chain, actors.payer, nid, 7_000), 7_000)],
        [Credit(actors.operator.address, 7_000)])
    advance_time(chain.thawing_period())
    assert payer.withdraw(nid) == 3_000  # what the settlement left
    assert payer.token_balance() == 1_000_000 - 10_000 + 3_000
