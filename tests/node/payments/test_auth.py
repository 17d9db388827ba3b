"""Sign-in for API keys: EIP-4361 style challenge, personal_sign, a voucher as spending cap."""

from __future__ import annotations

import pytest
from eth_account import Account
from eth_account.messages import encode_defunct

from attribution.payers import latest_voucher, payer_for_api_key
from node.auth import SignIn
from node.errors import BadRequest, PaymentRequired, Unauthorized
from node.payments import sign_voucher


class Clock:
    def __init__(self):
        self.t = 1_800_000_000.0

    def __call__(self):
        return self.t


@pytest.fixture
def signin(ledger, chain):
    return SignIn(ledger.db, ledger.domain, chain.node_id, site="node.example", uri="https://node.example", clock=Clock())


def signed(message: str, key) -> str:
    return "0x" + bytes(Account.sign_message(encode_defunct(text=message), key).signature).hex()


def test_login_returns_a_key_for_the_signed_in_address_and_stores_the_cap(signin, ledger, chain):
    key = Account.create()
    c = signin.challenge(key.address)
    assert c.message.startswith("node.example wants you to sign in with your Ethereum account:\n" + key.address)
    assert "Expiration Time: 2027-01-15T08:05:00Z" in c.message and f"Chain ID: {chain.chain_id}" in c.message
    payer, api_key = signin.login(c.message, signed(c.message, key.key), sign_voucher(ledger.domain, key.key, chain.node_id, 500))
    assert payer == key.address.lower() == payer_for_api_key(ledger.db, api_key)
    assert latest_voucher(ledger.db, payer, chain.node_id).voucher.cumulative_value == 500


def test_expired_reused_or_edited_challenges_are_refused(signin, ledger, chain):
    key = Account.create()
    sv = sign_voucher(ledger.domain, key.key, chain.node_id, 1)
    c = signin.challenge(key.address)
    edited = c.message.replace("Version: 1", "Version: 2")
    with pytest.raises(Unauthorized, match="challenge"):
        signin.login(edited, signed(edited, key.key), sv)
    signin.clock.t += 301
    with pytest.raises(Unauthorized, match="expired"):
        signin.login(c.message, signed(c.message, key.key), sv)
    c2 = signin.challenge(key.address)
    signin.login(c2.message, signed(c2.message, key.key), sv)
    with pytest.raises(Unauthorized, match="used"):
        signin.login(c2.message, signed(c2.message, key.key), sv)


def test_signature_or_voucher_from_another_address_changes_nothing(signin, ledger, chain):
    key, other = Account.create(), Account.create()
    c = signin.challenge(key.address)
    with pytest.raises(Unauthorized, match="signed by"):
        signin.login(c.message, signed(c.message, other.key), sign_voucher(ledger.domain, key.key, chain.node_id, 1))
    with pytest.raises(PaymentRequired, match="signed-in address"):
        signin.login(c.message, signed(c.message, key.key), sign_voucher(ledger.domain, other.key, chain.node_id, 1))
    # the challenge survived both failures: the rightful login still works
    signin.login(c.message, signed(c.message, key.key), sign_voucher(ledger.domain, key.key, chain.node_id, 1))
    with pytest.raises(BadRequest):
        signin.challenge("not-an-address")
