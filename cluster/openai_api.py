"""The OpenAI-compatible HTTP API, served by nodes (single-process ``serve``) and coordinators.

``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``, with
``stream: true`` as server-sent events in OpenAI's chunk format, errors as OpenAI-style JSON;
``/health`` (readiness) and ``/health/live`` (liveness) for Kubernetes probes and ``/metrics``
(the server's Prometheus registry) beside them.

Every request is turned into the same ``pb.GenerateRequest`` a gRPC client sends, checked by
the same :func:`validate_generate` and served by the same :class:`ServingBackend`, so HTTP
and gRPC share routing (the coordinator's ClusterBackend), validation and limits. A session
is named by the ``x-session-id`` header (or the request's ``user`` field). OpenAI clients
send the whole prompt on every turn, so a session request is marked ``full_context``: the
node treats the prompt as the session's whole context, reuses the cached part and prefills
only the rest. Without a session a request is stateless and still reuses cached prefixes.

With a keys file every ``/v1/`` request passes the same edge as gRPC
(cluster/security/policy.py) before its body is parsed: IP rules, ``Authorization: Bearer``
or ``x-api-key`` (and a signature, for keys that sign), role, rate limits and the tenant's
running slots; it then runs as the key's tenant. Denials are 401, 403 or 429 (with
``retry-after``) in OpenAI's error shape. ``/health`` and ``/metrics`` stay open for probes.

The module is an adapter: pure translation (request -> wire request, result -> response
body, rejection -> HTTP status and error body) then a FastAPI app over it, served by uvicorn
in the caller's event loop. It must not import torch (coordinators and clients run without it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvicorn
from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from ultrakv.cluster.errors import EngineError
from ultrakv.cluster.rejections import REJECTIONS
from ultrakv.cluster.security.policy import Denied, EdgeSecurity, estimated_tokens
from ultrakv.cluster.security.principal import OPEN, Principal
from ultrakv.cluster.service import ServingBackend, keyed_session
from ultrakv.cluster.validation import (
    Limits,
    RequestRejected,
    rejection_for_client,
    rejection_from_error,
    validate_generate,
    validate_session_id,
)
from ultrakv.v1 import types_pb2 as pb

log = logging.getLogger("ultrakv.http")

SESSION_HEADER = "x-session-id"
HEALTH_PATH = "/health"
_GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
LIVENESS_PATH = "/health/live"

# --- requests ---------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk carrying the usage."""

    include_usage: bool | None = False  # null as OpenAI's spec allows: off


class CompletionRequest(BaseModel):
    """``POST /v1/completions``. Unknown fields are ignored, as OpenAI's own server does for
    fields a model does not use; known fields this server cannot honour are rejected
    (:data:`UNSUPPORTED`)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None  # None: the served model
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1  # null (as OpenAI's spec allows) is the default
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = False  # vLLM's extension: generate exactly max_tokens


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are served."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessageIn(BaseModel):
    """One message of ``messages``. ``developer`` (OpenAI's newer name for system
    instructions) is served as ``system``."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``; unknown fields are ignored as in CompletionRequest."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[ChatMessageIn]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = False


# Fields of OpenAI's API this server does not implement, with the value that means "off".
# A request that turns one on gets a 400 naming it rather than a silently different answer.
UNSUPPORTED: dict[str, Any] = {
    "best_of": 1, "echo": False, "suffix": None, "logprobs": None, "top_logprobs": None,
    "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0, "tools": None,
    "functions": None, "tool_choice": "none", "function_call": "none",
    "response_format": {"type": "text"},
    # vLLM's sampling extensions beyond top_k and ignore_eos: each changes the answer.
    "repetition_penalty": 1, "min_p": 0, "min_tokens": 0, "use_beam_search": False,
    "length_penalty": 1, "prompt_logprobs": None, "guided_json": None, "guided_regex": None,
    "guided_choice": None, "guided_grammar": None, "structured_outputs": None,
    "bad_words": None, "allowed_token_ids": None, "logits_processors": None,
}


def _extra_fields(body: BaseModel) -> dict[str, Any]:
    return dict(body.model_extra or {})


