"""Liveness, readiness and metrics: what an orchestrator and Prometheus poll."""

from __future__ import annotations

from fastapi import APIRouter, Response

from node.api.deps import MetricsDep, NodeDep
from node.api.errors import error_responses
from node.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the model is loaded and requests are served",
            responses=error_responses(503))
async def readyz(node: NodeDep) -> dict:
    from node.errors import NotReady

    if not node.ready:
        if node.load_error:
            raise NotReady(f"the model failed to load: {node.load_error}", code="model_load_failed")
        raise NotReady("loading", code="loading", retry_after=2)
    return {"status": "ready", "model": node.model_id}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {}}}})
async def metrics(m: MetricsDep) -> Response:
    return Response(m.render(), media_type=CONTENT_TYPE)
