"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

A request goes through the same steps whether it streams or not:
    1. validate (pydantic, then the engine's own SamplingParams checks) and resolve `model` / `adapters`
       (an unknown adapter is 404 unless the registry sync can pull it: app.state.resolve_unknown);
    2. tokenize and check sizes (413 prompt too large, 400 prompt + max_tokens past the context);
    3. refuse with 429 when the engine already holds max_queued_requests;
    4. accountant.authorize (401/402/404) reserves the maximum cost;
    5. the engine runs it; on the end accountant.complete books it (after the last byte of the answer was
       handed to the server, streaming or not: an answer never sent is never charged), on any early end
       (client gone, engine error, the answer not sent) accountant.cancel releases the reservation.
Steps 1-4 change nothing when they refuse. Extensions to OpenAI's shapes: `adapters` and `fusion` in
requests; `receipt_id` in responses (and the X-OpenLoRA-Receipt header); usage on every stream's last
chunk, whether or not stream_options.include_usage asked for it.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.adapters import STRATEGIES, FusedMix, check_name
from engine.errors import AdapterError, EngineError, RequestError
from engine.sampling_params import SamplingParams
from node.api.deps import AccountantDep, EngineDep, MetricsDep, NodeDep, SettingsDep
from node.api.errors import api_error_response, error_body, error_responses
from node.errors import ApiError, BadRequest, NotFound, Overloaded, PayloadTooLarge
from node.serving_types import AdapterUsage, MaxCostInput, Usage

log = logging.getLogger("openlora.api.openai")
router = APIRouter(prefix="/v1", tags=["openai"])

RECEIPT_HEADER = "X-OpenLoRA-Receipt"
MAX_STOP_STRINGS = 16
MAX_MIX_MEMBERS = 8
_UNSUPPORTED = ("tools", "functions", "tool_choice", "function_call", "response_format", "logit_bias", "suffix",
                "best_of", "audio", "modalities", "prediction")


# ---------------------------------------------------------------------------------------------- schemas

class AdapterWeight(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    weight: float = Field(default=1.0, ge=-10.0, le=10.0)

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v) or v == 0.0:
            raise ValueError("weight must be a finite non-zero number")
        return v


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(BaseModel):
    # unknown OpenAI fields (user, metadata, ...) are accepted and ignored, as other compatible servers do
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256, description="base model id or adapter name")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1)
    user: str | None = None
    # extensions
    top_k: int | None = Field(default=None, ge=0, description="extension: keep the k most likely tokens")
    min_tokens: int = Field(default=0, ge=0, description="extension: no end-of-sequence before this many tokens")
    ignore_eos: bool = Field(default=False, description="extension: generate max_tokens whatever the model says")
    adapters: list[AdapterWeight] | None = Field(
        default=None, min_length=1, max_length=MAX_MIX_MEMBERS,
        description="extension: a weighted mix of adapters served as one (model must be the base model)")
    fusion: Literal["linear", "ties", "dare"] | None = Field(
        default=None, description="extension: how `adapters` are fused (default linear)")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        # other OpenAI fields are ignored, but these change what the client expects back: refuse them
        # rather than answer as if they had been honoured
        if isinstance(data, dict):
            for key in _UNSUPPORTED:
                value = data.get(key)
                if value in (None, [], {}, "none", "auto") or (key == "response_format" and value == {"type": "text"}):
                    continue
                if key == "best_of" and value == data.get("n", 1):
                    continue
                raise ValueError(f"{key} is not supported by this server")
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        # "developer" is OpenAI's new name for the system role; templates know only "system"
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class UsageBody(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBody
    receipt_id: str | None = Field(default=None, description="extension: the signed usage receipt's id")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageBody
    receipt_id: str | None = None


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    openlora: dict[str, Any] | None = Field(default=None, description="extension: adapter details")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_SSE = {"text/event-stream": {"schema": {"type": "string"}, "description": "with stream: true"}}
_GENERATE_ERRORS = error_responses(400, 401, 402, 404, 413, 422, 429, 503)


# ---------------------------------------------------------------------------------------------- models

@router.get("/models", response_model=ModelList, summary="The base model and every adapter this node serves",
            responses=error_responses(503))
async def list_models(request: Request, engine: EngineDep, node: NodeDep) -> ModelList:
    """The base model, the adapters the engine holds (`openlora.availability` "local") and, on a paid
    node, every adapter registered on chain for this base model and not downloaded yet ("on_first_use":
    pulled and verified on its first request), each with its registry metadata."""
    registered = await _registered(request)
    cards = [_base_card(node, engine)]
    local = set()
    for spec, tier, _slot, _refs, pinned in engine.adapters.list():
        if spec.path is None:  # cached fused mixes are not models a client can name
            continue
        local.add(spec.name)
        cards.append(await _adapter_card(request, node, spec, tier, pinned, registered))
    for name, meta in sorted((registered or {}).items()):
        if name not in local:
            cards.append(_registered_card(node, name, meta))
    return ModelList(data=cards)


@router.get("/models/{model_id}", response_model=ModelCard, summary="One model or adapter",
            responses=error_responses(404, 503))
async def retrieve_model(model_id: str, request: Request, engine: EngineDep, node: NodeDep) -> ModelCard:
    if model_id == node.model_id:
        return _base_card(node, engine)
    registered = await _registered(request)
    for spec, tier, _slot, _refs, pinned in engine.adapters.list():
        if spec.path is not None and spec.name == model_id:
            return await _adapter_card(request, node, spec, tier, pinned, registered)
    if registered and model_id in registered:
        return _registered_card(node, model_id, registered[model_id])
    raise NotFound(f"the model {model_id!r} does not exist on this node", param="model", code="model_not_found")


def _base_card(node, engine) -> ModelCard:
    return ModelCard(id=node.model_id, created=node.extras.get("started_at", 0), owned_by="openlora",
                     openlora={"kind": "base", "max_model_len": engine.max_model_len})


async def _registered(request: Request) -> dict[str, dict] | None:
    """name -> registry metadata of every servable registered adapter (app.state.registered_adapters, set
    by the paid node's services); None without a registry."""
    hook = getattr(request.app.state, "registered_adapters", None)
    if hook is None:
        return None
    try:
        out = hook()
        if inspect.isawaitable(out):
            out = await out
        return dict(out)
    except Exception:  # the listing still shows what the engine holds
        log.warning("registered adapters unavailable", exc_info=True)
        return None


def _registered_card(node, name: str, meta: dict) -> ModelCard:
    return ModelCard(id=name, created=node.extras.get("started_at", 0), owned_by="openlora", parent=node.model_id,
                     openlora={"kind": "adapter", "availability": "on_first_use", "registry": meta})


async def _adapter_card(request: Request, node, spec, tier: str, pinned: bool,
                        registered: dict[str, dict] | None = None) -> ModelCard:
    info: dict[str, Any] = {
        "kind": "adapter", "availability": "local", "rank": spec.rank, "lora_alpha": spec.alpha,
        "target_modules": list(spec.target_modules), "content_hash": spec.content_hash, "tier": tier,
        "pinned": pinned,
    }
    extra = None
    if registered is not None:
        extra = registered.get(spec.name)
    else:
        meta = getattr(request.app.state, "adapter_metadata", None)  # registry metadata, when the node has it
        if meta is not None:
            try:
                extra = meta(spec.name)
                if inspect.isawaitable(extra):
                    extra = await extra
            except Exception:  # registry metadata is decoration: never fail the listing on it
                log.warning("registry metadata for %s unavailable", spec.name, exc_info=True)
                extra = None
    if extra:
        info["registry"] = extra
    return ModelCard(id=spec.name, created=node.extras.get("started_at", 0), owned_by="openlora",
                     parent=node.model_id, openlora=info)


# ---------------------------------------------------------------------------------------------- plan

@dataclass
class Plan:
    """Everything decided before the engine runs; building one changes nothing."""

    request_id: str
    model: str
    adapter: Any  # None | adapter name | FusedMix
    members: tuple[tuple[str, float], ...]  # (adapter name, weight) as billed; () = base model
    fusion: str | None
    prompt_ids: list[int]
    params: SamplingParams
    include_usage: bool
    stream: bool
    created: int
    pull: list[tuple[str, str]]  # adapters to pull from the registry once the request is authorized


def _check_adapter(request: Request, engine, name: str, param: str) -> bool:
    """True when the engine serves `name`; False when only the registry hook might pull it; else 404."""
    try:
        check_name(name)
    except AdapterError as exc:
        raise NotFound(f"the model {name!r} does not exist: {exc}", param=param, code="model_not_found") from None
    if engine.has_adapter(name):
        return True
    if getattr(request.app.state, "resolve_unknown", None) is None:
        raise NotFound(f"the model {name!r} does not exist on this node", param=param, code="model_not_found")
    return False


async def resolve_adapter(request: Request, engine, name: str, param: str) -> None:
    """Make `name` servable: registered already, or pulled now through app.state.resolve_unknown
    (the registry sync's cold-start hook); 404 otherwise."""
    if _check_adapter(request, engine, name, param):
        return
    resolve = request.app.state.resolve_unknown
    try:
        result = resolve(name)
        if inspect.isawaitable(result):
            result = await result
    except ApiError:
        raise
    except Exception as exc:  # a registry or download failure is reported, not a 500 with a trace
        log.warning("pulling adapter %s from the registry failed: %s", name, exc)
        raise NotFound(f"the adapter {name!r} could not be pulled from the registry", param=param,
                       code="model_not_found") from None
    if result is False or not engine.has_adapter(name):
        raise NotFound(f"the model {name!r} does not exist on this node", param=param, code="model_not_found")


async def _plan(request: Request, body: _SamplingFields, engine, node, settings, prompt_ids: list[int],
                max_tokens: int | None, logprobs: int | None) -> Plan:
    # --- model / adapters ---
    members: tuple[tuple[str, float], ...] = ()
    adapter = None
    pull: list[tuple[str, str]] = []  # (name, param) of adapters the registry hook must pull first
    if body.adapters:
        if body.model != node.model_id:
            raise BadRequest(f"with `adapters`, `model` must be the base model {node.model_id!r}", param="model")
        names = [a.name for a in body.adapters]
        if len(set(names)) != len(names):
            raise BadRequest("each adapter may appear once in `adapters`", param="adapters")
        for i, a in enumerate(body.adapters):
            if not _check_adapter(request, engine, a.name, f"adapters[{i}].name"):
                pull.append((a.name, f"adapters[{i}].name"))
        members = tuple((a.name, a.weight) for a in body.adapters)
        if len(members) == 1 and members[0][1] == 1.0 and body.fusion is None:
            adapter = members[0][0]
        else:
            adapter = FusedMix(members=members, strategy=body.fusion or "linear")
    elif body.fusion is not None:
        raise BadRequest("`fusion` needs `adapters`", param="fusion")
    elif body.model != node.model_id:
        if not _check_adapter(request, engine, body.model, "model"):
            pull.append((body.model, "model"))
        adapter, members = body.model, ((body.model, 1.0),)
    if isinstance(adapter, FusedMix) and adapter.strategy not in STRATEGIES:
        raise BadRequest(f"unknown fusion {adapter.strategy!r}", param="fusion")

    # --- sizes ---
    limit = engine.max_model_len
    max_prompt = min(settings.max_prompt_tokens or limit - 1, limit - 1)
    if not prompt_ids:
        raise BadRequest("the prompt is empty", param="prompt")
    if len(prompt_ids) > max_prompt:
        raise PayloadTooLarge(f"the prompt has {len(prompt_ids)} tokens; this node accepts at most {max_prompt}",
                              param="messages", code="context_length_exceeded")
    room = limit - len(prompt_ids)
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise BadRequest(f"this model's context is {limit} tokens; the prompt has {len(prompt_ids)} and "
                         f"max_tokens asks for {max_tokens}", param="max_tokens", code="context_length_exceeded")

    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    params = SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
        max_tokens=max_tokens, min_tokens=min(body.min_tokens, max_tokens), ignore_eos=body.ignore_eos,
        n=body.n, stop=stop, logprobs=logprobs,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty)
    params.validate(engine.vocab_size)  # RequestError -> 400, before anything is reserved

    # --- capacity ---
    # the place is taken here and given back by _serve once the request is submitted or refused
    if not engine.admit(settings.max_queued_requests):
        raise Overloaded(f"the engine queue is full ({engine.in_flight + engine.admitting} requests); retry shortly",
                         code="queue_full", retry_after=1)

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Plan(request.state.request_id, body.model, adapter, members, body.fusion if body.adapters else None,
                prompt_ids, params, include_usage, body.stream, int(time.time()), pull)


