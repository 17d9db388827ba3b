"""The node's FastAPI app, built in one function with one lifespan.

    create_app(settings) ──▶ FastAPI with the routers of node.api.ROUTER_MODULES, OpenAI-style errors,
                             request ids, body limits and metrics
    lifespan: start  accounting services (DevAccountant in dev mode; ledger, chain client, payments and
                     settlement scheduler otherwise), then load the engine in the background so
                     /healthz answers and /readyz says 503 while the model loads
              stop   the engine (step loop, adapter loader), then the services

Middleware is plain ASGI (not BaseHTTPMiddleware) so that a client closing a stream reaches the
streaming generator as a cancellation at once, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from node.api import ROUTER_MODULES
from node.api import errors as api_errors
from node.config import Settings
from node.errors import ConfigError
from node.logging import request_id_var
from node.metrics import Metrics
from node.serving import DevAccountant, EngineBridge, NodeState

log = logging.getLogger("openlora.app")

EngineFactory = Callable[[Settings], EngineBridge]
# services_factory(settings, app) -> async context manager; entering it sets app.state.node.accountant
# (and may set app.state.resolve_unknown / adapter_metadata); leaving it stops what it started
ServicesFactory = Callable[[Settings, FastAPI], contextlib.AbstractAsyncContextManager]


def model_id_for(settings: Settings) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    p = Path(settings.model).expanduser()
    return p.name if p.is_dir() else settings.model


def default_engine_factory(settings: Settings) -> EngineBridge:
    from node import models

    model_dir = models.resolve(settings.model, settings.models_dir)
    adapter_dir = settings.resolved_adapter_dir
    if settings.dev and not adapter_dir.is_dir():
        raise ConfigError(f"dev mode serves the adapters of {adapter_dir}, which is not a directory")
    return EngineBridge.build(settings, model_dir, model_id_for(settings), adapter_dir)


@contextlib.asynccontextmanager
async def dev_services(settings: Settings, app: FastAPI):
    """Dev mode: no database, no chain, no payment; every request is free (receipt ids 'dev-...')."""
    app.state.node.accountant = DevAccountant()
    yield


def default_services_factory(settings: Settings) -> ServicesFactory:
    if settings.dev:
        return dev_services
    # the payments side builds ledger, chain client, payment gate and settlement scheduler
    try:
        accounting = importlib.import_module("node.accounting")
    except ImportError as exc:
        raise ConfigError(f"paid serving is unavailable ({exc}); use --dev for local serving") from None
    factory = getattr(accounting, "open_services", None)
    if factory is None:
        raise ConfigError("paid serving needs node.accounting.open_services(settings, app); "
                          "use --dev for local serving without payments")
    return factory


def create_app(settings: Settings, *, engine_factory: EngineFactory | None = None,
               services_factory: ServicesFactory | None = None) -> FastAPI:
    """The node's app. Factories are parameters so tests and the CLI choose what is built; the
    defaults build the real engine from settings and the dev or paid services."""
    engine_factory = engine_factory or default_engine_factory
    services_factory = services_factory or default_services_factory(settings)
    metrics = Metrics()
    state = NodeState(settings=settings, metrics=metrics, model_id=model_id_for(settings))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.extras["started_at"] = int(time.time())
        try:
            services = services_factory(settings, app)
            await services.__aenter__()
        except Exception as exc:
            # kept for the CLI, which turns it into one line and exit code 1 once uvicorn gives up
            state.startup_error = exc
            raise
        try:
            loader = asyncio.create_task(_load_engine(state, engine_factory), name="engine-load")
            try:
                yield
            finally:
                # a load still running finishes first (a thread cannot be interrupted), then stops
                with contextlib.suppress(Exception):
                    await asyncio.shield(loader)
                state.ready = False
                if state.engine is not None:
                    await state.engine.stop()
                    log.info("engine stopped")
        finally:
            await services.__aexit__(None, None, None)

    app = FastAPI(title="OpenLoRA node", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible multi-LoRA inference with usage receipts and attribution.")
    app.state.node = state
    api_errors.install(app)
    for name in ROUTER_MODULES:
        app.include_router(importlib.import_module(name).router)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body=settings.max_request_bytes)
    return app


async def _load_engine(state: NodeState, factory: EngineFactory) -> None:
    t0 = time.monotonic()
    log.info("loading model %s", state.settings.model)
    try:
        engine = await asyncio.to_thread(factory, state.settings)
    except Exception as exc:  # the node stays up, answering 503 with the reason, rather than dying silently
        state.load_error = str(exc)
        log.error("model load failed: %s", exc)
        return
    state.engine = engine
    state.model_id = engine.model_id
    state.metrics.scrape.queue_depth = engine.queue_depth
    state.metrics.scrape.cache_stats = engine.adapters.stats
    state.ready = True
    log.info("model %s ready in %.1f s (%d adapters)", engine.model_id, time.monotonic() - t0,
             len(engine.adapter_names()))


_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class RequestContextMiddleware:
    """Per request: a new id in a contextvar for the logs and in the X-Request-ID response header (a
    client's own X-Request-ID comes back as X-Client-Request-ID and is logged beside ours); the body size limit (413); one access log
    line and the requests counter by route and status."""

    def __init__(self, app, metrics: Metrics, max_body: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        # always our own id: it keys the engine request, the ledger row and the receipt, so a client
        # must not choose it (a reused id could collide with, or replay, another request's receipt)
        rid = uuid.uuid4().hex
        given = headers.get("x-request-id", "")
        client_rid = given if _SAFE_ID.match(given) else None  # logged next to ours, for correlation
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        status = {"code": 500}
        t0 = time.monotonic()

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
                if client_rid:
                    message["headers"].append((b"x-client-request-id", client_rid.encode()))
            await send(message)

        try:
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_body:
                return await self._too_large(send_with_id)
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body:
                        raise _BodyTooLarge()
                return message

            try:
                await self.app(scope, limited_receive, send_with_id)
            except _BodyTooLarge:
                if status["code"] == 500:
                    await self._too_large(send_with_id)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, str(status["code"])).inc()
            log.info("%s %s -> %d", scope["method"], scope["path"], status["code"],
                     extra={"request_id": rid, "client_request_id": client_rid, "method": scope["method"],
                            "path": scope["path"],
                            "status": status["code"],
                            "duration_ms": round((time.monotonic() - t0) * 1000, 1)})
            request_id_var.reset(token)

    async def _too_large(self, send) -> None:
        resp = api_errors.json_error(413, f"request body larger than {self.max_body} bytes",
                                     "invalid_request_error", code="request_too_large")
        await send({"type": "http.response.start", "status": 413, "headers": resp.raw_headers})
        await send({"type": "http.response.body", "body": resp.body})


class _BodyTooLarge(StarletteHTTPException):
    """Raised from receive(): FastAPI re-raises HTTP exceptions met while reading a body, so the
    OpenAI-style handler renders it as 413."""

    def __init__(self) -> None:
        super().__init__(413, "request body too large")


__all__ = ["create_app", "dev_services", "default_engine_factory", "model_id_for", "RequestContextMiddleware"]
