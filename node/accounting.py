"""The accountant the serving layer calls around every request (node.serving_types.Accountant).

    authorize  who pays (API key or a voucher header), what the request can cost at most (the highest
               price among its adapters, on the prompt and n * max_tokens), and reserve that amount
               (node.payments.PaymentGate); refuses with 401 / 402 / 404 and leaves nothing behind;
    complete   book the actual cost: one ledger transaction writes the request, its usage, credits and
               the node-signed receipt (attribution.ledger.Ledger.record), then the reservation goes;
    cancel     release the reservation; nothing billable is recorded.

The receipt id handed back is the ledger's request id (`GET /v1/receipts/{id}`). It is fixed at authorize
time (Ticket.receipt_id) because answers go out before they are booked; `wait_booked(id)` lets the
receipts route wait for a booking still in flight instead of answering 404.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from dataclasses import dataclass, field

from eth_account import Account
from fastapi import Request

from sqlalchemy import select

from attribution import models as m
from attribution.errors import LedgerError
from attribution.errors import NotFound as LedgerNotFound
from attribution.ledger import AdapterUse, FinishedRequest, Ledger
from attribution.payers import payer_for_api_key
from attribution.pricing import request_cost
from attribution.shares import BPS, apportion
from node.errors import BadRequest, NotFound, Unauthorized
from node.payments import VOUCHER_HEADER, PaymentGate, Reservation, decode_voucher_header
from node.serving_types import MaxCostInput, Usage

log = logging.getLogger(__name__)


@dataclass
class Ticket:
    """One authorized request: who pays, the adapters it may use, and what is reserved."""

    payer: str
    model: str
    adapters: dict[str, int]  # adapter name -> registry id
    max_cost: int
    received_at: dt.datetime
    reservation: Reservation
    # the ledger's request id, made here (not taken from a client-settable header) so two clients can
    # never collide on one id; known before the engine runs so a stream can send it in its headers
    receipt_id: str = field(default_factory=lambda: "rcpt-" + uuid.uuid4().hex)
    closed: bool = False


class LedgerAccountant:
    def __init__(self, ledger: Ledger, gate: PaymentGate, attributor=None):
        self.ledger, self.gate = ledger, gate
        self.node_id = ledger.config.node_id
        # node.attribution_worker.AttributionWorker, or None: contributors' parts then go to adapter owners
        self.attributor = attributor
        # receipt id -> set once its request is booked or released: GET /v1/receipts/{id} waits on it,
        # because a non-streaming answer (with its receipt id) is sent before the request is booked
        self._in_flight: dict[str, asyncio.Event] = {}

    # -- who pays ---------------------------------------------------------------------------------

    async def identify(self, request) -> tuple[str, object]:
        """(payer address, voucher or None) from `Authorization: Bearer` and/or the voucher header."""
        header = request.headers.get(VOUCHER_HEADER)
        voucher = decode_voucher_header(header) if header else None
        auth = request.headers.get("authorization", "")
        if auth:
            scheme, _, key = auth.partition(" ")
            if scheme.lower() != "bearer" or not key.strip():
                raise Unauthorized("Authorization must be 'Bearer <API key>'", code="invalid_api_key")
            try:
                payer = await asyncio.to_thread(payer_for_api_key, self.ledger.db, key.strip())
            except LedgerNotFound:
                raise Unauthorized("unknown or revoked API key; sign in at POST /v1/auth/challenge",
                                   code="invalid_api_key") from None
            return payer, voucher  # a voucher next to a key raises the key's spending cap
        if voucher is not None:
            return voucher.voucher.payer, voucher
        raise Unauthorized(f"payment required: send an {VOUCHER_HEADER} header (a signed voucher) or "
                           "'Authorization: Bearer <API key>' (POST /v1/auth/challenge, then /v1/auth/login)",
                           code="missing_credentials")

    # -- what it can cost -------------------------------------------------------------------------

    def _adapter_rows(self, names: list[str]) -> dict[str, m.Adapter]:
        rows = {}
        with self.ledger.db.reader.begin() as s:
            for name in names:
                row = s.scalars(select(m.Adapter).where(m.Adapter.name == name, m.Adapter.active.is_(True))
                                .order_by(m.Adapter.id.desc())).first()
                if row is None:
                    raise NotFound(f"adapter {name!r} is not registered for this node", code="model_not_found")
                rows[name] = row
        return rows

    def max_cost(self, hint: MaxCostInput, rows: dict[str, m.Adapter]) -> int:
        """An upper bound on the cost: a weighted mix is charged the weighted price (attribution.pricing),
        which never exceeds the highest input and output prices among its members."""
        for v, what in ((hint.prompt_tokens, "prompt tokens"), (hint.max_output_tokens, "max output tokens")):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise BadRequest(f"{what} must be a non-negative integer")
        if rows:
            p_in = max(r.price_per_m_input for r in rows.values())
            p_out = max(r.price_per_m_output for r in rows.values())
        else:
            p_in = self.ledger.config.base_price_per_m_input
            p_out = self.ledger.config.base_price_per_m_output
        return request_cost(hint.prompt_tokens, hint.max_output_tokens, p_in, p_out)

    # -- the Accountant protocol ------------------------------------------------------------------

    async def authorize(self, request, *, model: str, adapters: list[str], max_cost_hint: MaxCostInput) -> Ticket:
        received = dt.datetime.now(dt.UTC)
        payer, voucher = await self.identify(request)
        names = list(dict.fromkeys([*adapters, *max_cost_hint.adapters]))
        rows = await asyncio.to_thread(self._adapter_rows, names)
        cost = self.max_cost(max_cost_hint, rows)
        reservation = await self.gate.reserve(payer, cost, voucher)
        ticket = Ticket(payer, model, {n: r.id for n, r in rows.items()}, cost, received, reservation)
        self._in_flight[ticket.receipt_id] = asyncio.Event()
        return ticket

    async def wait_booked(self, receipt_id: str, timeout_s: float = 5.0) -> bool:
        """Wait (at most `timeout_s`) while the request of `receipt_id` is authorized and not yet booked
        or released. True when nothing is in flight for it any more (booked, released or never known)."""
        event = self._in_flight.get(receipt_id)
        if event is None:
            return True
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def _settled(self, ticket: Ticket) -> None:
        event = self._in_flight.pop(ticket.receipt_id, None)
        if event is not None:
            event.set()

    async def complete(self, ticket: Ticket, usage: Usage) -> str:
        if ticket.closed:
            raise RuntimeError("ticket already completed or cancelled")
        ticket.closed = True
        try:
            return await self._complete(ticket, usage)
        finally:
            self._settled(ticket)

    async def _complete(self, ticket: Ticket, usage: Usage) -> str:
        mix = self._mix(ticket, usage)
        shares = await self._contributor_shares(ticket, usage, mix)
        finished = dt.datetime.now(dt.UTC)
        req = FinishedRequest(
            request_id=ticket.receipt_id, payer=ticket.payer, node_id=self.node_id, adapters=mix,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, received_at=ticket.received_at,
            finished_at=max(finished, ticket.received_at),
            first_token_at=None if usage.ttft_s is None else ticket.received_at + dt.timedelta(seconds=usage.ttft_s),
            contributor_shares=shares or None)
        try:
            recorded = await self.gate.book(ticket.reservation, lambda: self.ledger.record(req))
        except LedgerError:
            log.exception("could not record request %s (%s) for payer %s", ticket.receipt_id, usage.request_id, ticket.payer)
            raise
        if recorded.cost > ticket.max_cost:
            log.warning("request %s cost %d above its reservation %d", req.request_id, recorded.cost, ticket.max_cost)
        return recorded.request_id

    async def _contributor_shares(self, ticket: Ticket, usage: Usage, mix) -> dict:
        """Proof-of-Attribution shares of the mix's Datanet-trained adapters ({} when none can be had)."""
        if self.attributor is None or not mix:
            return {}
        from node.attribution_worker import AdapterToScore

        used = {u.adapter_id for u in mix}
        with_datanet = await asyncio.to_thread(self._adapters_with_datanet, used)
        todo = [AdapterToScore(i, n) for n, i in ticket.adapters.items() if i in with_datanet]
        if not todo:
            return {}
        return await self.attributor.shares(todo, usage.prompt_token_ids, usage.output_token_ids)

    def _adapters_with_datanet(self, ids: set[int]) -> set[int]:
        with self.ledger.db.reader.begin() as s:
            return set(s.scalars(select(m.Adapter.id).where(m.Adapter.id.in_(ids), m.Adapter.datanet_id.is_not(None))))

    async def cancel(self, ticket: Ticket) -> None:
        ticket.closed = True
        try:
            await self.gate.release(ticket.reservation)
        finally:
            self._settled(ticket)

    @staticmethod
    def _mix(ticket: Ticket, usage: Usage) -> tuple[AdapterUse, ...]:
        """Adapter ids with weights in basis points summing to 10000 (the ledger's mix format)."""
        used = [(a.name, a.weight) for a in usage.adapters if a.name in ticket.adapters] or \
               [(name, 1.0) for name in ticket.adapters]
        if not used:
            return ()
        # weights arrive as floats from the request; quantize to integers before the exact split
        weights = [(ticket.adapters[n], max(int(round(w * 1_000_000)), 0)) for n, w in used]
        if sum(w for _, w in weights) == 0:
            weights = [(a, 1) for a, _ in weights]
        merged: dict[int, int] = {}
        for a, w in weights:
            merged[a] = merged.get(a, 0) + w
        return tuple(AdapterUse(a, bps) for a, bps in apportion(BPS, sorted(merged.items())) if bps > 0)





