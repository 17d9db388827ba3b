"""Chain faults against a real anvil: RPC down / slow / answering errors (through a fault-injecting proxy in
front of the paid node's RPC), anvil restarted with the settlement transaction lost from its pool, a reorg
that drops the settlement, a gas price spike, and nonce gaps. Each must be detected and recovered, and
the node keeps serving meanwhile."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import sys
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from attribution.eip712 import Domain
from attribution.ledger import AdapterUse, FinishedRequest
from harness import RpcProxy, check_settled_books, ledger_rows, record
from node.payments import VOUCHER_HEADER, encode_voucher_header, sign_voucher
from node.settlement import SettlementConfig, Settler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "node" / "payments"))
from test_http import Server  # noqa: E402  (a plain helper class of the paid-node HTTP tests)

BODY = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def rpc(chain, method, *params):
    out = chain.w3.provider.make_request(method, list(params))
    assert "error" not in out, out
    return out["result"]


def mine(chain, n=1):
    for _ in range(n):
        rpc(chain, "evm_mine")


def nonce(chain) -> int:
    return chain.w3.eth.get_transaction_count(Account.from_key(chain.node_key).address, "latest")


def serve(ledger, gate, chain, key, n, prefix):
    payer = Account.from_key(key).address.lower()
    asyncio.run(gate.release(asyncio.run(gate.reserve(payer, 0, sign_voucher(ledger.domain, key, chain.node_id, 10**9)))))
    for i in range(n):
        now = dt.datetime.now(dt.UTC)
        ledger.record(FinishedRequest(f"{prefix}-{i}", payer, chain.node_id, (AdapterUse(1),), 10, 10, now, now))
    return payer


def settler(ledger, chain, tmp_path, **cfg) -> Settler:
    base = dict(confirmations=1, wait_poll_s=0.05, stuck_after_s=600)
    base.update(cfg)
    return Settler(ledger.db, chain.node_id, chain.settlement, chain.node_key, tmp_path / "journal", SettlementConfig(**base))


# -- the paid node behind a faulty RPC -------------------------------------------------------------

@pytest.fixture(scope="module")
def faulty_node(chain, tiny_llama_dir, tmp_path_factory):
    from node import keys
    from node.app import create_app
    from node.config import Settings

    root = tmp_path_factory.mktemp("faulty-node")
    proxy = RpcProxy(chain.anvil.url)
    os.environ[keys.PASSWORD_ENV] = "pw"
    keys.create_keystore(root / "node-key.json", "pw", private_key=chain.node_key)
    chain.extra["deployment"].save(root / "deployment.json")
    (root / "store").mkdir()
    settings = Settings(model=str(tiny_llama_dir), served_model_name="smollm2-135m-instruct", adapter_dir=root / "store",
                        dev=False, device="cpu", data_dir=root, node_id=chain.node_id, rpc_url=proxy.url,
                        deployment_file=root / "deployment.json", keystore_file=root / "node-key.json",
                        settle_confirmations=1, settle_interval_s=3600, registry_sync_s=3600,
                        base_price_per_m_input=1_000_000, base_price_per_m_output=2_000_000, escrow_cache_s=600,
                        engine_max_num_seqs=8, engine_num_lora_slots=2, engine_max_lora_rank=8, log_json=False)
    server = Server(create_app(settings))
    try:
        yield server, proxy, root
    finally:
        proxy.mode = "ok"
        server.stop()
        proxy.close()
        os.environ.pop(keys.PASSWORD_ENV, None)


def test_rpc_down_slow_or_erroring_keeps_serving_and_settles_after(faulty_node, chain):
    server, proxy, root = faulty_node
    money = server.app.state.node.extras["money"]
    settler_ = money.settler
    settler_.config = SettlementConfig(confirmations=1, wait_poll_s=0.05)
    # the web3 client's own retries would make a dead endpoint take long: tests see the raw outcome
    dom = Domain(chain.chain_id, chain.settlement.address)
    key = chain.payer(deposit=10**9)
    hdr = {VOUCHER_HEADER: encode_voucher_header(sign_voucher(dom, key, chain.node_id, 10**9))}
    url = server.url + "/v1/chat/completions"
    assert httpx.post(url, json=BODY, headers=hdr, timeout=60).status_code == 200  # escrow now cached
    served = {}
    for mode in ("down", "error", "rpc_error", "slow"):
        proxy.mode, proxy.delay = mode, 0.3
        r = httpx.post(url, json=BODY, headers=hdr, timeout=60)
        assert r.status_code == 200, r.text  # serving continues on the cached escrow
        served[mode] = r.json()["receipt_id"]
        newcomer = chain.payer(deposit=10**9)  # deposited, but the node cannot read it now
        nh = {VOUCHER_HEADER: encode_voucher_header(sign_voucher(dom, newcomer, chain.node_id, 10**9))}
        r2 = httpx.post(url, json=BODY, headers=nh, timeout=120)
        if mode == "slow":
            assert r2.status_code == 200
            served["slow-newcomer"] = r2.json()["receipt_id"]
        else:  # never granted without reading the escrow: 503 with Retry-After, nothing reserved or booked
            assert r2.status_code == 503 and r2.json()["error"]["code"] == "escrow_unavailable", r2.text
            assert int(r2.headers["retry-after"]) >= 1
            nonce0 = nonce(chain)  # read straight from anvil, not through the proxy
            with pytest.raises(Exception):
                settler_.tick()  # the scheduler's wrapper logs this and the next run retries
            assert nonce(chain) == nonce0
        st = httpx.get(server.url + "/v1/settlements", timeout=30).json()  # ledger-only route still answers
        assert st["node_id"] == chain.node_id
    proxy.mode = "ok"
    for rid in served.values():  # answers are booked just after they are sent: wait for those bookings
        assert httpx.get(f"{server.url}/v1/receipts/{rid}", timeout=30).status_code == 200
    states = settler_.settle_now(timeout_s=60, mine=lambda: mine(chain))
    assert states and all(s == "confirmed" for s in states.values()), states
    payer = Account.from_key(key).address
    totals = check_settled_books(chain, ledger_rows(root / "ledger.db"), [payer])
    for rid in served.values():
        doc = httpx.get(f"{server.url}/v1/receipts/{rid}", timeout=30).json()
        assert doc["settlement"]["settled"] is True
    record("chain", "RPC down", "proxy closes every JSON-RPC connection without answering",
           "requests of payers with a cached escrow served (200); a payer never read gets 503 escrow_unavailable + "
           "Retry-After; settlement tick raises, nothing sent; after recovery every batch confirmed")
    record("chain", "RPC answering errors", "HTTP 503 from the RPC endpoint; JSON-RPC error objects (-32603)",
           "same as RPC down: serving continues on cached escrow, uncached payers 503, settlement resumes after")
    record("chain", "RPC slow", "0.3 s added to every JSON-RPC call",
           f"requests served; settlement confirmed; books equal on chain ({totals['receipts']} receipts)")


# -- settlement faults on the settler directly ------------------------------------------------------

def test_anvil_restart_loses_the_pending_settlement_and_it_is_rebroadcast(ledger, gate, chain, adapter, tmp_path):
    """A restarted node (RPC provider) forgets its mempool: the journaled transaction is sent again."""
    key = chain.payer(deposit=10**6)
    payer = serve(ledger, gate, chain, key, 3, "restart")
    s = settler(ledger, chain, tmp_path)
    rpc(chain, "evm_setAutomine", False)
    try:
        (bid, state), = s.tick().items()
        assert state == "sent"
        j = s.journal.load(bid)
        tx = j.attempts[0].tx_hash
        assert s._known(tx)
        # an anvil restart keeps the chain (state file) but not the pool: drop the pool's transactions
        rpc(chain, "anvil_dropAllTransactions")
        assert not s._known(tx)
        assert s.advance(bid) == "sent" and s._known(tx)  # re-broadcast, same bytes
        mine(chain)
    finally:
        rpc(chain, "evm_setAutomine", True)
    assert s.settle_now(timeout_s=30, mine=lambda: mine(chain)) == {bid: "confirmed"}
    assert chain.w3.eth.get_transaction_receipt(tx)["status"] == 1 and len(s.journal.load(bid).attempts) == 1
    assert chain.settlement.functions.collected(chain.w3.to_checksum_address(payer), chain.node_id).call() == 120
    record("chain", "anvil restarted (pool lost)", "pending settleBatch dropped from the pool (anvil_dropAllTransactions)",
           "settler sees the journaled tx unknown, re-broadcasts the same signed bytes; confirmed once")


def test_reorg_drops_the_settlement_and_it_is_sent_again(ledger, gate, chain, adapter, tmp_path):
    key = chain.payer(deposit=10**6)
    payer = serve(ledger, gate, chain, key, 2, "reorg2")
    s = settler(ledger, chain, tmp_path, confirmations=3)
    (bid, state), = s.tick().items()
    assert state == "sent" and s.settled_on_chain(bid)
    assert s.advance(bid) == "confirming"
    # replace the last block (the settling one) by an empty one
    rpc(chain, "anvil_reorg", 1, [])
    dropped = not s.settled_on_chain(bid)
    states = s.settle_now(timeout_s=30, mine=lambda: mine(chain))
    assert states == {bid: "confirmed"}
    assert s.settled_on_chain(bid)
    assert chain.settlement.functions.collected(chain.w3.to_checksum_address(payer), chain.node_id).call() == 80
    record("chain", "reorg drops the settlement", "anvil_reorg depth 1 replacing the settling block with an empty one",
           ("settlement gone after the reorg; " if dropped else "reorg re-included the tx; ")
           + "settler re-checks before confirming, re-sends; batch confirmed once, payer debited once")


def test_gas_price_spike_above_the_cap_waits_then_settles(ledger, gate, chain, adapter, tmp_path):
    key = chain.payer(deposit=10**6)
    serve(ledger, gate, chain, key, 1, "spike")
    s = settler(ledger, chain, tmp_path, max_fee_per_gas_cap=10**12)
    base0 = int(chain.w3.eth.get_block("latest")["baseFeePerGas"])
    rpc(chain, "anvil_setNextBlockBaseFeePerGas", hex(10**13))
    mine(chain)
    n0 = nonce(chain)
    states = s.tick()
    assert set(states.values()) == {"error"} and nonce(chain) == n0  # refused to bid; nothing sent
    (bid,) = states
    assert not s.journal.load(bid).attempts
    rpc(chain, "anvil_setNextBlockBaseFeePerGas", hex(base0))
    mine(chain)
    assert s.settle_now(timeout_s=30, mine=lambda: mine(chain)) == {bid: "confirmed"}
    record("chain", "gas price spike", "next block base fee 10^13 wei with a 10^12 cap configured",
           "settler refuses to bid (batch state 'error', no tx signed); settles when the fee falls back")


def test_gas_spike_strands_a_pending_tx_which_is_replaced(ledger, gate, chain, adapter, tmp_path):
    key = chain.payer(deposit=10**6)
    serve(ledger, gate, chain, key, 1, "spike2")
    s = settler(ledger, chain, tmp_path, stuck_after_s=0)
    rpc(chain, "evm_setAutomine", False)
    try:
        (bid, state), = s.tick().items()
        first = s.journal.load(bid).attempts[0]
        rpc(chain, "anvil_setNextBlockBaseFeePerGas", hex(first.max_fee_per_gas * 4))
        mine(chain)  # the spike block: our tx's max fee is below its base fee, so it stays pending
        assert not s.settled_on_chain(bid)
        assert s.advance(bid) == "sent"  # stuck: replaced with the same nonce and higher fees
        second = s.journal.load(bid).attempts[-1]
        assert second.nonce == first.nonce and second.max_fee_per_gas > first.max_fee_per_gas * 4
        mine(chain)
    finally:
        rpc(chain, "evm_setAutomine", True)
    assert s.settle_now(timeout_s=30, mine=lambda: mine(chain)) == {bid: "confirmed"}
    assert chain.w3.eth.get_transaction_receipt(second.tx_hash)["status"] == 1
    record("chain", "gas spike strands a pending settlement", "base fee raised to 4x the pending tx's maxFeePerGas",
           "tx stays pending; replaced with the same nonce and fees above the new base fee; confirmed")


def test_nonce_taken_by_another_transaction_and_a_dropped_nonce_gap(ledger, gate, chain, adapter, tmp_path):
    key = chain.payer(deposit=10**6)
    serve(ledger, gate, chain, key, 2, "gap")
    s = settler(ledger, chain, tmp_path)
    signer = Account.from_key(chain.node_key)
    rpc(chain, "evm_setAutomine", False)
    try:
        (bid, _), = s.tick().items()
        a = s.journal.load(bid).attempts[0]
        # the operator uses the node key elsewhere: a higher-fee transfer takes the same nonce
        tx = signer.sign_transaction({"to": signer.address, "value": 0, "gas": 21000, "nonce": a.nonce, "chainId": chain.chain_id,
                                      "maxFeePerGas": a.max_fee_per_gas * 3, "maxPriorityFeePerGas": a.max_priority_fee_per_gas * 3,
                                      "type": 2})
        chain.w3.eth.send_raw_transaction(tx.raw_transaction)
        mine(chain)
    finally:
        rpc(chain, "evm_setAutomine", True)
    assert not s.settled_on_chain(bid)
    assert s.advance(bid) == "failed"
    assert "used by another transaction" in s.journal.load(bid).attempts[0].closed
    assert s.settle_now(timeout_s=30, mine=lambda: mine(chain)) == {bid: "confirmed"}
    assert len(s.journal.load(bid).attempts) == 2
    record("chain", "nonce taken by another transaction", "a self-transfer from the node key with the settlement's nonce",
           "settler notices the nonce used while the batch is unsettled, closes the attempt, re-signs with a new nonce")

    # a gap: a future-nonce transaction waits in the pool; the settler's next transaction fills the gap
    serve(ledger, gate, chain, key, 1, "gap2")
    n = chain.w3.eth.get_transaction_count(signer.address, "pending")
    future = signer.sign_transaction({"to": signer.address, "value": 0, "gas": 21000, "nonce": n + 1, "chainId": chain.chain_id,
                                      "maxFeePerGas": 10**11, "maxPriorityFeePerGas": 10**9, "type": 2})
    chain.w3.eth.send_raw_transaction(future.raw_transaction)
    states = s.settle_now(timeout_s=30, mine=lambda: mine(chain))
    assert set(states.values()) == {"confirmed"}, states
    assert chain.w3.eth.get_transaction_count(signer.address, "latest") == n + 2  # the queued one went through too
    record("chain", "nonce gap", "a queued transaction at nonce n+1 from the node key with nothing at n",
           "settler signs at n (the pending count), fills the gap; both mined; batch confirmed")