def _lone_surrogate_at(value: Any, path: str) -> str | None:
    """The path of the first string in ``value`` that is not valid Unicode (JSON's ``\\ud800``
    escapes decode to lone surrogates, which have no UTF-8 form), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, BaseModel):
        value = {**dict(value), **(value.model_extra or {})}
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list) and any(isinstance(v, str | list | dict | BaseModel) for v in value[:1]):
        # (a list of numbers, such as a prompt of 262k token ids, is not walked)
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub_path, item in items:
        found = _lone_surrogate_at(item, sub_path)
        if found is not None:
            return found
    return None


def check_supported(body: BaseModel) -> None:
    """Reject a string that is not valid Unicode, ``n`` other than 1 and any
    :data:`UNSUPPORTED` field set to a non-default."""
    bad = _lone_surrogate_at(body, "")
    if bad is not None:
        raise _invalid(bad, f"{bad} must be valid Unicode (it holds a lone surrogate escape such as \\ud800)")
    if body.n not in (None, 1):
        raise _invalid("n", f"n must be 1 (one choice per request), got {body.n}")
    extra = _extra_fields(body)
    for name, off in UNSUPPORTED.items():
        value = extra.get(name)
        if value is not None and value != off and value not in ([], {}, False):
            raise _invalid(name, f"{name} is not supported by this server (got {value!r})")


def _invalid(param: str, message: str) -> RequestRejected:
    return RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, param, message)


def session_for(header: str | None, user: str | None) -> tuple[str | None, str]:
    """The session a request names (the header wins over ``user``) and the field it came from.
    OpenAI clients fill ``user`` with any end-user string (an email, a UUID): one that is not
    a session id names the session :func:`user_session_id` derives from it."""
    if header is not None:
        return validate_session_id(header, SESSION_HEADER), SESSION_HEADER
    if user:
        try:
            return validate_session_id(user, "user"), "user"
        except RequestRejected:
            return user_session_id(user), "user"
    return None, ""


def user_session_id(user: str) -> str:
    """The session id of an OpenAI ``user`` value that is not one itself: ``user-`` and the
    first 32 hex digits of its SHA-256 (equal values meet, others do not)."""
    digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()
    return f"user-{digest[:32]}"


def _assign(options: pb.SamplingOptions, name: str, value: Any, param: str) -> None:
    try:
        setattr(options, name, value)
    except ValueError:  # JSON integers have no bound; the wire's fields do
        raise _invalid(param, f"{param} is out of range, got {value}") from None


def _sampling(body: CompletionRequest | ChatCompletionRequest) -> pb.SamplingOptions:
    s = pb.SamplingOptions(ignore_eos=bool(body.ignore_eos))
    newer = getattr(body, "max_completion_tokens", None)
    if newer is not None:
        _assign(s, "max_length", newer, "max_completion_tokens")
    elif body.max_tokens is not None:
        _assign(s, "max_length", body.max_tokens, "max_tokens")
    for name in ("temperature", "top_p", "top_k", "seed"):
        value = getattr(body, name)
        if value is not None:
            _assign(s, name, value, name)
    if body.stop is not None:
        s.stop.extend([body.stop] if isinstance(body.stop, str) else body.stop)
    return s


def completion_request(body: CompletionRequest, session_id: str | None, tenant: str = ""
                       ) -> pb.GenerateRequest:
    """``/v1/completions`` body -> the wire request gRPC clients send (not yet validated)."""
    check_supported(body)
    out = pb.GenerateRequest(request_id=uuid.uuid4().hex, sampling=_sampling(body),
                             tenant=tenant)
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise _invalid("prompt", f"prompt must be one prompt (batched prompts are not "
                                     f"supported: send one request each), got {len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, str):
        out.text = prompt
    else:
        try:
            out.token_ids.ids.extend(prompt)
        except ValueError:
            raise _invalid("prompt", "prompt token ids must be 32-bit integers") from None
    if session_id is not None:
        out.session_id = session_id
        out.full_context = True
    return out


def _content_text(i: int, content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise _invalid(f"messages[{i}].content[{j}].type",
                           f"messages[{i}].content[{j}].type must be text (this server reads "
                           f"text only), got {part.type!r}")
        texts.append(part.text)
    return "".join(texts)


def chat_request(body: ChatCompletionRequest, session_id: str | None, tenant: str = ""
                 ) -> pb.GenerateRequest:
    """``/v1/chat/completions`` body -> the wire request (a ``messages`` prompt)."""
    check_supported(body)
    out = pb.GenerateRequest(request_id=uuid.uuid4().hex, sampling=_sampling(body),
                             tenant=tenant)
    out.messages.SetInParent()  # an empty list still names the prompt kind; validation refuses it
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        out.messages.messages.add(role=role, content=_content_text(i, m.content))
    if session_id is not None:
        out.session_id = session_id
        out.full_context = True
    return out


# Wire field (as validation names it) -> the OpenAI request field a client set.
_PARAMS = {"sampling.max_length": "max_tokens", "sampling.temperature": "temperature",
           "sampling.top_p": "top_p", "sampling.top_k": "top_k", "sampling.stop": "stop",
           "sampling.stop_token_ids": "stop", "text": "prompt", "token_ids": "prompt",
           "prompt": "prompt", "max_tokens": "max_tokens", "session_id": SESSION_HEADER}


def openai_rejection(rejection: RequestRejected, session_field: str = SESSION_HEADER
                     ) -> RequestRejected:
    """A rejection naming the OpenAI request field instead of the wire field."""
    param = _PARAMS.get(rejection.field, rejection.field)
    if rejection.field == "session_id":
        param = session_field or SESSION_HEADER
    if param == rejection.field:
        return rejection
    wire_name = rejection.field.rsplit(".", 1)[-1]
    message = rejection.message
    if message.startswith(wire_name + " "):  # "max_length must be ..." -> "max_tokens must be ..."
        message = param + message[len(wire_name):]
    return RequestRejected(rejection.code, param, message, rejection.retry_after_s)


# --- responses ---------------------------------------------------------------------------------


_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
           pb.FINISH_REASON_ABORT: "abort", pb.FINISH_REASON_ERROR: "error"}


def usage_body(usage: pb.Usage) -> dict[str, Any]:
    """OpenAI ``usage``; ``prompt_tokens_details.cached_tokens`` are the prompt tokens whose
    KV came from the cache (the session's or a shared prefix)."""
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


@dataclass(frozen=True)
class ResponseHead:
    """What every body and chunk of one response repeats."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))


def completion_body(head: ResponseHead, result: pb.GenerateResult) -> dict[str, Any]:
    """A finished ``/v1/completions`` response."""
    return {"id": head.id, "object": "text_completion", "created": head.created,
            "model": head.model,
            "choices": [{"index": 0, "text": result.text, "logprobs": None,
                         "finish_reason": _FINISH.get(result.finish_reason)}],
            "usage": usage_body(result.usage)}


def completion_chunk(head: ResponseHead, text: str, finish_reason: str | None = None
                     ) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk."""
    return {"id": head.id, "object": "text_completion", "created": head.created,
            "model": head.model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}]}


