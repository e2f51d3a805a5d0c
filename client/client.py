"""The Python client: ``Client`` (blocking) and ``AsyncClient`` (asyncio) over the gRPC stubs.

Both speak the dict API::

    with Client("127.0.0.1:50051") as c:
        r = c.process_request({"text": "Hello", "max_length": 32, "session_id": "user_123"})
        r["success"], r["response"]["text"], r["cache_hit"], r["latency"]
        for chunk in c.stream({"text": "Hello"}): print(chunk.text, end="")
        c.process_request({"messages": [{"role": "user", "content": "Hi"}], "session_id": "u1"})

``address`` may name several coordinators (``["a:1", "b:2"]`` or ``"a:1,b:2"``): calls go to
one of them and move to the next when it is unavailable. Calls that fail with UNAVAILABLE
are retried on the next address at once, and after every address failed, after a backoff
(exponential with jitter) that grows to a budget outlasting one coordinator restart; a
stream is retried only before its first message. Every call has a deadline (``timeout``).
``api_key`` travels as the ``x-api-key`` metadata; ``signing_secret`` (keys created with
``--signing``) signs every call (HMAC, timestamp and nonce); ``tls`` selects a secure channel.
"""

from __future__ import annotations

import asyncio
import itertools
import numbers
import random
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ultrakv.client.signing import GENERATE_METHOD, SigningInterceptor, aio_interceptors
from ultrakv.cluster.addresses import DEFAULT_ADDRESS
from ultrakv.cluster.stream_link import Receiver, StreamLink, local_error
from ultrakv.cluster.validation import timeout_ms_left
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2, ultrakv_pb2_grpc

_PRIORITIES = {"CRITICAL": pb.PRIORITY_CRITICAL, "HIGH": pb.PRIORITY_HIGH,
               "NORMAL": pb.PRIORITY_NORMAL, "LOW": pb.PRIORITY_LOW}
_FINISH_NAMES = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                 pb.FINISH_REASON_ABORT: "abort", pb.FINISH_REASON_ERROR: "error",
                 pb.FINISH_REASON_UNSPECIFIED: ""}
_REQUEST_KEYS = {"text", "prompt", "token_ids", "messages", "max_length", "max_tokens", "temperature",
                 "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "session_id",
                 "request_id", "priority", "timeout"}
BATCH_SLICE = 64  # requests per ProcessBatch call (the server caps a batch's size)
# How long AsyncClient keeps a GenerateMany stream open with nothing in flight, so a client
# sending a request every few seconds does not open a call for each. Far below a server's
# idle limit as deployed (stream_idle_timeout_s, 300 s by default); a server set below it
# closes the stream first, and a request sent as it closed is retried on a new one.
LINK_LINGER_S = 5.0


@dataclass(frozen=True)
class TLSConfig:
    """Secure-channel settings; paths to PEM files. No ``ca_cert`` = system roots."""

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None  # overrides the name checked against the certificate

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            with open(path, "rb") as f:
                return f.read()

        return grpc.ssl_channel_credentials(read(self.ca_cert), read(self.client_key),
                                            read(self.client_cert))


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that fail with UNAVAILABLE: ``attempts`` rounds over the addresses,
    the waits between rounds growing exponentially from ``initial_s`` up to ``max_s`` plus
    up to ``jitter_s`` of jitter. The default rounds wait about 11 s in all: longer than a
    supervised coordinator takes to restart."""

    attempts: int = 10
    initial_s: float = 0.1
    max_s: float = 2.0
    jitter_s: float = 0.1

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")

    def wait_s(self, failed_rounds: int) -> float:
        """The wait after ``failed_rounds`` (>= 1) rounds in which every address failed."""
        return (min(self.max_s, self.initial_s * 2 ** (failed_rounds - 1))
                + random.uniform(0.0, self.jitter_s))


def _left(deadline: float) -> float:
    """Seconds left until ``deadline`` (a monotonic time), as an attempt's gRPC timeout."""
    return max(0.001, deadline - time.monotonic())