# -- the paid node's services ---------------------------------------------------------------------

@dataclass
class Money:
    """Everything the payment, receipt, reward and settlement routes need, built once per process."""

    ledger: Ledger
    gate: PaymentGate
    accountant: LedgerAccountant
    signin: object  # node.auth.SignIn
    settlement_contract: object
    settler: object = None  # node.settlement.Settler
    registry_sync: object = None  # node.registry_sync.RegistrySync
    w3: object = None

    @property
    def db(self):
        return self.ledger.db

    @property
    def node_id(self) -> int:
        return self.ledger.config.node_id


def get_money(request: Request) -> Money:
    """FastAPI dependency: the money services, or 503 when the node runs without them (dev mode)."""
    from node.errors import NotReady

    money = request.app.state.node.extras.get("money")
    if money is None:
        raise NotReady("payments are not enabled on this node (dev mode or still starting)", code="payments_disabled")
    return money


def ledger_errors(fn):
    """Turn ledger errors raised inside a route into 400 / 404 (they are the client's input)."""
    import functools

    from attribution.errors import InvalidInput

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except LedgerNotFound as exc:
            raise NotFound(str(exc)) from None
        except InvalidInput as exc:
            raise BadRequest(str(exc)) from None
    return wrapper


def build_money(settings, *, key: str | None = None, start_background: bool = True) -> Money:
    """Open the ledger (migrated to head), the chain (deployment file), the node key, and wire them."""
    from attribution.db import open_database
    from attribution.ledger import LedgerConfig
    from migrations import upgrade
    from node import keys
    from node.auth import SignIn
    from node.chain.artifacts import load_artifact
    from node.chain.deploy import load_deployment
    from node.chain.tx import connect
    from node.errors import ConfigError
    from node.payments import CachedEscrow, ContractEscrowSource
    from node.registry_sync import RegistrySync
    from node.settlement import SettlementConfig, Settler

    if settings.node_id is None:
        raise ConfigError("node_id is not set; run `openlora node register` (or use --dev)")
    key = key or keys.load_key(settings.resolved_keystore_file)
    w3 = connect(settings.rpc_url)
    dep = load_deployment(settings.resolved_deployment_file)
    contract = w3.eth.contract(address=dep.address("UsageSettlement"), abi=load_artifact("UsageSettlement").abi)
    nodes = w3.eth.contract(address=dep.address("NodeRegistry"), abi=load_artifact("NodeRegistry").abi)
    signer = nodes.functions.signerOf(settings.node_id).call()
    me = Account.from_key(key).address
    if signer.lower() != me.lower():
        raise ConfigError(f"node {settings.node_id}'s signer on chain is {signer}, not this node's key {me}")
    url = settings.resolved_database_url
    upgrade(url)  # the schema only changes through migrations; this applies any not yet applied
    db = open_database(url)
    cfg = LedgerConfig(node_id=settings.node_id, operator=settings.operator_address or me, chain_id=w3.eth.chain_id,
                       settlement_contract=contract.address, base_price_per_m_input=settings.base_price_per_m_input,
                       base_price_per_m_output=settings.base_price_per_m_output)
    ledger = Ledger(db, cfg, key)
    gate = PaymentGate(db, ledger.domain, settings.node_id,
                       CachedEscrow(ContractEscrowSource(contract), settings.node_id, ttl_s=settings.escrow_cache_s))
    money = Money(ledger, gate, LedgerAccountant(ledger, gate, _attribution_worker(settings)),
                  SignIn(db, ledger.domain, settings.node_id, site=settings.auth_domain,
                         uri=f"http://{settings.host}:{settings.port}"), contract, w3=w3)
    money.settler = Settler(db, settings.node_id, contract, key, settings.data_dir / "settlement-journal",
                            SettlementConfig(interval_s=settings.settle_interval_s, batch_size=settings.settle_batch_size,
                                             confirmations=settings.settle_confirmations,
                                             stuck_after_s=settings.settle_stuck_after_s))
    money.registry_sync = RegistrySync.from_deployment(w3, dep, ledger, settings)
    if start_background:
        money.settler.start()
        money.registry_sync.start(settings.registry_sync_s)
    return money