def chat_body(head: ResponseHead, result: pb.GenerateResult) -> dict[str, Any]:
    """A finished ``/v1/chat/completions`` response."""
    return {"id": head.id, "object": "chat.completion", "created": head.created,
            "model": head.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "logprobs": None, "finish_reason": _FINISH.get(result.finish_reason)}],
            "usage": usage_body(result.usage)}


def chat_chunk(head: ResponseHead, delta: dict[str, str],
               finish_reason: str | None = None) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk``."""
    return {"id": head.id, "object": "chat.completion.chunk", "created": head.created,
            "model": head.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}]}


def usage_chunk(head: ResponseHead, obj: str, usage: pb.Usage) -> dict[str, Any]:
    """The last chunk of a stream asked for ``stream_options.include_usage``."""
    return {"id": head.id, "object": obj, "created": head.created, "model": head.model,
            "choices": [], "usage": usage_body(usage)}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


# --- errors ------------------------------------------------------------------------------------

_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.CANCELLED: 499,  # nginx's "client closed request": nobody reads it
}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 409: "conflict_error",
               405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


def http_status(rejection: RequestRejected) -> int:
    """The HTTP status of a rejection. RESOURCE_EXHAUSTED is 429 when waiting helps (queue full,
    rate limit: it carries a retry hint) and 400 when the request itself is too big."""
    if rejection.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return 429 if rejection.retry_after_s > 0 or not rejection.field else 400
    return _STATUS.get(rejection.code, 500)


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": _ERROR_TYPE.get(status, "server_error"),
                      "param": param or None, "code": code or None}}


def error_response(rejection: RequestRejected) -> JSONResponse:
    REJECTIONS.record(rejection.code)
    status = http_status(rejection)
    headers = {}
    if rejection.retry_after_s > 0:
        headers["retry-after"] = str(max(1, round(rejection.retry_after_s)))
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    code = rejection.code.name.lower() if status >= 500 or status == 429 else None
    return JSONResponse(error_body(status, rejection.message, rejection.field, code),
                        status_code=status, headers=headers)


# What a field of several accepted types takes, for the one message pydantic's per-type
# complaints are folded into.
_EXPECTED = {"prompt": "a string, a list of token ids, or a one-item list of either",
             "stop": "a string or a list of strings",
             "content": "a string or a list of text parts"}
_PRIMITIVES = {"str", "int", "float", "bool", "none", "list", "dict"}


def _is_type_tag(part: Any) -> bool:
    """Whether a pydantic error location part names a union's alternative, not a field."""
    return isinstance(part, str) and ("[" in part or part in _PRIMITIVES or part[:1].isupper())


