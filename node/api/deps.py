"""Typed dependencies: routes receive the node's parts (engine, accountant, metrics, settings) through these."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from node.config import Settings
from node.errors import Forbidden, NotReady, Unauthorized
from node.metrics import Metrics

if TYPE_CHECKING:
    from node.serving import EngineBridge, NodeState


def get_node(request: Request) -> NodeState:
    return request.app.state.node


def get_settings(request: Request) -> Settings:
    return request.app.state.node.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.node.metrics


def get_engine(request: Request) -> EngineBridge:
    """The engine once loaded; 503 (with Retry-After) while the model is still loading or failed to."""
    node = request.app.state.node
    if node.engine is None or not node.ready:
        if node.load_error:
            raise NotReady(f"the model failed to load: {node.load_error}", code="model_load_failed")
        raise NotReady("the model is still loading; retry shortly", code="loading", retry_after=2)
    return node.engine


def get_accountant(request: Request) -> Any:
    node = request.app.state.node
    if node.accountant is None:
        raise NotReady("payments are not available yet", code="loading", retry_after=2)
    return node.accountant


def require_admin(request: Request) -> None:
    """Admin endpoints need `Authorization: Bearer <admin_token>`, except in dev mode."""
    settings: Settings = request.app.state.node.settings
    if settings.dev and settings.admin_token is None:
        return
    expected = settings.admin_token.get_secret_value() if settings.admin_token else None
    if not expected:
        raise Forbidden("admin endpoints are disabled: no admin_token is configured", code="admin_disabled")
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("admin endpoints need an 'Authorization: Bearer <admin token>' header",
                           code="missing_admin_token")
    # constant-time comparison: the token must not leak through response timing
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized("invalid admin token", code="invalid_admin_token")


NodeDep = Annotated["NodeState", Depends(get_node)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
EngineDep = Annotated["EngineBridge", Depends(get_engine)]
AccountantDep = Annotated[Any, Depends(get_accountant)]