def _attribution_worker(settings):
    """Per-request Proof of Attribution (node/attribution_worker.py); its process starts on first use."""
    from node import models
    from node.attribution_worker import AttributionWorker

    try:
        model_dir = models.resolve(settings.model, settings.models_dir)
    except Exception:  # no model here (e.g. `openlora settle` on a machine without it): nothing to score
        return None
    return AttributionWorker(model_dir, settings.resolved_adapter_dir, max_rank=settings.engine_max_lora_rank)


def close_money(money: Money) -> None:
    if money.accountant.attributor is not None:
        money.accountant.attributor.close()
    if money.settler is not None:
        money.settler.stop()
    if money.registry_sync is not None:
        money.registry_sync.stop()
    money.ledger.db.dispose()


def registry_metadata(money: Money) -> dict[str, dict]:
    """adapter name -> its registry metadata, for every active adapter the registry sync mirrored into
    the ledger (all registered for this node's base model): what GET /v1/models lists. An adapter whose
    download failed verification is left out (it is never served). Amounts are decimal strings."""
    sync = money.registry_sync
    known = getattr(sync, "known", {}) if sync is not None else {}
    refused = getattr(sync, "refused", {}) if sync is not None else {}
    out: dict[str, dict] = {}
    with money.db.reader.begin() as s:
        # the row a request of this name is billed by (_adapter_rows: the highest active id)
        for a in s.scalars(select(m.Adapter).where(m.Adapter.active.is_(True)).order_by(m.Adapter.id.desc())):
            if not a.name or a.name in out or refused.get(a.name) == a.content_hash:
                continue
            reg = known.get(a.name)
            out[a.name] = {
                "adapter_id": int(a.id), "owner": a.owner,
                "price_per_m_input": str(a.price_per_m_input), "price_per_m_output": str(a.price_per_m_output),
                "revenue_split": {"owner_bps": a.owner_bps, "contributors_bps": a.contributors_bps,
                                  "operator_bps": a.operator_bps},
                "datanet_id": a.datanet_id, "content_hash": a.content_hash,
                "uri": reg.uri if reg is not None and reg.adapter_id == a.id else None,
                "version": reg.version if reg is not None and reg.adapter_id == a.id else None,
                "synced_block": int(a.synced_block),
            }
    return out


