"""Settlement: turn the ledger's unsettled receipts into `settleBatch` transactions, exactly once.

A batch comes from the ledger's deterministic builder (attribution.batches.build_batch); this module
only moves it along the ledger's state machine by what it observes on chain. Each `advance(batch_id)`
is a pure function of three things, so a fresh `Settler` on the same database and journal after a crash
continues where the old one stopped:

    ledger   the batch row (pending / submitted / confirmed / failed) and its settleBatch arguments;
    journal  <journal_dir>/<batch id>.json: every transaction signed for the batch (nonce, fees, raw
             bytes, hash), written and fsynced BEFORE the transaction is broadcast;
    chain    UsageSettlement.getBatch(nodeId, batchId).settledAt, the signer's mined nonce, receipts.

advance() asks the chain first. Settled -> wait for `confirmations` blocks, re-check it is still settled
(a reorg may have dropped it) and mark it confirmed. Not settled -> if the last journaled transaction's
nonce is still open, re-broadcast that very transaction (same bytes: it can only be mined once), and
replace it with the same nonce and bumped EIP-1559 fees when it is stuck; if that nonce was used and the
batch still is not settled, the attempt reverted (or a reorg removed it): record the failure, and the
next advance signs a new attempt. Nothing is ever sent for a batch the chain reports settled, and the
contract refuses a batch id twice (BatchAlreadySettled), so a receipt is never paid twice; receipts never
leave their batch (ledger constraint), so none is lost.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eth_account import Account
from sqlalchemy import func, select

from attribution import models as m
from attribution.batches import build_batch, mark_confirmed, mark_failed, mark_submitted, settle_args
from attribution.db import Database
from attribution.errors import BatchStateError
from node.errors import NodeError

log = logging.getLogger(__name__)


class SettlementError(NodeError):
    """A settlement batch could not be sent or confirmed."""


@dataclass(frozen=True)
class SettlementConfig:
    interval_s: float = 300.0  # settle at least this often when there is anything to settle
    batch_size: int = 500  # ... or as soon as this many receipts wait
    check_every_s: float = 10.0  # how often the size trigger looks
    max_receipts: int = 10_000  # per batch
    confirmations: int = 2  # blocks on top of the settling block before a batch counts as confirmed
    stuck_after_s: float = 120.0  # a pending transaction older than this is replaced with higher fees
    fee_bump_percent: int = 25  # nodes require at least +10% to replace; 25 leaves room
    gas_margin_percent: int = 20
    max_fee_per_gas_cap: int | None = None  # refuse to bid above this (wei); None: no cap
    wait_poll_s: float = 0.5


@dataclass
class Attempt:
    nonce: int
    tx_hash: str
    raw: str
    max_fee_per_gas: int
    max_priority_fee_per_gas: int
    gas: int
    signed_at: float
    closed: str | None = None  # why the attempt is over (reverted, dropped), None while it may still land


@dataclass
class Journal:
    batch_id: str
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def open(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts and self.attempts[-1].closed is None else None


class JournalStore:
    """One JSON file per batch, replaced atomically (write temp, fsync, rename, fsync dir)."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, batch_id: str) -> Path:
        if not (batch_id.startswith("0x") and len(batch_id) == 66):
            raise SettlementError(f"bad batch id {batch_id!r}")
        return self.dir / f"{batch_id.lower()}.json"

    def load(self, batch_id: str) -> Journal:
        p = self._path(batch_id)
        if not p.exists():
            return Journal(batch_id)
        doc = json.loads(p.read_text())
        return Journal(doc["batch_id"], [Attempt(**a) for a in doc["attempts"]])

    def save(self, j: Journal) -> None:
        p = self._path(j.batch_id)
        tmp = p.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"batch_id": j.batch_id, "attempts": [asdict(a) for a in j.attempts]}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _hex(b) -> str:
    h = b.hex() if hasattr(b, "hex") else str(b)
    return h if h.startswith("0x") else "0x" + h