def _validation_rejection(exc: RequestValidationError) -> RequestRejected:
    """pydantic's first complaint about a body, as a rejection naming the field."""
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return _invalid("", "request body must be valid JSON")
    loc = [p for p in first.get("loc", ()) if p != "body"]
    param, name, union = "", "", False
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif _is_type_tag(part):
            union = True
        else:
            param, name = (f"{param}.{part}" if param else str(part)), str(part)
    if not param:
        if isinstance(first.get("input"), bytes | bytearray):  # not parsed: not sent as JSON
            return _invalid("", "request body must be JSON, sent with content-type: application/json")
        return _invalid("", f"request body must be a JSON object ({first.get('msg', 'invalid')})")
    if first.get("type") == "missing":
        return _invalid(param, f"{param} is required")
    if union and name in _EXPECTED:
        return _invalid(param, f"{param} must be {_EXPECTED[name]}")
    return _invalid(param, f"{param}: {first.get('msg', 'invalid value')}")


# --- metrics -----------------------------------------------------------------------------------


class HttpCounters(Collector):
    """``ultrakv_http_requests_total{endpoint, status}``: every HTTP answer, so requests
    refused at the edge (validation, auth, rate limits) show up by status."""

    ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", HEALTH_PATH,
                 LIVENESS_PATH, "/metrics")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}

    def count(self, path: str, status: int) -> None:
        endpoint = path if path in self.ENDPOINTS else (
            "/v1/models/{model}" if path.startswith("/v1/models/") else "other")
        key = (endpoint, str(status))
        self.counts[key] = self.counts.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily("ultrakv_http_requests", "HTTP answers by endpoint and status.",
                                     labels=["endpoint", "status"])
        for (endpoint, status), n in sorted(self.counts.items()):
            family.add_metric([endpoint, status], n)
        yield family


class _CountResponses:
    """ASGI middleware: count each response's status (streams count at their start)."""

    def __init__(self, app: Any, counters: HttpCounters) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.counters.count(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


# --- the app ------------------------------------------------------------------------------------


@dataclass
class ApiHost:
    """What the HTTP API needs from the process serving it.

    ``models`` lists the served model names; ``not_ready`` returns why the process cannot
    serve now (None when it can); ``registry`` is the process's Prometheus registry.
    """

    backend: ServingBackend
    limits: Limits
    models: Callable[[], list[str]]
    not_ready: Callable[[], str | None]
    registry: CollectorRegistry
    started_at: int = field(default_factory=lambda: int(time.time()))
    security: EdgeSecurity | None = None  # the gRPC server's (shared limits); None = open
    # Set as the server's grace period runs out: the generations still running end with a
    # 503 / a stream's error event instead of being cut off (:class:`HttpServer` ``stop``).
    closing: asyncio.Event = field(default_factory=asyncio.Event)


class _Guard:
    """ASGI middleware: the edge's checks on ``/v1/`` requests, on the headers (and, for a
    key that signs, the raw body) before any JSON is parsed; the principal goes to
    ``request.state.principal``. Calls other than generation take one request from the rate
    limits here; generation takes its tokens and a tenant slot in ``_generate``."""

    def __init__(self, app: Any, security: EdgeSecurity) -> None:
        self.app = app
        self.security = security

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        peer = (scope.get("client") or ("", 0))[0]
        body, replay = b"", receive
        if self.security.signs(headers):
            body, replay = await _read_body(receive)
        try:
            principal = self.security.check_call(scope["path"], headers, peer, body)
            if scope["path"] not in _GENERATION_PATHS:
                self.security.admit(principal, peer, method=scope["path"])
        except Denied as denied:
            await error_response(denied)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, replay, send)