def parse_addresses(address: str | Sequence[str]) -> list[str]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> ``["a:1", "b:2"]``; ValueError when empty."""
    parts = address.split(",") if isinstance(address, str) else list(address)
    out = [a.strip() for a in parts if a.strip()]
    if not out:
        raise ValueError(f"address must name at least one HOST:PORT, got {address!r}")
    return out


class _Failover:
    """Which address the next attempt of a call uses, and how long to wait before it (pure).

    The current address is kept while it answers; UNAVAILABLE moves to the next one at
    once, and a wait comes only after a full round in which every address failed."""

    def __init__(self, n: int, policy: RetryPolicy) -> None:
        self.n = n
        self.policy = policy
        self.current = 0

    def failed(self, attempt: int, index: int, remaining_s: float | None = None) -> float | None:
        """Attempt number ``attempt`` of a call (from 0), sent to address ``index``, was
        unavailable: the wait before the next attempt, or None when the budget is spent:
        the policy's attempts, or the call's ``remaining_s`` (its timeout covers its
        retries: ``ultrakv health --timeout 1`` on a dead address answered after 11 s, the
        policy's whole schedule). Concurrent calls failing on one address move the current
        one on only once."""
        if attempt + 1 >= self.policy.attempts * self.n:
            return None
        if self.current == index:
            self.current = (index + 1) % self.n
        rounds, rest = divmod(attempt + 1, self.n)
        wait = self.policy.wait_s(rounds) if rest == 0 else 0.0
        if remaining_s is not None and wait >= remaining_s:
            return None
        return wait


@dataclass
class _Endpoint:
    """One address's channel and stubs. ``generate_one`` opens a Generate stream for one
    request as a unary-stream call: the request and its half-close go out with the call's
    opening in one batch, where a bidirectional call first waits for its headers to be sent
    (a completion of its own), then sends the request, then the half-close: 0.9 instead of
    1.3 ms from opening to a first answer on the 2-core machine (docs/serving-overhead.md).
    The server sees the same stream either way."""

    address: str
    channel: Any
    stub: ultrakv_pb2_grpc.UltraKVStub
    health: health_pb2_grpc.HealthStub
    generate_one: Any

    @classmethod
    def open(cls, address: str, tls: TLSConfig | None, aio: bool,
             signing_secret: str | None = None) -> _Endpoint:
        options = _channel_options(tls)
        if aio:
            interceptors = aio_interceptors(signing_secret)
            channel = (grpc.aio.secure_channel(address, tls.credentials(), options=options,
                                               interceptors=interceptors)
                       if tls is not None else grpc.aio.insecure_channel(
                           address, options=options, interceptors=interceptors))
        else:
            channel = (grpc.secure_channel(address, tls.credentials(), options=options)
                       if tls is not None else grpc.insecure_channel(address, options=options))
            if signing_secret:
                channel = grpc.intercept_channel(channel, SigningInterceptor(signing_secret))
        generate_one = channel.unary_stream(
            GENERATE_METHOD, request_serializer=pb.GenerateStreamRequest.SerializeToString,
            response_deserializer=pb.GenerateStreamResponse.FromString)
        return cls(address, channel, ultrakv_pb2_grpc.UltraKVStub(channel),
                   health_pb2_grpc.HealthStub(channel), generate_one)


def _is_unavailable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.RpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE


class RequestError(Exception):
    """A request the server refused or failed: gRPC ``code`` name, offending ``field``."""

    def __init__(self, code: str, message: str, field: str = "", retry_after_s: float = 0.0):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.retry_after_s = retry_after_s

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> RequestError:
        meta = dict(exc.trailing_metadata() or ())
        retry_ms = meta.get("retry-after-ms")
        return cls(exc.code().name, exc.details() or "", str(meta.get("ultrakv-field", "")),
                   float(retry_ms) / 1000.0 if retry_ms else 0.0)

    @classmethod
    def from_detail(cls, detail: pb.ErrorDetail) -> RequestError:
        return cls(detail.code, detail.message, detail.field, detail.retry_after_s)


@dataclass
class StreamChunk:
    """New text of a streamed request; the last chunk has ``finished`` and ``result`` (the
    same dict ``process_request`` returns)."""

    request_id: str
    text: str
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    result: dict | None = None


# --- dict <-> wire (pure) --------------------------------------------------------------------


class SpecError(ValueError):
    """A request dict's key holds what the wire cannot carry (named: ``field``)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _integer(name: str, value: object) -> int:
    # Integral: Python's and numpy's integers alike; bool is not a count.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SpecError(name, f"{name} must be an integer, got {value!r}")
    return int(value)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SpecError(name, f"{name} must be a number, got {value!r}")
    return float(value)


def _integers(name: str, values: object) -> list[int]:
    # Any sequence of integers (a list, a tuple, a numpy array), not a string or a mapping.
    if isinstance(values, str | bytes | dict) or not hasattr(values, "__iter__"):
        raise SpecError(name, f"{name} must be a list of integers, got {values!r}")
    return [_integer(name, v) for v in values]


def build_request(spec: dict) -> pb.GenerateRequest:
    """A request dict -> GenerateRequest. Values go to the server as given (it checks their
    ranges); a key the wire has no field for, or a value of a type it cannot carry, raises
    :class:`SpecError` naming the key (nothing is coerced: ``max_length=4.7`` is refused,
    not rounded)."""
    unknown = set(spec) - _REQUEST_KEYS
    if unknown:
        raise ValueError(f"request keys must be among {sorted(_REQUEST_KEYS)}, "
                         f"got {sorted(unknown)}")
    prompts = [k for k in ("text", "prompt", "token_ids", "messages") if spec.get(k) is not None]
    if len(prompts) > 1:
        raise SpecError(prompts[1], f"give one prompt (text, token_ids or messages), got {' and '.join(prompts)}")
    # An id of its own, kept across retries: a node that already took the turn answers a
    # retry from its record instead of taking the turn twice (node/turn_ledger.py).
    req = pb.GenerateRequest(request_id=str(spec.get("request_id") or uuid.uuid4().hex))
    text = spec.get("text", spec.get("prompt"))
    if spec.get("messages") is not None:
        if not isinstance(spec["messages"], list | tuple):
            raise SpecError("messages", f"messages must be a list of dicts, got {spec['messages']!r}")
        for i, m in enumerate(spec["messages"]):
            if not isinstance(m, dict):
                raise SpecError(f"messages[{i}]", f"messages[{i}] must be a dict with role and content, "
                                                  f"got {type(m).__name__}")
            role, content = m.get("role"), m.get("content")
            if not isinstance(role, str):
                raise SpecError(f"messages[{i}].role", f"messages[{i}].role must be a string, got {role!r}")
            if not isinstance(content, str):
                raise SpecError(f"messages[{i}].content", f"messages[{i}].content must be a string, got {content!r}")
            req.messages.messages.add(role=role, content=content)
        if not req.HasField("messages"):
            req.messages.SetInParent()  # empty: the server names the field
    elif spec.get("token_ids") is not None:
        req.token_ids.ids.extend(_integers("token_ids", spec["token_ids"]))
    elif isinstance(text, str):
        req.text = text
    elif isinstance(text, list | tuple) or type(text).__name__ == "ndarray":
        req.token_ids.ids.extend(_integers("text", text))
    elif text is not None:
        raise SpecError("text", f"text must be a string, got {type(text).__name__}")
    if spec.get("session_id") is not None:
        if not isinstance(spec["session_id"], str):
            raise SpecError("session_id", f"session_id must be a string, got {spec['session_id']!r}")
        req.session_id = spec["session_id"]
    s = req.sampling
    length_key = "max_length" if spec.get("max_length") is not None else "max_tokens"
    if spec.get(length_key) is not None:
        s.max_length = _integer(length_key, spec[length_key])
    for name in ("temperature", "top_p"):
        if spec.get(name) is not None:
            setattr(s, name, _number(name, spec[name]))
    for name in ("top_k", "seed"):
        if spec.get(name) is not None:
            setattr(s, name, _integer(name, spec[name]))
    stop = spec.get("stop")
    if stop:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list | tuple) or not all(isinstance(x, str) for x in stops):
            raise SpecError("stop", f"stop must be a string or a list of strings, got {stop!r}")
        s.stop.extend(stops)
    s.stop_token_ids.extend(_integers("stop_token_ids", spec.get("stop_token_ids") or []))
    ignore_eos = spec.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise SpecError("ignore_eos", f"ignore_eos must be true or false, got {ignore_eos!r}")
    s.ignore_eos = ignore_eos
    priority = spec.get("priority")
    if priority is not None:
        if isinstance(priority, str):
            if priority.upper() not in _PRIORITIES:
                raise SpecError("priority", f"priority must be one of {list(_PRIORITIES)}, got {priority!r}")
            req.priority = _PRIORITIES[priority.upper()]
        else:
            req.priority = _integer("priority", priority)
    if spec.get("timeout") is not None:
        req.timeout_ms = max(1, int(_number("timeout", spec["timeout"]) * 1000))
    return req