def _underpriced(exc: Exception) -> bool:
    """The node refuses a transaction for its fees (below the base fee, or too low to replace)."""
    text = str(exc).lower()
    return any(k in text for k in ("less than block base fee", "fee cap less than", "underpriced", "max fee per gas less"))


def _revert_reason(exc: Exception, abi: list) -> str:
    """`InsufficientEscrow(payer=0x.., ...)` for a custom error of the contract, else the exception text."""
    from eth_abi import decode as abi_decode
    from eth_utils import keccak

    data = next((a for a in getattr(exc, "args", ()) if isinstance(a, str) and a.startswith("0x") and len(a) >= 10), None)
    if data is not None:
        for item in abi:
            if item.get("type") != "error":
                continue
            types = [i["type"] for i in item["inputs"]]
            if keccak(text=f"{item['name']}({','.join(types)})")[:4].hex() == data[2:10]:
                try:
                    values = abi_decode(types, bytes.fromhex(data[10:]))
                except Exception:
                    return item["name"]
                return f"{item['name']}(" + ", ".join(f"{i['name']}={v}" for i, v in zip(item["inputs"], values)) + ")"
    return f"{type(exc).__name__}: {exc}"[:500]


class Settler:
    """Builds, sends and confirms settlement batches for one node (see the module docstring)."""

    def __init__(self, db: Database, node_id: int, settlement_contract, signer_key, journal_dir: Path,
                 config: SettlementConfig | None = None):
        self.db, self.node_id, self.contract = db, node_id, settlement_contract
        self.w3 = settlement_contract.w3
        self._key = signer_key  # never logged
        self.signer = Account.from_key(signer_key).address
        self.journal = JournalStore(journal_dir)
        self.config = config or SettlementConfig()
        self._lock = threading.Lock()  # one settler pass at a time (scheduler job vs `settle --now`)
        self._scheduler = None

    # -- chain reads ------------------------------------------------------------------------------

    def settled_on_chain(self, batch_id: str) -> bool:
        b = self.contract.functions.getBatch(self.node_id, bytes.fromhex(batch_id[2:])).call(block_identifier="latest")
        return int(b[3]) != 0  # Batch.settledAt

    def _settled_block(self, batch_id: str, j: Journal) -> int | None:
        for a in reversed(j.attempts):
            r = self._receipt(a.tx_hash)
            if r is not None and r["status"] == 1:
                return r["blockNumber"]
        # settled by a transaction we have no journal of (journal lost): find the event
        logs = self.contract.events.BatchSettled().get_logs(
            from_block=0, argument_filters={"nodeId": self.node_id, "batchId": bytes.fromhex(batch_id[2:])})
        return logs[-1]["blockNumber"] if logs else None

    def _receipt(self, tx_hash: str):
        from web3.exceptions import TransactionNotFound

        try:
            return self.w3.eth.get_transaction_receipt(tx_hash)
        except TransactionNotFound:
            return None

    def _known(self, tx_hash: str) -> bool:
        from web3.exceptions import TransactionNotFound

        try:
            self.w3.eth.get_transaction(tx_hash)
            return True
        except TransactionNotFound:
            return False

    # -- building transactions --------------------------------------------------------------------

    def _call(self, batch_id: str):
        a = settle_args(self.db, batch_id)
        cs = self.w3.to_checksum_address
        debits = [(((cs(d["voucher"]["payer"]), d["voucher"]["nodeId"], d["voucher"]["cumulativeValue"], d["voucher"]["timestamp"]),
                    bytes.fromhex(d["signature"][2:])), d["amount"]) for d in a["debits"]]
        credits = [(self.w3.to_checksum_address(c["payee"]), c["amount"]) for c in a["credits"]]
        return self.contract.functions.settleBatch(a["nodeId"], bytes.fromhex(a["batchId"][2:]),
                                                   bytes.fromhex(a["root"][2:]), a["receiptCount"], debits, credits)

    def _fees(self, previous: Attempt | None) -> tuple[int, int]:
        base = int(self.w3.eth.get_block("latest").get("baseFeePerGas", 0) or 0)
        try:
            tip = int(self.w3.eth.max_priority_fee)
        except Exception:  # some nodes lack eth_maxPriorityFeePerGas
            tip = 10**9
        max_fee = 2 * base + tip
        if previous is not None:
            bump = 100 + self.config.fee_bump_percent
            tip = max(tip, -(-previous.max_priority_fee_per_gas * bump // 100))
            max_fee = max(max_fee, -(-previous.max_fee_per_gas * bump // 100), tip)
        cap = self.config.max_fee_per_gas_cap
        if cap is not None and max_fee > cap:
            raise SettlementError(f"gas price {max_fee} wei is above the configured cap {cap}")
        return max_fee, tip

    def _sign(self, batch_id: str, nonce: int, previous: Attempt | None) -> Attempt:
        call = self._call(batch_id)
        gas = previous.gas if previous is not None else call.estimate_gas({"from": self.signer})
        gas = gas if previous is not None else gas * (100 + self.config.gas_margin_percent) // 100
        max_fee, tip = self._fees(previous)
        tx = call.build_transaction({"from": self.signer, "nonce": nonce, "gas": gas, "chainId": self.w3.eth.chain_id,
                                     "maxFeePerGas": max_fee, "maxPriorityFeePerGas": tip, "type": 2})
        signed = Account.sign_transaction(tx, self._key)
        return Attempt(nonce, _hex(signed.hash), _hex(signed.raw_transaction), max_fee, tip, gas, time.time())

    def _broadcast(self, a: Attempt) -> None:
        try:
            self.w3.eth.send_raw_transaction(a.raw)
        except Exception as exc:
            text = str(exc).lower()
            # The same bytes again: the node already has it, or it was mined (nonce used); both are fine.
            if "already known" in text or "known transaction" in text or "nonce too low" in text:
                return
            raise

    # -- the state machine driver -----------------------------------------------------------------

    def prepare(self, batch_id: str) -> Attempt | None:
        """Sign a new attempt (or a fee-bumped replacement) and persist it; does not broadcast.
        Returns None, changing nothing, when the chain already has the batch."""
        if self.settled_on_chain(batch_id):
            return None
        j = self.journal.load(batch_id)
        prev = j.open
        if prev is not None:
            a = self._sign(batch_id, prev.nonce, prev)
        else:
            nonce = self.w3.eth.get_transaction_count(self.signer, "pending")
            a = self._sign(batch_id, nonce, None)
        j.attempts.append(a)
        self.journal.save(j)  # persisted before anyone can see the transaction
        self._set_submitted(batch_id, a.tx_hash)
        return a

    def _set_submitted(self, batch_id: str, tx_hash: str) -> None:
        with self.db.reader.begin() as s:
            status, current = s.execute(select(m.SettlementBatch.status, m.SettlementBatch.tx_hash)
                                        .where(m.SettlementBatch.id == batch_id)).one()
        if status == "submitted" and current == tx_hash.lower():
            return
        if status == "submitted":  # a replacement: the state machine records it as a retry
            mark_failed(self.db, batch_id, "replaced by a transaction with higher fees")
        mark_submitted(self.db, batch_id, tx_hash)

    def advance(self, batch_id: str) -> str:
        """One step for one batch; returns its state: confirmed, confirming, sent, failed."""
        with self.db.reader.begin() as s:
            batch = s.get(m.SettlementBatch, batch_id)
            if batch is None:
                raise SettlementError(f"no settlement batch {batch_id}")
            status = batch.status
        if status == "confirmed":
            return "confirmed"
        j = self.journal.load(batch_id)
        if self.settled_on_chain(batch_id):
            block = self._settled_block(batch_id, j)
            head = self.w3.eth.block_number
            if block is None or head - block + 1 < self.config.confirmations:
                return "confirming"
            # Re-read at the head after the wait: a reorg inside the window would have un-settled it.
            if not self.settled_on_chain(batch_id):
                return "sent"
            if status != "submitted":
                winner = next((a.tx_hash for a in reversed(j.attempts) if (r := self._receipt(a.tx_hash)) and r["status"] == 1),
                              None)
                self._set_submitted(batch_id, winner or "0x" + "00" * 32)
            mark_confirmed(self.db, batch_id, int(block))
            log.info("settlement batch %s confirmed in block %d", batch_id, block)
            return "confirmed"

        # Not settled on chain.
        a = j.open
        if a is not None:
            mined_nonce = self.w3.eth.get_transaction_count(self.signer, "latest")
            if mined_nonce > a.nonce:
                # the nonce was used but the batch is not settled: our tx reverted, or another tx took it
                r = next((r for x in reversed(j.attempts) if x.nonce == a.nonce and (r := self._receipt(x.tx_hash))), None)
                why = "transaction reverted" if r is not None and r["status"] == 0 else f"nonce {a.nonce} used by another transaction"
                a.closed = why
                self.journal.save(j)
                if status != "failed":
                    mark_failed(self.db, batch_id, why)
                log.warning("settlement batch %s: %s; will retry with a new transaction", batch_id, why)
                return "failed"
            if status != "submitted":
                self._set_submitted(batch_id, a.tx_hash)  # crash between journal and ledger update
            if not any(self._known(x.tx_hash) for x in j.attempts if x.nonce == a.nonce):
                log.info("settlement batch %s: re-broadcasting journaled transaction %s", batch_id, a.tx_hash)
                try:
                    self._broadcast(a)
                except Exception as exc:
                    # A fee spike got the journaled transaction evicted and now refused as underpriced:
                    # resending the same bytes can never succeed, so replace it (same nonce, fees over
                    # the current base fee; the fee cap still applies).
                    if not _underpriced(exc):
                        raise
                    new = self.prepare(batch_id)
                    if new is not None:
                        log.info("settlement batch %s: %s is underpriced now (%s); replacing it with %s",
                                 batch_id, a.tx_hash, exc, new.tx_hash)
                        self._broadcast(new)
            elif time.time() - a.signed_at > self.config.stuck_after_s:
                new = self.prepare(batch_id)
                if new is not None:
                    log.info("settlement batch %s: replacing stuck %s with %s (nonce %d)", batch_id, a.tx_hash, new.tx_hash, new.nonce)
                    self._broadcast(new)
            return "sent"

        # No open attempt: simulate first so a batch the contract would refuse costs no gas.
        try:
            self._call(batch_id).estimate_gas({"from": self.signer})
        except Exception as exc:
            reason = _revert_reason(exc, self.contract.abi)
            if status != "failed":
                mark_failed(self.db, batch_id, reason)
            log.warning("settlement batch %s would revert: %s", batch_id, reason)
            return "failed"
        new = self.prepare(batch_id)
        if new is not None:
            self._broadcast(new)
        return "sent"

    def in_flight(self) -> list[str]:
        with self.db.reader.begin() as s:
            return list(s.scalars(select(m.SettlementBatch.id).where(
                m.SettlementBatch.node_id == self.node_id, m.SettlementBatch.status != "confirmed")
                .order_by(m.SettlementBatch.created_at, m.SettlementBatch.id)))

    def unbatched(self) -> int:
        with self.db.reader.begin() as s:
            return s.scalar(select(func.count()).select_from(m.Receipt)
                            .outerjoin(m.BatchReceipt, m.BatchReceipt.request_id == m.Receipt.request_id)
                            .where(m.BatchReceipt.request_id.is_(None), m.Receipt.node_id == self.node_id))

    def tick(self, *, build: bool = True) -> dict[str, str]:
        """One pass: advance every unconfirmed batch, then build a new one when none is waiting."""
        with self._lock:
            states = {}
            for bid in self.in_flight():
                try:
                    states[bid] = self.advance(bid)
                except (BatchStateError, SettlementError) as exc:
                    states[bid] = "error"
                    log.warning("settlement batch %s: %s", bid, exc)
            if build and not any(s in ("sent", "confirming") for s in states.values()):
                plan = build_batch(self.db, self.node_id, max_receipts=self.config.max_receipts)
                if plan is not None:
                    log.info("built settlement batch %s: %d receipts, total %d", plan.batch_id, len(plan.leaves), plan.total)
                    try:  # as above: a refusal to send (fee cap) is this batch's state, not the pass's failure
                        states[plan.batch_id] = self.advance(plan.batch_id)
                    except (BatchStateError, SettlementError) as exc:
                        states[plan.batch_id] = "error"
                        log.warning("settlement batch %s: %s", plan.batch_id, exc)
            return states

    def settle_now(self, timeout_s: float = 120.0, mine=None) -> dict[str, str]:
        """Build and drive batches until every one is confirmed or failed, or `timeout_s` passes.
        `mine` (tests, local chains) is called between polls to produce blocks."""
        deadline = time.monotonic() + timeout_s
        states = self.tick()
        while time.monotonic() < deadline:
            if any(s in ("sent", "confirming") for s in states.values()):
                if mine is not None:
                    mine()
                time.sleep(self.config.wait_poll_s)
                states = {**states, **self.tick(build=False)}
                continue
            # A batch left over from an earlier pass (an RPC outage, a crash) was driven first; receipts
            # that arrived since still wait: build their batch too instead of reporting success.
            if self.unbatched() == 0:
                break
            new = self.tick()
            if not set(new) - set(states):  # nothing new could be built
                states = {**states, **new}
                break
            states = {**states, **new}
        return states

    # -- scheduling -------------------------------------------------------------------------------

    def _size_trigger(self) -> None:
        if self.unbatched() >= self.config.batch_size:
            self.tick()

    def start(self) -> None:
        """Run in the background (APScheduler): every interval, and whenever batch_size receipts wait."""
        from apscheduler.schedulers.background import BackgroundScheduler

        sched = BackgroundScheduler(daemon=True)
        opts = dict(max_instances=1, coalesce=True, misfire_grace_time=None)
        sched.add_job(self._safe(self.tick), "interval", seconds=self.config.interval_s, id="settle-interval", **opts)
        sched.add_job(self._safe(self._size_trigger), "interval", seconds=self.config.check_every_s, id="settle-size", **opts)
        sched.start()
        self._scheduler = sched

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None

    @staticmethod
    def _safe(fn):
        def run():
            try:
                fn()
            except Exception:  # an RPC outage must not kill the scheduler; the next run retries
                log.exception("settlement job failed")
        return run


def status(db: Database, node_id: int, *, limit: int = 50) -> dict:
    """What `GET /v1/settlements` shows: recent batches and how many receipts wait for one."""
    with db.reader.begin() as s:
        rows = s.scalars(select(m.SettlementBatch).where(m.SettlementBatch.node_id == node_id)
                         .order_by(m.SettlementBatch.created_at.desc(), m.SettlementBatch.id).limit(limit)).all()
        waiting = s.scalar(select(func.count()).select_from(m.Receipt)
                           .outerjoin(m.BatchReceipt, m.BatchReceipt.request_id == m.Receipt.request_id)
                           .where(m.BatchReceipt.request_id.is_(None), m.Receipt.node_id == node_id))
    return {"node_id": node_id, "unbatched_receipts": waiting, "batches": [
        {"batch_id": b.id, "status": b.status, "merkle_root": b.merkle_root, "receipt_count": b.receipt_count,
         "total": str(b.total_amount), "tx_hash": b.tx_hash, "block_number": b.block_number, "attempts": b.attempts,
         "last_error": b.last_error, "created_at": b.created_at.isoformat(), "updated_at": b.updated_at.isoformat()}
        for b in rows]}


__all__ = ["Attempt", "JournalStore", "SettlementConfig", "SettlementError", "Settler", "status"]