# ---------------------------------------------------------------------------------------------- routes

@router.post("/chat/completions", response_model=ChatCompletion, summary="Chat completion (OpenAI)",
             responses={**_GENERATE_ERRORS, 200: {"content": _SSE}})
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: EngineDep, node: NodeDep,
                           settings: SettingsDep, accountant: AccountantDep, metrics: MetricsDep):
    if body.top_logprobs is not None and not body.logprobs:
        raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    try:
        prompt_ids = engine.tokenizer.encode_chat([m.as_template_input() for m in body.messages])
    except RequestError as exc:
        raise BadRequest(str(exc), param="messages") from None
    lp = (body.top_logprobs or 0) if body.logprobs else None
    plan = await _plan(request, body, engine, node, settings, prompt_ids,
                       body.max_completion_tokens or body.max_tokens, lp)
    return await _serve(request, plan, engine, accountant, metrics, chat=True)


@router.post("/completions", response_model=Completion, summary="Text completion (OpenAI legacy)",
             responses={**_GENERATE_ERRORS, 200: {"content": _SSE}})
async def completions(body: CompletionRequest, request: Request, engine: EngineDep, node: NodeDep,
                      settings: SettingsDep, accountant: AccountantDep, metrics: MetricsDep):
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise BadRequest("one prompt per request: send several requests to complete several prompts",
                             param="prompt")
        prompt = prompt[0]
    if body.echo:
        raise BadRequest("echo is not supported", param="echo")
    if isinstance(prompt, str):
        prompt_ids = engine.tokenizer.encode(prompt)
    else:
        if any(not 0 <= t < engine.vocab_size for t in prompt):
            raise BadRequest(f"prompt token ids must be in [0, {engine.vocab_size})", param="prompt")
        prompt_ids = list(prompt)
    plan = await _plan(request, body, engine, node, settings, prompt_ids, body.max_tokens, body.logprobs)
    return await _serve(request, plan, engine, accountant, metrics, chat=False)