def spec_error(exc: ValueError) -> RequestError:
    """A request dict refused before it was sent, as the error a server would have given."""
    return RequestError("INVALID_ARGUMENT", str(exc), getattr(exc, "field", ""))


def result_dict(result: pb.GenerateResult, latency_s: float | None = None) -> dict:
    """GenerateResult -> the dict API. ``latency`` is the client-measured wall time when
    given, else the server's; ``ttft`` is the server's (seconds)."""
    usage = {"prompt_tokens": result.usage.prompt_tokens,
             "cached_tokens": result.usage.cached_tokens,
             "completion_tokens": result.usage.completion_tokens}
    return {
        "success": result.finish_reason != pb.FINISH_REASON_ERROR,
        "response": {"text": result.text, "token_ids": list(result.token_ids)},
        "cache_hit": result.usage.cached_tokens > 0,
        "cached_tokens": result.usage.cached_tokens,
        "usage": usage,
        "latency": latency_s if latency_s is not None else result.timings.latency_ms / 1000.0,
        "ttft": result.timings.ttft_ms / 1000.0,
        "session_id": result.session_id or None,
        "node": result.node_id or None,
        "error": result.error or None,
        # the keys of error_dict too: every row of a batch's output has one schema
        "error_code": None, "error_field": None, "retry_after_s": None,
        "request_id": result.request_id,
        "finish_reason": _FINISH_NAMES.get(result.finish_reason, ""),
    }