def open_services(settings, app):
    """The paid node's services for node.app (an async context manager)."""
    import contextlib

    @contextlib.asynccontextmanager
    async def services():
        money = await asyncio.to_thread(build_money, settings)
        app.state.node.extras["money"] = money
        app.state.node.accountant = money.accountant

        async def resolve_unknown(name: str) -> bool:
            """Cold start: pull a registered adapter (off the event loop) and hand it to the engine."""
            path = await asyncio.to_thread(money.registry_sync.resolve_unknown, name)
            engine = app.state.node.engine
            if path is None or engine is None:
                return False
            if not engine.has_adapter(name):
                engine.register_adapter(name, path)
            return True

        async def registered_adapters() -> dict[str, dict]:
            return await asyncio.to_thread(registry_metadata, money)

        async def adapter_metadata(name: str) -> dict | None:
            return (await registered_adapters()).get(name)

        app.state.resolve_unknown = resolve_unknown
        app.state.registered_adapters = registered_adapters  # GET /v1/models: registered, not yet pulled
        app.state.adapter_metadata = adapter_metadata
        try:
            yield
        finally:
            app.state.node.accountant = None
            app.state.node.extras.pop("money", None)
            await asyncio.to_thread(close_money, money)

    return services()

__all__ = ["LedgerAccountant", "Money", "Ticket", "build_money", "get_money", "open_services", "registry_metadata"]