# ---------------------------------------------------------------------------------------------- running

async def _serve(request: Request, plan: Plan, engine, accountant, metrics, *, chat: bool):
    names = [n for n, _ in plan.members]
    hint = MaxCostInput(prompt_tokens=len(plan.prompt_ids), max_output_tokens=plan.params.n * plan.params.max_tokens,
                        adapters=tuple(names))
    try:  # the queue place _plan admitted: held until submit counts the request in engine.in_flight
        ticket = await accountant.authorize(request, model=plan.model, adapters=names, max_cost_hint=hint)
        arrival = time.monotonic()
        try:
            # pulled only now: an unauthenticated client must not make the node download anything
            for name, param in plan.pull:
                await resolve_adapter(request, engine, name, param)
            stream = await engine.submit(plan.request_id, plan.prompt_ids, plan.params, plan.adapter)
        except BaseException:
            await _cancel(accountant, ticket)
            raise
    finally:
        engine.release_admission()
    if plan.stream:
        headers = {}
        early = getattr(ticket, "receipt_id", None)  # an accountant that knows the id up front
        if early:
            headers[RECEIPT_HEADER] = early
        return StreamingResponse(_stream(plan, stream, engine, accountant, ticket, metrics, arrival, chat),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
    return await _complete(request, plan, stream, engine, accountant, ticket, metrics, arrival, chat)


async def _close(stream) -> None:
    with anyio.CancelScope(shield=True):
        await stream.aclose()


async def _cancel(accountant, ticket) -> None:
    # runs while the request's task may itself be cancelled (client gone): shield the release
    with anyio.CancelScope(shield=True):
        try:
            await accountant.cancel(ticket)
        except Exception:
            log.exception("releasing a reservation failed")


async def _complete(request, plan, stream, engine, accountant, ticket, metrics, arrival, chat):
    """Non-streaming: wait for the end while watching for the client to leave."""
    final = None
    first_at = None
    try:
        async with anyio.create_task_group() as tg:
            async def watch():
                while True:
                    await anyio.sleep(0.05)
                    if await request.is_disconnected():
                        # cancelling the iteration below ends the engine's generator early: it aborts
                        log.info("client disconnected; aborting")
                        metrics.aborted.inc()
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch)
            async for item in stream:
                if first_at is None and any(c.delta_token_ids for c in item.output.completions):
                    first_at = item.at
                final = item
            tg.cancel_scope.cancel()
    except BaseException:
        await _close(stream)
        await _cancel(accountant, ticket)
        raise
    await _close(stream)
    if final is None or not final.output.finished:
        await _cancel(accountant, ticket)
        if await request.is_disconnected():  # nobody reads this; 499 (nginx's "client closed") for the logs
            return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=499)
        raise EngineError(f"request {plan.request_id} ended unfinished")
    out = final.output
    usage = _usage(plan, out, arrival, first_at, final.at)
    receipt = getattr(ticket, "receipt_id", None)  # known at authorize time: the answer goes out first
    booked = not receipt
    if booked:  # an accountant that learns the id only when booking: book, then answer
        receipt = await _book(accountant, ticket, usage)
        _observe(metrics, usage)
    try:
        body = _answer_body(plan, out, engine.tokenizer, usage, receipt, chat)
        if booked:
            return JSONResponse(body, headers={RECEIPT_HEADER: receipt})
        return _AnswerThenBook(body, headers={RECEIPT_HEADER: receipt}, accountant=accountant, ticket=ticket,
                               usage=usage, metrics=metrics)
    except BaseException:
        if not booked:  # no answer: nothing to book
            await _cancel(accountant, ticket)
        raise