def error_dict(error: RequestError, spec: dict | None = None, latency_s: float = 0.0) -> dict:
    """A failed request in the dict API's shape."""
    return {
        "success": False, "response": {"text": "", "token_ids": []}, "cache_hit": False,
        "cached_tokens": 0,
        "usage": {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0},
        "latency": latency_s, "ttft": 0.0,
        "session_id": (spec or {}).get("session_id"), "node": None, "error": error.message,
        "error_code": error.code, "error_field": error.field,
        "retry_after_s": error.retry_after_s,
        "request_id": (spec or {}).get("request_id"), "finish_reason": "error",
    }


def stats_dict(stats: pb.StatsResponse) -> dict:
    """StatsResponse -> dict: ``nodes`` (one dict per node) and ``totals`` summed over them."""
    nodes = [message_dict(n) for n in stats.nodes]
    sums = ("sessions", "queue_depth", "running", "requests_total", "requests_failed",
            "prompt_tokens", "completion_tokens", "cached_tokens")
    totals: dict[str, float] = {k: sum(int(n.get(k, 0)) for n in nodes) for k in sums}
    for k in ("hits", "misses", "blocks_used", "blocks_free", "blocks_total"):
        totals[f"cache_{k}"] = sum(int(n["cache"].get(k, 0)) for n in nodes)
    for n in nodes:
        for tier, hits in n["cache"].get("tier_hits", {}).items():
            totals[f"cache_{tier}_hits"] = totals.get(f"cache_{tier}_hits", 0) + int(hits)
    lookups = totals["cache_hits"] + totals["cache_misses"]
    totals["cache_hit_rate"] = totals["cache_hits"] / lookups if lookups else 0.0
    return {"nodes": nodes, "totals": totals}


def _stream_request(req: pb.GenerateRequest) -> pb.GenerateStreamRequest:
    if not req.request_id:
        req.request_id = f"r{time.monotonic_ns():x}"
    return pb.GenerateStreamRequest(generate=req)


def _chunk_from(message: pb.GenerateStreamResponse, started: float) -> StreamChunk:
    kind = message.WhichOneof("event")
    if kind == "error":
        raise RequestError.from_detail(message.error)
    if kind == "chunk":
        return StreamChunk(message.request_id, message.chunk.text, list(message.chunk.token_ids))
    return StreamChunk(message.request_id, "", [], finished=True,
                       result=result_dict(message.result, time.perf_counter() - started))


def _channel_options(tls: TLSConfig | None) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                      ("grpc.max_send_message_length", 64 * 1024 * 1024)]
    if tls is not None and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return options


# --- blocking client -------------------------------------------------------------------------


