"""The FastAPI application: vLLM's OpenAI-compatible routes over local models and composites.

Build it from open models and composites with :func:`create_app`, then run it with uvicorn
(:func:`towline.serve.run`, or ``towline serve``).

>>> create_app()
Traceback (most recent call last):
ValueError: nothing to serve: give at least one model or composite
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import prometheus_client
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from towline.api import Aligned
from towline.methods.base import OptionError, PromptTooLong
from towline.models.local import LocalModel
from towline.prompts import PromptRequest
from towline.serve.engine import Cancelled, Job, LockTable, Words
from towline.serve.plans import (MethodFailed, Plan, chat_prompt, plan_chat, plan_completion, plan_composite,
                                 prompt_request)
from towline.serve.protocol import (ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                    now, parse)
from towline.serve.shape import Shape

log = logging.getLogger("towline.serve")

MAX_BODY_BYTES = 4 << 20
"""Largest request body taken, in bytes (a prompt filling a 32k-token context is ~150 kB)."""
MAX_PENDING = 64
"""Most requests in flight (decoding or queued) at once; more get HTTP 503."""
DISCONNECT_POLL_S = 0.2
OPEN_PATHS = ("/health", "/metrics")
"""Routes that need no API key, as in vLLM: health probes and metric scrapers send none."""
CLIENT_CLOSED = 499
"""The status recorded in the metrics for a request whose client went away."""


@dataclasses.dataclass
class LocalEntry:
    """A local model served as itself."""

    name: str
    model: LocalModel
    words: Words
    locks: list

    def card(self) -> dict[str, Any]:
        return {"id": self.name, "object": "model", "created": now(), "owned_by": "towline", "root": self.model.name,
                "parent": None, "max_model_len": self.model.context_length, "permission": []}


@dataclasses.dataclass
class CompositeEntry:
    """An aligned composite (a method bound to its models) under a virtual model name."""

    name: str
    aligned: Aligned
    locks: list

    def card(self) -> dict[str, Any]:
        method = self.aligned.method
        options = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
        models = {role: part.model.name for role, part in self.aligned.participants.items()}
        return {"id": self.name, "object": "model", "created": now(), "owned_by": "towline", "root": None,
                "parent": None, "max_model_len": None, "permission": [],
                "towline": {"method": method.name, "models": models, "options": options}}


class Metrics:
    """Prometheus metrics of one app, in a registry of its own (several apps may share a process)."""

    def __init__(self) -> None:
        # Without this every counter and histogram also shows a *_created timestamp series
        # (process-wide setting; nothing else in towline uses prometheus_client).
        prometheus_client.disable_created_metrics()
        kw: dict[str, Any] = {"registry": prometheus_client.CollectorRegistry()}
        self.registry = kw["registry"]
        P = prometheus_client
        self.requests = P.Counter("towline_requests", "Requests, by HTTP status (499: the client left; "
                                  "model \"\": refused before reaching a model).", ("model", "endpoint", "status"),
                                  **kw)
        self.latency = P.Histogram("towline_request_seconds", "Time from the request to its last byte.",
                                   ("model", "endpoint"), buckets=_BUCKETS, **kw)
        self.first_text = P.Histogram("towline_time_to_first_token_seconds", "Time from the request to its first "
                                      "output.", ("model",), buckets=_BUCKETS, **kw)
        self.queued = P.Histogram("towline_queue_seconds", "Time waiting for the model.", ("model",),
                                  buckets=_BUCKETS, **kw)
        self.prompt_tokens = P.Counter("towline_prompt_tokens", "Prompt tokens of answered requests.", ("model",),
                                       **kw)
        self.generation_tokens = P.Counter("towline_generation_tokens", "Tokens generated for answered requests.",
                                           ("model",), **kw)
        self.in_flight = P.Gauge("towline_requests_in_flight", "Requests decoding or waiting for their model.",
                                 ("model",), **kw)
        self.guide_share = P.Histogram("towline_guide_token_fraction", "Share of a composite's answer that its "
                                       "guide wrote.", ("model",), buckets=[i / 10 for i in range(11)], **kw)


_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)


class Guard:
    """ASGI middleware in front of every route: the API key, then the body size limit.

    The body is read here and handed on; one larger than the limit is refused (413) as soon
    as it is known to be too large, without reading the rest.
    """

    def __init__(self, app: Callable, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key and scope["path"] not in OPEN_PATHS:
            scheme, _, key = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
                error = ApiError("missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                                 "key the server was started with", 401)
                return await _send_error(send, error, {"www-authenticate": "Bearer"})
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_error(send, _too_large(self.max_body_bytes))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was complete
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return await _send_error(send, _too_large(self.max_body_bytes))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        handed = False

        async def replay() -> dict:
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(f"the request body is larger than {limit} bytes, this server's limit: send less", 413)


async def _send_error(send: Callable, error: ApiError, headers: Mapping[str, str] | None = None) -> None:
    body = json.dumps(error.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
           *((k.encode(), v.encode()) for k, v in (headers or {}).items())]
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def create_app(models: Mapping[str, LocalModel] | None = None, composites: Mapping[str, Aligned] | None = None, *,
               api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               max_pending: int = MAX_PENDING) -> FastAPI:
    """The server: each of ``models`` (open local models) served as itself under its key,
    each of ``composites`` (from :func:`towline.compose`) under its key. The models stay
    the caller's to close. With ``api_key``, every route but /health and /metrics needs
    ``Authorization: Bearer API_KEY``."""
    models, composites = dict(models or {}), dict(composites or {})
    if not models and not composites:
        raise ValueError("nothing to serve: give at least one model or composite")
    if clash := sorted(set(models) & set(composites)):
        raise ValueError(f"{', '.join(clash)}: a model and a composite cannot share a name")
    for name, model in models.items():
        if not isinstance(model, LocalModel):
            raise TypeError(f"model {name!r} is a {type(model).__name__}: towline serve serves local weights as "
                            "themselves (a model behind another server can take a role in a composite)")
    locks = LockTable()
    entries: dict[str, LocalEntry | CompositeEntry] = {
        name: LocalEntry(name, model, Words(model), locks.locks([model])) for name, model in models.items()}
    entries.update({name: CompositeEntry(name, aligned, locks.locks([*(p.model for p in aligned.participants.values()), aligned.method]))
                    for name, aligned in composites.items()})
    metrics = Metrics()
    in_flight = 0

    app = FastAPI(title="towline serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        if not error.counted:  # refused before it reached a model
            metrics.requests.labels("", request.url.path, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route {request.method} {request.url.path}: the routes are /v1/models, /v1/completions, "
                        "/v1/chat/completions, /tokenize, /detokenize, /health and /metrics",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code,
                                                                                     str(error.detail))
        return JSONResponse(ApiError(message, error.status_code).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse(ApiError(f"internal error: {type(error).__name__}: {error}", 500).body(),
                            status_code=500)

    def find(name: str) -> LocalEntry | CompositeEntry:
        if name not in entries:
            raise ApiError(f"the model `{name}` does not exist: this server has {', '.join(entries)} "
                           "(GET /v1/models lists them)", 404, param="model")
        return entries[name]

    def local(name: str, route: str) -> LocalEntry:
        entry = find(name)
        if not isinstance(entry, LocalEntry):
            raise ApiError(f"{name} is an aligned composite of several models and has no single tokenizer: "
                           f"use {route} on one of its models", param="model")
        return entry

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(prometheus_client.generate_latest(metrics.registry),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> Response:
        return JSONResponse({"object": "list", "data": [entry.card() for entry in entries.values()]})

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        body = parse(TokenizeRequest, await request.body())
        entry = local(body.model, "/tokenize")
        if (body.prompt is None) == (body.messages is None):
            raise ApiError("give either prompt (text) or messages (a chat)", param="prompt")
        if body.prompt is not None:
            text, special = body.prompt, body.add_special_tokens is not False
        else:  # as vLLM: the template writes the special tokens a chat needs
            text, special = chat_prompt(entry.model, body.messages).text, bool(body.add_special_tokens)
        ids = await asyncio.to_thread(entry.words.tokenize, text, special=special)
        out: dict[str, Any] = {"count": len(ids), "max_model_len": entry.model.context_length, "tokens": ids}
        if body.return_token_strs:
            out["token_strs"] = await asyncio.to_thread(entry.words.strings, ids)
        return JSONResponse(out)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        body = parse(DetokenizeRequest, await request.body())
        entry = local(body.model, "/detokenize")
        size = len(entry.model.tokenizer)
        if bad := [t for t in body.tokens if not 0 <= t < size]:
            raise ApiError(f"tokens: {bad[:5]} are not token ids of {body.model} (0 to {size - 1})", param="tokens")
        return JSONResponse({"prompt": await asyncio.to_thread(entry.words.decode, body.tokens)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        started = time.perf_counter()
        body = parse(CompletionRequest, await request.body())
        entry = find(body.model)
        if isinstance(entry, LocalEntry):
            plan = await asyncio.to_thread(plan_completion, entry.model, entry.words, body)
        else:
            # Without max_tokens a composite keeps its own budget, not the completions default of 16.
            budget = body.max_tokens if "max_tokens" in body.model_fields_set else None
            plan = plan_composite(entry.name, entry.aligned, body, [PromptRequest(question=p) for p in body.prompts],
                                  budget)
        return await answer(request, entry, body, plan, chat=False, started=started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        body = parse(ChatRequest, await request.body())
        entry = find(body.model)
        if isinstance(entry, LocalEntry):
            plan = await asyncio.to_thread(plan_chat, entry.model, entry.words, body)
        else:
            plan = plan_composite(entry.name, entry.aligned, body, [prompt_request(body.messages)], body.budget)
        return await answer(request, entry, body, plan, chat=True, started=started)

    async def answer(request: Request, entry: LocalEntry | CompositeEntry, body: Any, plan: Plan, *, chat: bool,
                     started: float) -> Response:
        """Queue the work for the model; answer all at once, or as server-sent events."""
        nonlocal in_flight
        if in_flight >= max_pending:
            raise ApiError(f"the server is busy ({in_flight} requests in flight): retry later", 503)
        in_flight += 1
        metrics.in_flight.labels(entry.name).inc()
        job = Job(plan.work, entry.locks, name=f"towline-{entry.name}")
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        shape = Shape(chat=chat, model=entry.name, plan=plan)
        endpoint = request.url.path
        outcome = {"status": CLIENT_CLOSED}  # until the answer is complete
        closed = False

        def close() -> None:
            nonlocal in_flight, closed
            if closed:
                return
            closed = True
            in_flight -= 1
            watcher.cancel()
            job.cancel()  # nothing when the work is done; stops it when the client left or an error ended it
            name, status = entry.name, outcome["status"]
            metrics.in_flight.labels(name).dec()
            metrics.requests.labels(name, endpoint, str(status)).inc()
            metrics.latency.labels(name, endpoint).observe(time.perf_counter() - started)
            if job.started is not None:
                metrics.queued.labels(name).observe(job.started - job.created)
            if status == 200 and job.result:
                metrics.prompt_tokens.labels(name).inc(job.result["prompt_tokens"])
                metrics.generation_tokens.labels(name).inc(job.result["completion_tokens"])
                for share in shape.guide_shares:
                    metrics.guide_share.labels(name).observe(share)

        items = job.items()
        try:  # an error before any output is still a plain HTTP error, also for a stream
            first = await anext(items, None)
        except asyncio.CancelledError:
            close()
            raise
        except BaseException as error:
            failure = _as_api_error(error)
            outcome["status"], failure.counted = failure.status, True
            close()
            raise failure from None
        if first is not None:
            metrics.first_text.labels(entry.name).observe(time.perf_counter() - started)

        if not body.stream:
            try:
                if first is not None:
                    shape.add(first)
                async for item in items:
                    shape.add(item)
                response = JSONResponse(shape.response(job.result))
                outcome["status"] = 200
                return response
            except asyncio.CancelledError:
                raise
            except BaseException as error:
                failure = _as_api_error(error)
                outcome["status"], failure.counted = failure.status, True
                raise failure from None
            finally:
                close()

        async def events() -> AsyncIterator[str]:
            try:
                if first is not None:
                    for chunk in shape.chunks(first):
                        yield _sse(chunk)
                async for item in items:
                    for chunk in shape.chunks(item):
                        yield _sse(chunk)
                if body.include_usage:
                    yield _sse(shape.usage_chunk(job.result))
                outcome["status"] = 200
            except Cancelled:  # the client left: nobody to tell
                return
            except Exception as error:  # after the headers: reported in the stream, as vLLM does
                failure = _as_api_error(error)
                outcome["status"] = failure.status
                yield _sse(failure.body())
            yield "data: [DONE]\n\n"

        return _Stream(events(), on_close=close)

    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    return app


class _Stream(StreamingResponse):
    """Server-sent events that always run ``on_close`` at the end, also when the client
    leaves before the stream starts (Starlette then never starts the generator)."""

    def __init__(self, content: AsyncIterator[str], *, on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel the job as soon as its client disconnects (the body is read, so the next
    message from the server is the disconnect)."""
    while not job.cancelled.is_set():
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _as_api_error(error: BaseException) -> ApiError:
    if isinstance(error, ApiError):
        return error
    if isinstance(error, (PromptTooLong, OptionError)):  # found once the method built its prompts
        return ApiError(str(error), 400)
    if isinstance(error, (Cancelled, asyncio.CancelledError)):
        return ApiError("the client closed the connection", CLIENT_CLOSED)
    if isinstance(error, MethodFailed):
        return ApiError(str(error), 502)
    log.error("request failed", exc_info=error)
    return ApiError(f"the model failed: {type(error).__name__}: {error}", 500)