def _answer_body(plan: Plan, out, tok, usage: Usage, receipt: str, chat: bool) -> dict[str, Any]:
    body: dict[str, Any]
    if chat:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "finish_reason": _finish(c), "logprobs": _chat_logprobs(tok, c.token_ids, c.logprobs)}
                   for c in out.completions]
        body = {"id": f"chatcmpl-{plan.request_id}", "object": "chat.completion"}
    else:
        choices = [{"index": c.index, "text": c.text, "finish_reason": _finish(c),
                    "logprobs": _completion_logprobs(tok, c.token_ids, c.logprobs, 0)}
                   for c in out.completions]
        body = {"id": f"cmpl-{plan.request_id}", "object": "text_completion"}
    body.update(created=plan.created, model=plan.model, choices=choices, usage=_usage_body(usage),
                receipt_id=receipt)
    return body


class _AnswerThenBook(JSONResponse):
    """A non-streaming answer that is booked only once its body was handed to the server (as a stream is
    booked after its last chunk): a node killed, or a client gone, before the answer went out charges
    nobody. The receipt id in the body and header is the ticket's, fixed at authorize time.

    Sent and then not booked (the ledger write failed, the process died): the node loses that request's
    revenue, never the payer; the reservation is released either way."""

    def __init__(self, content, *, headers, accountant, ticket, usage: Usage, metrics):
        super().__init__(content, headers=headers)
        self.accountant, self.ticket, self.usage, self.metrics = accountant, ticket, usage, metrics

    async def __call__(self, scope, receive, send) -> None:
        try:
            if await Request(scope, receive).is_disconnected():
                raise _ClientGone()
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": self.body})
        except BaseException as exc:  # not delivered: release, book nothing
            self.metrics.aborted.inc()
            await _cancel(self.accountant, self.ticket)
            if isinstance(exc, _ClientGone):
                log.info("client gone before request %s's answer was sent; not charged", self.usage.request_id)
                return
            raise
        with anyio.CancelScope(shield=True):  # sent: the booking must not be cut in half
            try:
                await _book(self.accountant, self.ticket, self.usage)
            except Exception:  # _book logged it and released the reservation; the answer is out already
                log.error("request %s was answered but not booked: its revenue is lost", self.usage.request_id)
                return
            _observe(self.metrics, self.usage)