class Client:
    """Blocking client. ``address``: one ``HOST:PORT``, a comma list, or a list (several
    coordinators, failed over). ``timeout`` is the default per-call deadline in seconds."""

    def __init__(self, address: str | Sequence[str] = DEFAULT_ADDRESS, *,
                 api_key: str | None = None, tls: TLSConfig | None = None,
                 timeout: float = 60.0, retry: RetryPolicy | None = None,
                 signing_secret: str | None = None) -> None:
        self.addresses = parse_addresses(address)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._metadata = (("x-api-key", api_key),) if api_key else ()
        self._endpoints = [_Endpoint.open(a, tls, aio=False, signing_secret=signing_secret)
                           for a in self.addresses]
        self._failover = _Failover(len(self._endpoints), self.retry)

    @property
    def address(self) -> str:
        """The address calls go to now."""
        return self.addresses[self._failover.current]

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for endpoint in self._endpoints:
            endpoint.channel.close()

    def _call(self, pick: Callable[[_Endpoint], Callable[..., Any]], request: Any,
              timeout: float | None = None) -> Any:
        """Unary call of ``pick(endpoint)`` with deadline, metadata, failover and retries;
        failures as RequestError. ``timeout`` (the client's by default) covers the retries."""
        attempt = 0
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            index = self._failover.current
            try:
                return pick(self._endpoints[index])(request, timeout=_left(deadline),
                                                    metadata=self._metadata)
            except grpc.RpcError as exc:
                wait = (self._failover.failed(attempt, index, deadline - time.monotonic())
                        if _is_unavailable(exc) else None)
                if wait is None:
                    raise RequestError.from_rpc(exc) from exc
            time.sleep(wait)
            attempt += 1

    def process_request(self, spec: dict, timeout: float | None = None) -> dict:
        """Run one request; returns the result dict (``success`` False with ``error`` on
        failure, never raises for a refused request)."""
        started = time.perf_counter()
        try:
            result = self._call(lambda e: e.stub.Process, build_request(spec), timeout)
        except ValueError as exc:
            return error_dict(spec_error(exc), spec)
        except RequestError as exc:
            return error_dict(exc, spec, time.perf_counter() - started)
        return result_dict(result, time.perf_counter() - started)

    def process_batch(self, specs: Iterable[dict], concurrency: int = 8,
                      timeout: float | None = None,
                      on_progress: Callable[[int], None] | None = None) -> list[dict]:
        """Run many requests (results in order); a bad item fails alone. ``on_progress``
        receives the number of requests finished after each slice."""
        results: list[dict] = []
        specs = list(specs)
        for i in range(0, len(specs), BATCH_SLICE):
            part = specs[i:i + BATCH_SLICE]
            results.extend(self._batch_slice(part, concurrency, timeout))
            if on_progress is not None:
                on_progress(len(part))
        return results

    def _batch_slice(self, specs: list[dict], concurrency: int,
                     timeout: float | None) -> list[dict]:
        built = _prepare_batch(specs)
        request = pb.BatchRequest(requests=[b for b in built if isinstance(b, pb.GenerateRequest)],
                                  concurrency=concurrency)
        try:
            response = self._call(lambda e: e.stub.ProcessBatch, request, timeout)
        except RequestError as exc:
            return _fail_batch(built, specs, exc)
        return _merge_batch(built, specs, response)

    def stream(self, spec: dict, timeout: float | None = None) -> Iterator[StreamChunk]:
        """Stream one request's text as it is generated; raises RequestError if refused.
        Leaving the loop early cancels the request on the server."""
        request = _stream_request(build_request(spec))
        started = time.perf_counter()

        def open_call(endpoint: _Endpoint) -> tuple[Any, pb.GenerateStreamResponse]:
            call = endpoint.generate_one(request, timeout=timeout or self.timeout,
                                         metadata=self._metadata)
            try:
                return call, next(call)
            except StopIteration:
                raise RequestError("INTERNAL", "stream ended without a message") from None

        call, first = self._call(lambda e: lambda _r, **_kw: open_call(e), None)
        try:
            for message in itertools.chain([first], call):
                chunk = _chunk_from(message, started)
                yield chunk
                if chunk.finished:
                    return
        except grpc.RpcError as exc:
            raise RequestError.from_rpc(exc) from exc
        finally:
            call.cancel()

    def stats(self) -> dict:
        return stats_dict(self._call(lambda e: e.stub.Stats, pb.StatsRequest()))

    def health(self, service: str = "") -> dict:
        """grpc.health.v1 status: ``{"status": "SERVING", "healthy": True}``; an unreachable
        server gives ``healthy`` False and the error rather than raising."""
        try:
            resp = self._call(lambda e: e.health.Check, health_pb2.HealthCheckRequest(service=service))
        except RequestError as exc:
            return {"status": "UNREACHABLE" if exc.code == "UNAVAILABLE" else exc.code,
                    "healthy": False, "address": self.address, "error": exc.message}
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return {"status": name, "healthy": name == "SERVING", "address": self.address}

    def clear_cache(self) -> dict:
        resp = self._call(lambda e: e.stub.ClearCache, pb.ClearCacheRequest())
        return {"success": True, "blocks_freed": resp.blocks_freed}

    def cleanup_sessions(self, max_age: float) -> dict:
        resp = self._call(lambda e: e.stub.CleanupSessions,
                          pb.CleanupSessionsRequest(max_age_s=float(max_age)))
        return {"success": True, "removed": resp.removed}

    def get_session(self, session_id: str) -> dict:
        return message_dict(self._call(lambda e: e.stub.GetSession,
                                        pb.GetSessionRequest(session_id=session_id)))

    def delete_session(self, session_id: str) -> None:
        self._call(lambda e: e.stub.DeleteSession, pb.DeleteSessionRequest(session_id=session_id))

    def export_sessions(self, history_only: bool = False,
                        timeout: float | None = None) -> Iterator[ultrakv_pb2.BackupPart]:
        """A backup's stream (admin key): a header, then every session's chunks. Not retried:
        a backup that breaks off is run again whole."""
        call = self._endpoints[self._failover.current].stub.ExportSessions(
            ultrakv_pb2.ExportSessionsRequest(history_only=history_only),
            timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise RequestError.from_rpc(exc) from exc
        finally:
            call.cancel()

    def import_sessions(self, chunks: Iterable[Any],
                        timeout: float | None = None) -> ultrakv_pb2.ImportSessionsResponse:
        """A restore (admin key): session chunk runs, each imported on its owner."""
        try:
            return self._endpoints[self._failover.current].stub.ImportSessions(
                iter(chunks), timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RequestError.from_rpc(exc) from exc


def message_dict(message: Any) -> dict:
    """A wire message as a plain dict with native types (json_format would turn int64 into
    strings); enums by name, Structs as dicts."""
    out: dict[str, Any] = {}
    for f in message.DESCRIPTOR.fields:
        value = getattr(message, f.name)
        if f.message_type is not None and f.message_type.full_name == "google.protobuf.Struct":
            out[f.name] = json_format.MessageToDict(value)
        elif f.message_type is not None and f.message_type.GetOptions().map_entry:
            out[f.name] = dict(value)  # maps of scalars (CacheStats.tier_hits)
        elif f.message_type is not None:
            out[f.name] = ([message_dict(v) for v in value] if f.is_repeated
                           else message_dict(value))
        elif f.enum_type is not None:
            name = f.enum_type.values_by_number.get(value)
            out[f.name] = name.name if name is not None else value
        else:
            out[f.name] = list(value) if f.is_repeated else value
    return out


def _prepare_batch(specs: list[dict]) -> list[pb.GenerateRequest | dict]:
    """Build each request; one that cannot be built is already its error dict."""
    built: list[pb.GenerateRequest | dict] = []
    for spec in specs:
        try:
            built.append(build_request(spec))
        except ValueError as exc:
            built.append(error_dict(spec_error(exc), spec))
    return built


def _fail_batch(built: list[pb.GenerateRequest | dict], specs: list[dict],
                error: RequestError) -> list[dict]:
    return [b if isinstance(b, dict) else error_dict(error, s)
            for b, s in zip(built, specs, strict=True)]


def _merge_batch(built: list[pb.GenerateRequest | dict], specs: list[dict],
                 response: pb.BatchResponse) -> list[dict]:
    """Results in request order; ``latency`` of each is the server's for that item."""
    items = iter(response.items)
    out = []
    for b, spec in zip(built, specs, strict=True):
        if isinstance(b, dict):
            out.append(b)
            continue
        item = next(items)
        if item.WhichOneof("outcome") == "error":
            out.append(error_dict(RequestError.from_detail(item.error), spec))
        else:
            out.append(result_dict(item.result))
    return out


# --- asyncio client --------------------------------------------------------------------------


class AsyncClient:
    """asyncio client with the same API as :class:`Client` (methods are coroutines;
    ``stream`` is an async iterator)."""

    def __init__(self, address: str | Sequence[str] = DEFAULT_ADDRESS, *,
                 api_key: str | None = None, tls: TLSConfig | None = None,
                 timeout: float = 60.0, retry: RetryPolicy | None = None,
                 signing_secret: str | None = None, multiplex: bool = True) -> None:
        self.addresses = parse_addresses(address)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.multiplex = multiplex
        self._metadata = (("x-api-key", api_key),) if api_key else ()
        self._endpoints = [_Endpoint.open(a, tls, aio=True, signing_secret=signing_secret)
                           for a in self.addresses]
        self._failover = _Failover(len(self._endpoints), self.retry)
        self._links: dict[int, list[StreamLink]] = {}  # per endpoint: its GenerateMany streams
        self._per_call: set[int] = set()  # endpoints without GenerateMany (an older server)
        self._closed = False

    @property
    def address(self) -> str:
        """The address calls go to now."""
        return self.addresses[self._failover.current]

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channels; streams still running end with CANCELLED."""
        self._closed = True
        for links in list(self._links.values()):
            for link in list(links):
                link.close()
        for endpoint in self._endpoints:
            await endpoint.channel.close()

    async def _call(self, pick: Callable[[_Endpoint], Callable[..., Any]], request: Any,
                    timeout: float | None = None) -> Any:
        attempt = 0
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            index = self._failover.current
            try:
                return await pick(self._endpoints[index])(
                    request, timeout=_left(deadline), metadata=self._metadata)
            except grpc.RpcError as exc:
                wait = (self._failover.failed(attempt, index, deadline - time.monotonic())
                        if _is_unavailable(exc) else None)
                if wait is None:
                    raise RequestError.from_rpc(exc) from exc
            await asyncio.sleep(wait)
            attempt += 1

    async def process_request(self, spec: dict, timeout: float | None = None) -> dict:
        started = time.perf_counter()
        try:
            result = await self._call(lambda e: e.stub.Process, build_request(spec), timeout)
        except ValueError as exc:
            return error_dict(spec_error(exc), spec)
        except RequestError as exc:
            return error_dict(exc, spec, time.perf_counter() - started)
        return result_dict(result, time.perf_counter() - started)

    async def process_batch(self, specs: Iterable[dict], concurrency: int = 8,
                            timeout: float | None = None,
                            on_progress: Callable[[int], None] | None = None) -> list[dict]:
        """As :meth:`Client.process_batch`."""
        specs = list(specs)
        results: list[dict] = []
        for i in range(0, len(specs), BATCH_SLICE):
            part = specs[i:i + BATCH_SLICE]
            built = _prepare_batch(part)
            request = pb.BatchRequest(
                requests=[b for b in built if isinstance(b, pb.GenerateRequest)],
                concurrency=concurrency)
            try:
                results.extend(_merge_batch(built, part, await self._call(
                    lambda e: e.stub.ProcessBatch, request, timeout)))
            except RequestError as exc:
                results.extend(_fail_batch(built, part, exc))
            if on_progress is not None:
                on_progress(len(part))
        return results

    async def stream(self, spec: dict, timeout: float | None = None
                     ) -> AsyncIterator[StreamChunk]:
        """One request's chunks, then its result (a chunk with ``finished``). With
        ``multiplex`` (the default) the client's concurrent streams to a server share one
        GenerateMany call (cluster/stream_link.py): a request is one message on it, not a
        call of its own, and each message back carries the events of all of them; the
        request's deadline travels in it (``timeout_ms``) and is kept here too. A server
        without GenerateMany gets a Generate call per request, as with ``multiplex=False``."""
        request = _stream_request(build_request(spec))
        started = time.perf_counter()
        deadline = time.monotonic() + (timeout or self.timeout)
        opened = await self._open_on_link(request, deadline) if self.multiplex else None
        if opened is None:
            messages, first, done = await self._open_call(request, deadline)
        else:
            messages, first, done = opened
        try:
            message = first
            while True:
                chunk = _chunk_from(message, started)
                yield chunk
                if chunk.finished:
                    return
                message = await anext(messages, None)
                if message is None:  # a stream ends only after its requests' results
                    raise RequestError("INTERNAL", "stream ended without the request's result")
        except grpc.RpcError as exc:
            raise RequestError.from_rpc(exc) from exc
        finally:
            done()

    async def _open_call(self, request: pb.GenerateStreamRequest, deadline: float
                         ) -> tuple[AsyncIterator[pb.GenerateStreamResponse],
                                    pb.GenerateStreamResponse, Callable[[], None]]:
        """A Generate call of the request's own, once it answered (retried on another
        address while unavailable, within ``deadline``)."""

        async def open_call(endpoint: _Endpoint) -> tuple[Any, pb.GenerateStreamResponse]:
            call = endpoint.generate_one(request, timeout=_left(deadline), metadata=self._metadata)
            first = await call.read()
            if first is grpc.aio.EOF:
                raise RequestError("INTERNAL", "stream ended without a message")
            return call, first

        call, first = await self._call(lambda e: lambda _r, **_kw: open_call(e), None,
                                       _left(deadline))

        async def rest() -> AsyncIterator[pb.GenerateStreamResponse]:
            while (message := await call.read()) is not grpc.aio.EOF:
                yield message

        return rest(), first, call.cancel

    async def _open_on_link(self, request: pb.GenerateStreamRequest, deadline: float
                            ) -> tuple[Receiver, pb.GenerateStreamResponse, Callable[[], None]] | None:
        """The request on a GenerateMany stream, once it answered: its receiver, its first
        event and what ends it (a cancel on the stream when it still runs). None when the
        current address has no GenerateMany (the caller opens a call instead). Retried as a
        call is: on the next address while unavailable (the call, or the server's answer to
        the request: it is stopping), and on a fresh stream when the server ended one
        unread as the request went out (its idle limit, or its stop)."""
        loop = asyncio.get_running_loop()
        rid = request.generate.request_id
        own_ms = request.generate.timeout_ms
        attempt = reopened = 0
        expired: list[bool] = []

        def expire(receiver: Receiver) -> None:
            expired.append(True)
            receiver.fail(local_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

        while True:
            if self._closed:
                raise RequestError("CANCELLED", "the client is closed")
            index = self._failover.current
            if index in self._per_call:
                return None
            # The time left travels with each attempt (the server keeps it: its stream has no
            # deadline), within what the request itself asked for.
            request.generate.timeout_ms = timeout_ms_left(own_ms, deadline)
            link = self._link(index, rid)
            receiver = link.submit(request)
            timer = loop.call_later(max(0.0, deadline - time.monotonic()), expire, receiver)

            def done(link: StreamLink = link, receiver: Receiver = receiver,
                     timer: asyncio.TimerHandle = timer) -> None:
                timer.cancel()
                link.release(rid, receiver)

            try:
                first = await anext(receiver, None)
            except grpc.aio.AioRpcError as exc:
                done()
                code = exc.code()
                if code == grpc.StatusCode.UNIMPLEMENTED:
                    self._per_call.add(index)
                    return None
                if code == grpc.StatusCode.INTERNAL and not link.heard:
                    return None  # gRPC's form of an older server's UNIMPLEMENTED (StreamLink)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and not expired and reopened < 3:
                    reopened += 1  # not ours: the server's idle limit closed the stream meanwhile
                    continue
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise RequestError.from_rpc(exc) from exc
                error: RequestError = RequestError.from_rpc(exc)
            except BaseException:
                done()
                raise
            else:
                if first is None:
                    done()
                    if reopened < 3:  # the server ended the stream unread: idle at its stop
                        reopened += 1
                        continue
                    raise RequestError("INTERNAL", "stream ended without a message")
                if not (first.WhichOneof("event") == "error" and first.error.code == "UNAVAILABLE"):
                    return receiver, first, done
                done()  # refused: the server is stopping (or its engine is gone)
                error = RequestError.from_detail(first.error)
            wait = self._failover.failed(attempt, index, deadline - time.monotonic())
            if wait is None:
                raise error
            await asyncio.sleep(wait)
            attempt += 1

    def _link(self, index: int, request_id: str) -> StreamLink:
        """A GenerateMany stream to endpoint ``index`` that may take ``request_id``."""
        links = self._links.setdefault(index, [])
        for link in links:
            if link.accepts(request_id):
                return link
        endpoint = self._endpoints[index]
        link = StreamLink(lambda: endpoint.stub.GenerateMany(metadata=self._metadata),
                          lambda closed: links.remove(closed) if closed in links else None,
                          linger_s=LINK_LINGER_S)
        links.append(link)
        return link

    async def stats(self) -> dict:
        return stats_dict(await self._call(lambda e: e.stub.Stats, pb.StatsRequest()))

    async def health(self, service: str = "") -> dict:
        try:
            resp = await self._call(lambda e: e.health.Check,
                                    health_pb2.HealthCheckRequest(service=service))
        except RequestError as exc:
            return {"status": "UNREACHABLE" if exc.code == "UNAVAILABLE" else exc.code,
                    "healthy": False, "address": self.address, "error": exc.message}
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
        return {"status": name, "healthy": name == "SERVING", "address": self.address}

    async def clear_cache(self) -> dict:
        resp = await self._call(lambda e: e.stub.ClearCache, pb.ClearCacheRequest())
        return {"success": True, "blocks_freed": resp.blocks_freed}

    async def cleanup_sessions(self, max_age: float) -> dict:
        resp = await self._call(lambda e: e.stub.CleanupSessions,
                                pb.CleanupSessionsRequest(max_age_s=float(max_age)))
        return {"success": True, "removed": resp.removed}

    async def get_session(self, session_id: str) -> dict:
        return message_dict(await self._call(lambda e: e.stub.GetSession,
                                              pb.GetSessionRequest(session_id=session_id)))

    async def delete_session(self, session_id: str) -> None:
        await self._call(lambda e: e.stub.DeleteSession, pb.DeleteSessionRequest(session_id=session_id))

    async def export_sessions(self, history_only: bool = False, timeout: float | None = None
                              ) -> AsyncIterator[ultrakv_pb2.BackupPart]:
        """A backup's stream (admin key), as :meth:`Client.export_sessions`. Not retried."""
        call = self._endpoints[self._failover.current].stub.ExportSessions(
            ultrakv_pb2.ExportSessionsRequest(history_only=history_only),
            timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for part in call:
                yield part
        except grpc.RpcError as exc:
            raise RequestError.from_rpc(exc) from exc
        finally:
            call.cancel()

    async def import_sessions(self, chunks: Iterable[Any] | AsyncIterable[Any],
                              timeout: float | None = None) -> ultrakv_pb2.ImportSessionsResponse:
        """A restore (admin key), as :meth:`Client.import_sessions`."""
        try:
            return await self._endpoints[self._failover.current].stub.ImportSessions(
                chunks if hasattr(chunks, "__aiter__") else iter(chunks),
                timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise RequestError.from_rpc(exc) from exc