async def _read_body(receive: Any) -> tuple[bytes, Any]:
    """The whole request body, and a ``receive`` that hands it to the app again."""
    chunks, messages = [], []
    while True:
        message = await receive()
        messages.append(message)
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            break

    async def replay() -> dict:
        return messages.pop(0) if messages else await receive()

    return b"".join(chunks), replay


def http_body_limit(limits: Limits) -> int:
    """The largest request body the HTTP API reads: the largest prompt either way, as JSON
    may write it (non-ASCII text escaped, ids with their commas), plus room for the rest."""
    return 4 * limits.max_prompt_bytes + 12 * limits.max_prompt_token_ids + (64 << 10)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from a request's receive (an HTTP error, so FastAPI's body parsing passes it
    on as is and the app's handler answers it)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body must be at most {max_bytes} bytes")


class _BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` is answered 413 (OpenAI's error
    JSON) without being read further: at once when its content-length says so, else when the
    bytes read pass the limit. Before it, nothing bounded a body, and parsing an 800 MB one
    held a coordinator's event loop (its gRPC too) for 13 s."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        read = 0
        started = False

        async def limited() -> dict:
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.max_bytes:
                raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracked)
        except _BodyTooLarge:  # read by the guard, outside the app's handlers
            if started:
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        too_large = _BodyTooLarge(self.max_bytes)
        await JSONResponse(error_body(413, too_large.detail), status_code=413,
                           headers={"connection": "close"})(scope, receive, send)


def _principal(request: Request) -> Principal:
    return getattr(request.state, "principal", OPEN)


def _model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "ultrakv"}


def _served_model(host: ApiHost, requested: str | None) -> str:
    models = host.models()
    if not models:
        raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "",
                              host.not_ready() or "no model is being served yet",
                              retry_after_s=1.0)
    if requested is None or requested == "":
        return models[0]
    if requested not in models:
        raise RequestRejected(grpc.StatusCode.NOT_FOUND, "model",
                              f"model {requested!r} does not exist; served: {', '.join(models)}")
    return requested


async def _first_event(events: AsyncIterator[Any]) -> Any:
    """The first event of a generation, so a request the node refuses gets its status before
    any byte of a 200 stream is sent."""
    try:
        return await anext(events)
    except StopAsyncIteration:
        raise RequestRejected(grpc.StatusCode.INTERNAL, "",
                              "generation ended without a result") from None


def create_app(host: ApiHost) -> FastAPI:
    """The FastAPI app of the OpenAI-compatible API over ``host``."""
    app = FastAPI(title="ultrakv", summary="OpenAI-compatible API of an ultrakv server",
                  docs_url=None, redoc_url=None, openapi_url=None)
    counters = HttpCounters()
    host.registry.register(counters)
    if host.security is not None:
        app.add_middleware(_Guard, security=host.security)
    app.add_middleware(_BodyLimit, max_bytes=http_body_limit(host.limits))  # before the guard reads
    app.add_middleware(_CountResponses, counters=counters)

    @app.exception_handler(RequestRejected)
    async def rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_rejection(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = {404: f"no route for {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                     str(exc.detail))
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.get(HEALTH_PATH)
    async def health() -> JSONResponse:
        """Readiness: 200 while this process can serve requests, 503 (with why) otherwise."""
        reason = host.not_ready()
        if reason is None:
            return JSONResponse({"status": "ok", "models": host.models()})
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    @app.get(LIVENESS_PATH)
    async def live() -> JSONResponse:
        """Liveness: 200 while the event loop answers (a coordinator without nodes is alive)."""
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body = await asyncio.to_thread(generate_latest, host.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list",
                             "data": [_model_card(m, host.started_at) for m in host.models()]})

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> JSONResponse:
        if model not in host.models():
            raise RequestRejected(grpc.StatusCode.NOT_FOUND, "model",
                                  f"model {model!r} does not exist")
        return JSONResponse(_model_card(model, host.started_at))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request,
                          x_session_id: str | None = Header(default=None)) -> Response:
        session_id, session_field = session_for(x_session_id, body.user)
        model = _served_model(host, body.model)
        head = ResponseHead(id=f"cmpl-{uuid.uuid4().hex}", model=model)
        wire = completion_request(body, session_id, _principal(request).tenant)
        return await _generate(host, request, wire, session_field, head, False, bool(body.stream),
                               body.stream_options)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request,
                               x_session_id: str | None = Header(default=None)) -> Response:
        session_id, session_field = session_for(x_session_id, body.user)
        model = _served_model(host, body.model)
        head = ResponseHead(id=f"chatcmpl-{uuid.uuid4().hex}", model=model)
        wire = chat_request(body, session_id, _principal(request).tenant)
        return await _generate(host, request, wire, session_field, head, True, bool(body.stream),
                               body.stream_options)

    return app


async def _until_disconnect(request: Request) -> None:
    """Return when the client has gone (the body was read already, so the next ASGI message
    is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Awaitable[Any]) -> Any:
    """``work``'s result; cancelled (aborting the generation, freeing its blocks) when the
    client disconnects first, since nobody would read the answer."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise RequestRejected(grpc.StatusCode.CANCELLED, "", "the client disconnected")
    return task.result()


async def _generate(host: ApiHost, request: Request, wire: pb.GenerateRequest, session_field: str,
                    head: ResponseHead, chat: bool, stream: bool,
                    stream_options: StreamOptions | None) -> Response:
    """Validate like gRPC does, pass the rate limits and take a tenant slot, run on the
    backend, answer as one body or as SSE (the slot is given back when the answer ends)."""
    security, principal = host.security, _principal(request)
    try:
        valid = validate_generate(wire, host.limits)
    except RequestRejected as exc:
        raise openai_rejection(exc, session_field) from None
    keyed_session(valid, principal)
    if security is not None:
        peer = request.client.host if request.client else ""
        security.admit(principal, peer, method=request.url.path,
                       tokens=estimated_tokens(valid, host.limits.default_max_length))
        await security.acquire_slot(principal, peer, request.url.path)
    events = _until_closing(_named_by_client(host.backend.generate(valid, None), valid.session_id),
                            host.closing)
    if security is not None:
        events = _holding_slot(events, lambda: security.release_slot(principal))
    try:
        first = await _first_event(events)
    except Exception as exc:
        await events.aclose()
        raise openai_rejection(rejection_from_error(exc), session_field) from None
    if not stream:
        async def finish() -> pb.GenerateResult:
            async with contextlib.aclosing(events):
                result = first
                while not isinstance(result, pb.GenerateResult):
                    result = await _first_event(events)
                return result

        result = await _unless_client_leaves(request, finish())
        return JSONResponse(chat_body(head, result) if chat else completion_body(head, result))
    include_usage = stream_options is not None and bool(stream_options.include_usage)
    return StreamingResponse(_sse_events(events, first, head, chat, include_usage),
                             media_type="text/event-stream",
                             headers={"cache-control": "no-cache", "x-accel-buffering": "no"})


async def _named_by_client(events: AsyncIterator[Any], key: str) -> AsyncIterator[Any]:
    """``events``, whose errors name the session by the client's id, not by its key."""
    async with contextlib.aclosing(events):
        try:
            async for event in events:
                yield event
        except (RequestRejected, EngineError, ValueError, LookupError) as exc:
            raise rejection_for_client(exc, key) from None


async def _until_closing(events: AsyncIterator[Any], closing: asyncio.Event) -> AsyncIterator[Any]:
    """``events`` until the server closes: the next event after that is an UNAVAILABLE
    rejection (closing the generation aborts it), so a client gets a 503 or a stream's error
    event and ``[DONE]`` rather than a connection cut at the end of the grace period."""
    async with contextlib.aclosing(events):
        async for event in events:
            if closing.is_set():
                raise RequestRejected(grpc.StatusCode.UNAVAILABLE, "", "the server is shutting down; "
                                      "retry the request (on another server)", retry_after_s=1.0)
            yield event


async def _holding_slot(events: AsyncIterator[Any], release: Callable[[], None]
                        ) -> AsyncIterator[Any]:
    """``events``, giving the tenant's running slot back when they end, fail or are dropped.

    The slot rides on the generation's events rather than on the response body: the events
    have started (the first is read before answering), so the event loop closes them even
    when a stream's body is never iterated (the client left before the 200 went out), and
    the slot cannot leak.
    """
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                yield event
    finally:
        release()


def _chunk(head: ResponseHead, chat: bool, text: str, finish_reason: str | None = None
           ) -> dict[str, Any]:
    if not chat:
        return completion_chunk(head, text, finish_reason)
    return chat_chunk(head, {"content": text} if text else {}, finish_reason)


async def _sse_events(events: AsyncIterator[Any], first: Any, head: ResponseHead, chat: bool,
                      include_usage: bool) -> AsyncIterator[bytes]:
    """SSE of a generation: (chat: the assistant role first) text chunks, a last chunk with
    the finish reason, optionally the usage, then ``[DONE]``. A failure after the 200 went
    out is sent as an error event."""
    async with contextlib.aclosing(events):
        if chat:
            yield sse(chat_chunk(head, {"role": "assistant", "content": ""}))
        event = first
        try:
            while True:
                if isinstance(event, pb.TokenChunk):
                    if event.text:
                        yield sse(_chunk(head, chat, event.text))
                else:
                    yield sse(_chunk(head, chat, "", _FINISH.get(event.finish_reason)))
                    if include_usage:
                        obj = "chat.completion.chunk" if chat else "text_completion"
                        yield sse(usage_chunk(head, obj, event.usage))
                    break
                event = await _first_event(events)
        except Exception as exc:  # the status line is gone: report in the stream
            rejection = rejection_from_error(exc)
            yield sse(error_body(http_status(rejection), rejection.message, rejection.field))
        yield sse("[DONE]")


# --- the server ---------------------------------------------------------------------------------


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers: the process that embeds it (beside its gRPC
    server, in the same event loop) owns SIGINT/SIGTERM and stops it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a port in use is an OSError naming it."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only, not a listener
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"http_port {port} on {host} is not free ({exc.strerror}): stop the "
                      "process using it or choose another --http-port") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the HTTP port's TLS: the server's chain and key, and with ``client_ca``
    mutual TLS (clients must present a certificate that CA signed)."""

    cert: str
    key: str
    client_ca: str = ""

    def uvicorn_options(self) -> dict[str, Any]:
        return {"ssl_certfile": self.cert, "ssl_keyfile": self.key,
                "ssl_ca_certs": self.client_ca or None,
                "ssl_cert_reqs": ssl.CERT_REQUIRED if self.client_ca else ssl.CERT_NONE}


class HttpServer:
    """The OpenAI-compatible API served by uvicorn in the running event loop; HTTPS with
    ``tls`` (the servers pass the client port's TLS, so keys never cross in clear text)."""

    def __init__(self, host: ApiHost, bind_host: str, port: int,
                 grace_period_s: float = 5.0, tls: TlsFiles | None = None) -> None:
        self.host = host
        self.app = create_app(host)
        self.bind_host = bind_host
        self.requested_port = port
        self.grace_period_s = grace_period_s
        self.tls = tls
        self.port = 0
        self._socket: socket.socket | None = None
        self._server: _EmbeddedUvicorn | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> int:
        """Bind and serve; returns the bound port."""
        self._socket = bind_socket(self.bind_host, self.requested_port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False,
                                timeout_graceful_shutdown=self._uvicorn_grace_s(),
                                **(self.tls.uvicorn_options() if self.tls else {}))
        self._server = _EmbeddedUvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]),
                                         name="http-server")
        while not self._server.started:  # uvicorn offers no startup event to await
            if self._task.done():
                self._socket.close()
                await self._task  # raises what failed (e.g. unreadable TLS files)
                raise OSError(f"HTTP server on port {self.port} stopped while starting")
            await asyncio.sleep(0.01)
        return self.port

    def _uvicorn_grace_s(self) -> int:
        """uvicorn's graceful-shutdown timeout: whole seconds, at least one, never below the
        grace period."""
        return max(1, math.ceil(self.grace_period_s))

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    async def stop(self) -> None:
        """Stop accepting, let running requests finish within the grace period (ending the
        generations still running with an error near its end), close."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        # Generations still running are ended with an error half a second (or a fifth of the
        # grace, if less) before uvicorn cancels what is left.
        grace = self._uvicorn_grace_s()
        done, _ = await asyncio.wait({self._task}, timeout=grace - min(0.5, grace / 5))
        if not done:
            self.host.closing.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if self._socket is not None:
            self._socket.close()
        self._server = self._task = self._socket = None