class _ClientGone(Exception):
    pass


async def _stream(plan, stream, engine, accountant, ticket, metrics, arrival, chat) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with a usage chunk and `data: [DONE]`."""
    tok = engine.tokenizer
    cid = f"{'chatcmpl' if chat else 'cmpl'}-{plan.request_id}"
    obj = "chat.completion.chunk" if chat else "text_completion"
    null_usage = {"usage": None} if plan.include_usage else {}

    def chunk(choices: list[dict], **extra) -> str:
        payload = {"id": cid, "object": obj, "created": plan.created, "model": plan.model, "choices": choices,
                   **null_usage, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    first_at = last_at = None
    n = plan.params.n
    offsets = [0] * n  # completions' text_offset, for legacy logprobs
    # tokens whose text is held back (half a UTF-8 character, a possible stop string) are sent, with
    # their logprobs, in the next chunk that carries text
    pending_ids: list[list[int]] = [[] for _ in range(n)]
    pending_lps: list[list] = [[] for _ in range(n)]
    done = False
    try:
        if chat:  # OpenAI opens every choice with the role
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(plan.params.n)])
        final = None
        async for item in stream:
            if any(c.delta_token_ids for c in item.output.completions):
                if first_at is None:
                    first_at = item.at
                elif last_at is not None:
                    metrics.itl.observe(item.at - last_at)
                last_at = item.at
            choices = []
            for c in item.output.completions:
                i = c.index
                pending_ids[i] += c.delta_token_ids
                if c.delta_logprobs is not None:
                    pending_lps[i] += c.delta_logprobs
                if c.finish_reason is None and not c.delta_text:
                    continue  # nothing printable yet
                ids, lps = pending_ids[i], (pending_lps[i] if c.delta_logprobs is not None else None)
                pending_ids[i], pending_lps[i] = [], []
                fr = _finish(c) if c.finish_reason is not None else None
                if chat:
                    lp = _chat_logprobs(tok, ids, lps)
                    choices.append({"index": i, "delta": {"content": c.delta_text} if c.delta_text else {},
                                    "logprobs": lp, "finish_reason": fr})
                else:
                    lp = _completion_logprobs(tok, ids, lps, offsets[i])
                    offsets[i] += len(c.delta_text)
                    choices.append({"index": i, "text": c.delta_text, "logprobs": lp, "finish_reason": fr})
            if choices:
                yield chunk(choices)
            final = item
        out = final.output
        if not out.finished:  # the engine ended the request without finishing it
            raise EngineError(f"request {plan.request_id} ended unfinished")
        usage = _usage(plan, out, arrival, first_at, final.at)
        done = True  # from here the ticket is the booking's: _book releases it itself if booking fails
        receipt = await _book(accountant, ticket, usage)
        _observe(metrics, usage)
        yield chunk([], usage=_usage_body(usage), receipt_id=receipt)
        yield "data: [DONE]\n\n"
    except EngineError as exc:
        log.warning("stream %s failed in the engine: %s", plan.request_id, exc)
        yield f"data: {json.dumps(error_body('the engine failed to finish this request', 'server_error'))}\n\n"
    except ApiError as exc:
        yield f"data: {api_error_response(exc).body.decode()}\n\n"
    finally:
        # normal end: releases the request's queue place; client gone (cancellation) or failure: aborts
        # the engine request and releases the reservation
        await _close(stream)
        if not done:
            metrics.aborted.inc()
            await _cancel(accountant, ticket)


def _finish(c) -> str:
    return "stop" if c.finish_reason == "abort" else c.finish_reason


async def _book(accountant, ticket, usage: Usage) -> str:
    """accountant.complete; if it fails the request is not charged: the reservation is released once
    here and BookingFailed raised (a stream sends it as its last event; a sent answer only logs it)."""
    try:
        return await accountant.complete(ticket, usage)
    except ApiError:
        raise
    except Exception as exc:
        log.exception("booking request %s failed", usage.request_id)
        await _cancel(accountant, ticket)
        raise BookingFailed("the request ran but could not be booked; it was not charged",
                            code="booking_failed") from exc


class BookingFailed(ApiError):
    status_code = 500
    error_type = "server_error"


def _usage(plan: Plan, out, arrival: float, first_at: float | None, end_at: float) -> Usage:
    influence = out.influence or {}
    adapters = tuple(AdapterUsage(name, weight, dict(influence.get(name, {}))) for name, weight in plan.members)
    return Usage(request_id=plan.request_id, model=plan.model, prompt_tokens=out.prompt_tokens,
                 completion_tokens=out.completion_tokens,
                 ttft_s=None if first_at is None else max(first_at - arrival, 0.0),
                 total_s=max(end_at - arrival, 0.0), adapters=adapters,
                 finish_reasons=tuple(_finish(c) or "stop" for c in out.completions), fusion=plan.fusion,
                 prompt_token_ids=tuple(plan.prompt_ids),
                 output_token_ids=tuple(out.completions[0].token_ids) if out.completions else ())


def _usage_body(u: Usage) -> dict:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


def _observe(metrics, usage: Usage) -> None:
    metrics.prompt_tokens.inc(usage.prompt_tokens)
    metrics.completion_tokens.inc(usage.completion_tokens)
    metrics.e2e.observe(usage.total_s)
    if usage.ttft_s is not None:
        metrics.ttft.observe(usage.ttft_s)


# ---------------------------------------------------------------------------------------------- logprobs

def _token_text(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False)


def _chat_logprobs(tok, token_ids: list[int], logprobs: list | None) -> dict | None:
    if logprobs is None:
        return None
    content = []
    for tid, (lp, top) in zip(token_ids, logprobs):
        text = _token_text(tok, tid)
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": (t := _token_text(tok, i)), "logprob": l, "bytes": list(t.encode())}
                                         for i, l in top]})
    return {"content": content}


def _completion_logprobs(tok, token_ids: list[int], logprobs: list | None, offset: int) -> dict | None:
    if logprobs is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, (lp, top) in zip(token_ids, logprobs):
        text = _token_text(tok, tid)
        tokens.append(text)
        token_lps.append(lp)
        tops.append({_token_text(tok, i): l for i, l in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


__all__ = ["router", "RECEIPT_HEADER"]
