"""Request validation at the gRPC edge: every field checked, every failure a status naming it.

Pure functions over the wire messages (no engine, no I/O) so the node server and the
coordinator share them. A failure is a :class:`RequestRejected` carrying the gRPC status
code, the field and a message that names the limit, e.g.
``max_length must be in [1, 4096], got 0``. Model-dependent limits (prompt tokens against
the context length, token ids against the vocabulary) are the engine's ``validate``; its
errors map to the same shape through :func:`rejection_from_error`.

Invalid UTF-8 cannot be caught after parsing: protobuf refuses to parse a message whose
string field holds bad UTF-8, and grpc would then fail the whole call (or the whole stream)
with an anonymous INTERNAL. :func:`tolerant_deserializer` parses instead into a
:class:`Malformed` marker naming the field, which the servicer answers per request.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf.message import DecodeError, Message
from ultrakv.cluster.errors import (
    CapacityError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    SessionBusyError,
    SessionFencedError,
    SessionNotFoundError,
    SessionSupersededError,
)
from ultrakv.cluster.session_keys import SEPARATOR, client_session_id, split_session_key
from ultrakv.v1 import types_pb2 as pb

SESSION_ID_MAX_BYTES = 128
REQUEST_ID_MAX_BYTES = 128
TENANT_MAX_BYTES = 128
# A session's key inside the cluster (cluster/session_keys.py): its tenant, "~", its id.
SESSION_KEY_MAX_BYTES = TENANT_MAX_BYTES + len(SEPARATOR) + SESSION_ID_MAX_BYTES
# Stop conditions are checked on every generated token, so their size is bounded: a request
# with 800k stop ids once slowed every batch it joined by two orders of magnitude.
STOP_TOKEN_IDS_MAX = 64
STOP_SEQUENCES_MAX = 16
STOP_SEQUENCE_MAX_BYTES = 256
# Session ids reach file names (checkpoints), so no path separators and nothing to escape.
_SESSION_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")
# A key's tenant: the names API keys are bound to (security/keys.py).
_KEY_TENANT_RE = re.compile(r"[A-Za-z0-9._-]+")
PRIORITY_NAMES = {
    pb.PRIORITY_CRITICAL: "CRITICAL",
    pb.PRIORITY_HIGH: "HIGH",
    pb.PRIORITY_NORMAL: "NORMAL",
    pb.PRIORITY_LOW: "LOW",
}
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Limits:
    """Edge limits. ``max_tokens_limit`` mirrors EngineConfig.max_tokens_limit."""

    max_tokens_limit: int = 4096
    default_max_length: int = 64
    max_prompt_bytes: int = 1 << 20
    max_prompt_token_ids: int = 1 << 18
    max_chat_messages: int = 1024
    max_stop_sequences: int = STOP_SEQUENCES_MAX
    max_stop_sequence_bytes: int = STOP_SEQUENCE_MAX_BYTES
    max_stop_token_ids: int = STOP_TOKEN_IDS_MAX
    max_batch_size: int = 256
    max_batch_concurrency: int = 64
    stream_idle_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.stream_idle_timeout_s > 0:
            raise ValueError(f"stream_idle_timeout_s must be > 0, got {self.stream_idle_timeout_s}")


class RequestRejected(Exception):
    """A request the edge refuses: gRPC ``code``, offending ``field``, ``retry_after_s`` hint."""

    def __init__(self, code: grpc.StatusCode, field: str, message: str,
                 retry_after_s: float = 0.0):
        super().__init__(message)
        self.code = code
        self.field = field
        self.message = message
        self.retry_after_s = retry_after_s

    @classmethod
    def from_detail(cls, detail: pb.ErrorDetail) -> RequestRejected:
        """The inverse of :meth:`to_detail`: a node's per-request error, re-raised at the
        coordinator so it reaches the client unchanged."""
        code = getattr(grpc.StatusCode, detail.code, grpc.StatusCode.UNKNOWN)
        return cls(code, detail.field, detail.message, detail.retry_after_s)

    def to_detail(self) -> pb.ErrorDetail:
        """The per-request error message used on streams and in batches."""
        return pb.ErrorDetail(code=self.code.name, message=self.message, field=self.field,
                              retry_after_s=self.retry_after_s)


# A node's answer to a turn it took on a copy another node owns now (SessionSupersededError).
SUPERSEDED_CODE = grpc.StatusCode.ABORTED


def superseded(rejection: RequestRejected) -> bool:
    """Whether a node refused a turn because the session has moved on without it: the
    coordinator then treats the node like one that failed, and resumes the request."""
    return rejection.code == SUPERSEDED_CODE and rejection.field == "session_id"


# The field a node's per-request error names when the node itself can no longer serve (its
# engine process is gone: node/engine_client.py): the coordinator resumes the request
# elsewhere, as for a node that died.
NODE_FAILING_FIELD = "node"


def node_failing(rejection: RequestRejected) -> bool:
    """Whether a node refused or ended a request because it is failing (UNAVAILABLE on
    ``node``): the coordinator treats it like a node that died, and resumes the request."""
    return rejection.code == grpc.StatusCode.UNAVAILABLE and rejection.field == NODE_FAILING_FIELD


def not_acknowledged(rejection: RequestRejected) -> bool:
    """Whether a node kept a session turn without acknowledging it, or refused one on a copy
    it holds fenced (UNAVAILABLE on ``session_id``: no copy on another node in time, no proven
    lease): the coordinator asks again, and the node answers from the turn's record once the
    turn is durable, never running it twice."""
    return rejection.code == grpc.StatusCode.UNAVAILABLE and rejection.field == "session_id"


def _invalid(field: str, message: str) -> RequestRejected:
    return RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, field, message)


def validate_session_id(session_id: str, field: str = "session_id") -> str:
    """Check a session id: 1..128 bytes of ``[A-Za-z0-9._:-]``."""
    if not session_id:
        raise _invalid(field, f"{field} must be non-empty")
    size = len(session_id.encode("utf-8", "surrogatepass"))
    if size > SESSION_ID_MAX_BYTES:
        raise _invalid(field, f"{field} must be at most {SESSION_ID_MAX_BYTES} bytes, got {size}")
    if not _SESSION_ID_RE.fullmatch(session_id):
        raise _invalid(field, f"{field} must match [A-Za-z0-9._:-], got {session_id!r}")
    return session_id


def validate_session_key(key: str, field: str = "session_id") -> str:
    """Check a session key, as the cluster passes it behind the edge: a session id, or a
    tenant name, ``~`` and a session id (at most SESSION_KEY_MAX_BYTES bytes)."""
    tenant, session_id = split_session_key(key)
    if key.startswith(SEPARATOR) or (tenant and not _KEY_TENANT_RE.fullmatch(tenant)):
        raise _invalid(field, f"{field} must be a session id or <tenant>~<session id> with a "
                              f"tenant of [A-Za-z0-9._-], got {key!r}")
    size = len(tenant.encode("utf-8"))
    if size > TENANT_MAX_BYTES:
        raise _invalid(field, f"{field}'s tenant must be at most {TENANT_MAX_BYTES} bytes, "
                              f"got {size}")
    validate_session_id(session_id, field)
    return key


def validate_tenant_key(key: str, tenant: str, field: str = "session_id") -> str:
    """Check a session key that comes with its session's tenant: a key of that tenant's (or
    an open one's, which any tenant's sessions kept from before keys were namespaced use)."""
    if split_session_key(validate_session_key(key, field))[0] not in ("", tenant):
        raise _invalid(field, f"{field} {key!r} is not a session of tenant {tenant!r}")
    return key


def validate_tenant(tenant: str, field: str = "tenant") -> str:
    """Check a tenant name (the salt of a session's block hashes): at most 128 bytes."""
    size = len(tenant.encode("utf-8"))
    if size > TENANT_MAX_BYTES:
        raise _invalid(field, f"{field} must be at most {TENANT_MAX_BYTES} bytes, got {size}")
    return tenant


def validate_generate(request: pb.GenerateRequest, limits: Limits, *,
                      require_request_id: bool = False, keyed: bool = False
                      ) -> pb.GenerateRequest:
    """Validate one generate request; return a normalized copy with defaults filled in.

    The copy has a request id (generated when absent and not required), an explicit
    ``max_length`` and a concrete priority. ``keyed``: the request comes from behind the
    edge, so its session id is a session key (cluster/session_keys.py), one of its tenant's.
    """
    out = pb.GenerateRequest()
    out.CopyFrom(request)
    if not out.request_id:
        if require_request_id:
            raise _invalid("request_id", "request_id must be non-empty on a Generate stream")
        out.request_id = uuid.uuid4().hex
    rid_bytes = len(out.request_id.encode("utf-8"))
    if rid_bytes > REQUEST_ID_MAX_BYTES:
        raise _invalid("request_id",
                       f"request_id must be at most {REQUEST_ID_MAX_BYTES} bytes, got {rid_bytes}")
    validate_tenant(out.tenant)
    if out.HasField("session_id"):
        if keyed:
            validate_tenant_key(out.session_id, out.tenant)
        else:
            validate_session_id(out.session_id)
    _validate_prompt(out, limits)
    _validate_sampling(out.sampling, limits)
    if not out.sampling.HasField("max_length"):
        out.sampling.max_length = limits.default_max_length
    if out.priority == pb.PRIORITY_UNSPECIFIED:
        out.priority = pb.PRIORITY_NORMAL
    elif out.priority not in PRIORITY_NAMES:
        names = ", ".join(PRIORITY_NAMES.values())
        raise _invalid("priority", f"priority must be one of {names}, got {out.priority}")
    return out


def _validate_prompt(request: pb.GenerateRequest, limits: Limits) -> None:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise _invalid("prompt", "prompt must be set: text, token_ids or messages")
    if kind == "messages":
        _validate_messages(request.messages.messages, limits)
        return
    if kind == "text":
        if not request.text:
            raise _invalid("text", "text must be non-empty")
        size = len(request.text.encode("utf-8"))
        if size > limits.max_prompt_bytes:
            raise RequestRejected(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "text",
                f"text must be at most {limits.max_prompt_bytes} bytes, got {size}; "
                "retry with a shorter prompt")
        return
    ids = request.token_ids.ids
    if not ids:
        raise _invalid("token_ids", "token_ids must be non-empty")
    if len(ids) > limits.max_prompt_token_ids:
        raise RequestRejected(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "token_ids",
            f"token_ids must hold at most {limits.max_prompt_token_ids} ids, got {len(ids)}; "
            "retry with a shorter prompt")
    negative = next((t for t in ids if t < 0), None)
    if negative is not None:
        raise _invalid("token_ids", f"token_ids must be >= 0, got {negative}")


def _validate_messages(messages: Sequence[pb.ChatMessage], limits: Limits) -> None:
    if not messages:
        raise _invalid("messages", "messages must hold at least one message")
    if len(messages) > limits.max_chat_messages:
        raise RequestRejected(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "messages",
            f"messages must hold at most {limits.max_chat_messages} messages, got {len(messages)}; "
            "retry with a shorter conversation")
    size = 0
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise _invalid(f"messages[{i}].role",
                           f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {m.role!r}")
        size += len(m.content.encode("utf-8"))
    if size > limits.max_prompt_bytes:
        raise RequestRejected(
            grpc.StatusCode.RESOURCE_EXHAUSTED, "messages",
            f"messages must hold at most {limits.max_prompt_bytes} bytes of content, got {size}; "
            "retry with a shorter conversation")


def _validate_sampling(s: pb.SamplingOptions, limits: Limits) -> None:
    if s.HasField("max_length") and not 1 <= s.max_length <= limits.max_tokens_limit:
        raise _invalid("sampling.max_length",
                       f"max_length must be in [1, {limits.max_tokens_limit}], got {s.max_length}")
    if s.HasField("temperature") and (not math.isfinite(s.temperature) or s.temperature < 0):
        raise _invalid("sampling.temperature",
                       f"temperature must be a finite number >= 0, got {s.temperature}")
    if s.HasField("top_p") and not (0.0 < s.top_p <= 1.0):  # NaN fails this too
        raise _invalid("sampling.top_p", f"top_p must be in (0, 1], got {s.top_p}")
    if s.HasField("top_k") and s.top_k < 0:
        raise _invalid("sampling.top_k", f"top_k must be >= 0 (0 disables it), got {s.top_k}")
    if len(s.stop) > limits.max_stop_sequences:
        raise _invalid("sampling.stop",
                       f"stop must hold at most {limits.max_stop_sequences} sequences, "
                       f"got {len(s.stop)}")
    if any(not x for x in s.stop):
        raise _invalid("sampling.stop", "stop sequences must be non-empty")
    longest = max((len(x.encode("utf-8")) for x in s.stop), default=0)
    if longest > limits.max_stop_sequence_bytes:
        raise _invalid("sampling.stop", f"stop sequences must be at most "
                                        f"{limits.max_stop_sequence_bytes} bytes each, got {longest}")
    if len(s.stop_token_ids) > limits.max_stop_token_ids:
        raise _invalid("sampling.stop_token_ids",
                       f"stop_token_ids must hold at most {limits.max_stop_token_ids} ids, "
                       f"got {len(s.stop_token_ids)}")
    negative = next((t for t in s.stop_token_ids if t < 0), None)
    if negative is not None:
        raise _invalid("sampling.stop_token_ids", f"stop_token_ids must be >= 0, got {negative}")


# --- sessions sent to a node (ImportSession, ReplicateHistory, checkpoint restore) ------------

# KV moves in chunks of this size range (the last chunk of a stream may be shorter), so a
# stream's chunk count follows from its byte count.
KV_CHUNK_MIN_BYTES = 4096
KV_CHUNK_MAX_BYTES = 16 << 20

# Bytes per element of the KV cache dtypes a node runs, by torch dtype name (no torch here).
_KV_ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float8_e4m3fn": 1}
# Quantized caches (node/kv/quantization.py) carry a float32 scale behind each row of values.
_KV_SCALE_ELEMENTS = {"int8": 4, "float8_e4m3fn": 4}


@dataclass(frozen=True)
class SessionLayout:
    """What a session sent to this node must fit: the model (fingerprint, vocabulary,
    context length) and the geometry and dtype of its KV cache."""

    model_fingerprint: str
    vocab_size: int
    max_tokens: int  # the context length: a longer history can never be continued
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str  # torch dtype name, e.g. "float32"

    def kv_shape(self, kv_tokens: int) -> list[int]:
        """[num_layers, 2, kv_tokens, num_kv_heads, head_dim], the transfer layout (a quantized
        cache's rows are head_dim values and their 4-byte scale)."""
        row = self.head_dim + _KV_SCALE_ELEMENTS.get(self.kv_dtype, 0)
        return [self.num_layers, 2, kv_tokens, self.num_kv_heads, row]

    def kv_bytes(self, kv_tokens: int) -> int:
        return math.prod(self.kv_shape(kv_tokens)) * _KV_ELEMENT_BYTES.get(self.kv_dtype, 4)


def validate_history(token_ids: Sequence[int], turns: int, tenant: str,
                     layout: SessionLayout) -> None:
    """Check a session's history before a node stores it: no longer than the context, every
    id in the vocabulary (one bad id would fail every engine step its session joins), turns
    >= 0 and the tenant within Generate's limit."""
    if len(token_ids) > layout.max_tokens:
        raise _invalid("token_ids", f"token_ids must hold at most {layout.max_tokens} ids "
                                    f"(the model's context), got {len(token_ids)}")
    if token_ids:
        lo, hi = min(token_ids), max(token_ids)
        if lo < 0 or hi >= layout.vocab_size:
            raise _invalid("token_ids", f"token_ids must be in [0, {layout.vocab_size - 1}], "
                                        f"got {lo if lo < 0 else hi}")
    if turns < 0:
        raise _invalid("turns", f"turns must be >= 0, got {turns}")
    validate_tenant(tenant)


# A turn record's text (node/turn_ledger.py) decodes its token ids: a few bytes each, far
# fewer than this. A session's chat messages are bounded the same way by its history.
LAST_TEXT_MAX_BYTES_PER_TOKEN = 256

# A record's other strings (a node id, a failed turn's error): a node keeps up to 100k records.
LAST_STRING_MAX_BYTES = 1024


def validate_history_messages(contents: Sequence[str], num_tokens: int) -> None:
    """Check the chat messages a session's history was rendered from (a peer's replica or
    moved session): every message renders to a token of the history at least, and its text
    to at most LAST_TEXT_MAX_BYTES_PER_TOKEN bytes a token, so neither their count nor their
    bytes may pass the history's (before, a peer could store a million messages with a
    three-token history, 54 MB in one checkpoint file)."""
    if len(contents) > num_tokens:
        raise _invalid("messages", f"messages must hold at most as many messages as the history has tokens "
                                   f"({num_tokens}), got {len(contents)}")
    limit = LAST_TEXT_MAX_BYTES_PER_TOKEN * num_tokens
    size = sum(len(c.encode("utf-8", "surrogatepass")) for c in contents)
    if size > limit:
        raise _invalid("messages", f"messages must hold at most {limit} bytes of content "
                                   f"({LAST_TEXT_MAX_BYTES_PER_TOKEN} a history token), got {size}")


def validate_last_turn(message: Any) -> None:
    """Check the record of the turn that made a session's history (``last_result`` and
    ``last_digest`` of an ImportSession header or a ReplicateHistoryRequest), when it carries
    one: the record answers retries of that turn from here on, so it must describe a turn of
    this session that fits in its history."""
    if not message.HasField("last_result"):
        return
    result, history = message.last_result, len(message.token_ids)
    if len(message.last_digest) != 32:
        raise _invalid("last_digest", f"last_digest must be 32 bytes (a sha256), "
                                      f"got {len(message.last_digest)}")
    rid = len(result.request_id.encode("utf-8"))
    if not 1 <= rid <= REQUEST_ID_MAX_BYTES:
        raise _invalid("last_result.request_id", f"last_result.request_id must be 1 to "
                                                 f"{REQUEST_ID_MAX_BYTES} bytes, got {rid}")
    if len(result.token_ids) > history:
        raise _invalid("last_result.token_ids", f"last_result.token_ids must hold at most "
                                                f"{history} ids (the history's), got "
                                                f"{len(result.token_ids)}")
    if message.turns < 1:
        raise _invalid("turns", f"turns must be >= 1 with a last_result, got {message.turns}")
    text = len(result.text.encode("utf-8"))
    most = LAST_TEXT_MAX_BYTES_PER_TOKEN * len(result.token_ids)
    if text > most:
        raise _invalid("last_result.text", f"last_result.text must be at most {most} bytes "
                                           f"({LAST_TEXT_MAX_BYTES_PER_TOKEN} per token id), got {text}")
    for name in ("session_id", "node_id", "error"):
        size = len(getattr(result, name).encode("utf-8"))
        if size > LAST_STRING_MAX_BYTES:
            raise _invalid(f"last_result.{name}", f"last_result.{name} must be at most "
                                                  f"{LAST_STRING_MAX_BYTES} bytes, got {size}")
    usage = result.usage
    if not 0 <= usage.cached_tokens <= usage.prompt_tokens:
        raise _invalid("last_result.usage.cached_tokens",
                       f"last_result.usage.cached_tokens must be in [0, {usage.prompt_tokens}] "
                       f"(its prompt_tokens), got {usage.cached_tokens}")


def validate_session_header(header: Any, layout: SessionLayout) -> int:
    """Check an ImportSession header against this node's model before any KV is read or a
    block allocated; return the KV bytes the rest of the stream must carry exactly."""
    validate_tenant_key(header.session_id, header.tenant)
    validate_history(header.token_ids, header.turns, header.tenant, layout)
    validate_history_messages([m.content for m in header.messages], len(header.token_ids))
    if header.model_fingerprint != layout.model_fingerprint:
        raise RequestRejected(
            grpc.StatusCode.FAILED_PRECONDITION, "model_fingerprint",
            f"model_fingerprint must be {layout.model_fingerprint!r} (this node's model), "
            f"got {header.model_fingerprint!r}")
    size = _header_kv_bytes(header, layout)
    validate_last_turn(header)
    return size


def _header_kv_bytes(header: Any, layout: SessionLayout) -> int:
    """The KV bytes an ImportSession header declares, checked against this node's cache."""
    kv_tokens, history = header.kv_tokens, len(header.token_ids)
    if kv_tokens == 0:
        if header.num_chunks:
            raise _invalid("num_chunks", f"num_chunks must be 0 without KV (kv_tokens 0), "
                                         f"got {header.num_chunks}")
        return 0
    bs = layout.block_size
    if kv_tokens < 0 or kv_tokens % bs or kv_tokens > history:
        raise _invalid("kv_tokens", f"kv_tokens must be a multiple of {bs} in [0, {history}] "
                                    f"(whole blocks of the history), got {kv_tokens}")
    if header.kv_dtype != layout.kv_dtype:
        raise _invalid("kv_dtype", f"kv_dtype must be {layout.kv_dtype!r} (this node's KV "
                                   f"cache), got {header.kv_dtype!r}")
    if list(header.kv_shape) != layout.kv_shape(kv_tokens):
        raise _invalid("kv_shape", f"kv_shape must be {layout.kv_shape(kv_tokens)} for "
                                   f"{kv_tokens} tokens, got {list(header.kv_shape)}")
    size = layout.kv_bytes(kv_tokens)
    most = -(-size // KV_CHUNK_MIN_BYTES)
    if not 1 <= header.num_chunks <= most:
        raise _invalid("num_chunks", f"num_chunks must be in [1, {most}] for {size} KV bytes "
                                     f"in chunks of >= {KV_CHUNK_MIN_BYTES}, got {header.num_chunks}")
    return size


def validate_chunk_bytes(chunk_bytes: int) -> int:
    """Check ExportSession's chunk_bytes: 0 (the default) or a size importers accept."""
    if chunk_bytes and not KV_CHUNK_MIN_BYTES <= chunk_bytes <= KV_CHUNK_MAX_BYTES:
        raise _invalid("chunk_bytes", f"chunk_bytes must be 0 (default) or in "
                                      f"[{KV_CHUNK_MIN_BYTES}, {KV_CHUNK_MAX_BYTES}], got {chunk_bytes}")
    return chunk_bytes


def validate_batch(request: pb.BatchRequest, limits: Limits) -> int:
    """Check the batch envelope (not its items); return the concurrency to run it with."""
    n = len(request.requests)
    if n > limits.max_batch_size:
        raise RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, "requests",
                              f"requests must hold at most {limits.max_batch_size} items, got {n}; "
                              "split the batch")
    if request.concurrency < 0 or request.concurrency > limits.max_batch_concurrency:
        raise _invalid("concurrency", f"concurrency must be in [0, {limits.max_batch_concurrency}]"
                                      f" (0 = default), got {request.concurrency}")
    return request.concurrency or min(8, limits.max_batch_concurrency)


def validate_max_age(max_age_s: float) -> float:
    """Check CleanupSessions' max_age_s."""
    if not math.isfinite(max_age_s) or max_age_s < 0:
        raise _invalid("max_age_s", f"max_age_s must be a finite number >= 0, got {max_age_s}")
    return max_age_s


def rejection_from_error(exc: Exception) -> RequestRejected:
    """Map an engine error (or a ValueError from building params) to a rejection."""
    if isinstance(exc, RequestRejected):
        return exc
    if isinstance(exc, PromptTooLongError):
        return RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.field,
                               f"{exc}; retry with a shorter prompt")
    if isinstance(exc, InvalidRequestError):
        return _invalid(exc.field, str(exc))
    if isinstance(exc, QueueFullError):
        return RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, "", str(exc),
                               retry_after_s=exc.retry_after_s)
    if isinstance(exc, CapacityError):
        return RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.field, str(exc))
    if isinstance(exc, SessionNotFoundError):
        return RequestRejected(grpc.StatusCode.NOT_FOUND, "session_id", str(exc))
    if isinstance(exc, SessionSupersededError):
        return RequestRejected(SUPERSEDED_CODE, "session_id", str(exc))
    if isinstance(exc, SessionFencedError):
        return RequestRejected(grpc.StatusCode.UNAVAILABLE, "session_id", str(exc),
                               retry_after_s=1.0)
    if isinstance(exc, SessionBusyError):
        return RequestRejected(grpc.StatusCode.RESOURCE_EXHAUSTED, "session_id", str(exc),
                               retry_after_s=exc.retry_after_s)
    if isinstance(exc, ValueError):
        return _invalid(_field_named_in(str(exc)), str(exc))
    return RequestRejected(grpc.StatusCode.INTERNAL, "", f"{type(exc).__name__}: {exc}")


def rejection_for_client(exc: Exception, session_key: str | None) -> RequestRejected:
    """:func:`rejection_from_error`, naming the session by the client's own id where the
    message names it by its key (cluster/session_keys.py): the edge's answer to a client."""
    rejection = rejection_from_error(exc)
    if not session_key or session_key not in rejection.message:
        return rejection
    return RequestRejected(rejection.code, rejection.field,
                           rejection.message.replace(session_key, client_session_id(session_key)),
                           rejection.retry_after_s)


def _field_named_in(message: str) -> str:
    # Contract errors start with the field name: "max_tokens must be >= 1, got 0".
    head = message.split(" ", 1)[0]
    return head if head.isidentifier() else ""


# --- invalid UTF-8 --------------------------------------------------------------------------


@dataclass(frozen=True)
class Malformed:
    """A request that did not parse. ``field`` is the dotted path of a string field holding
    invalid UTF-8 (empty when the bytes are not a message at all); ``request_id`` is the
    request's id when it could still be read, so a stream can answer the right request."""

    field: str
    request_id: str

    def rejection(self) -> RequestRejected:
        if self.field:
            return _invalid(self.field, f"{self.field.rsplit('.', 1)[-1]} must be valid UTF-8")
        return _invalid("", "request is not a valid protobuf message")


@dataclass(frozen=True)
class Refused:
    """A stream request the edge refused before the servicer saw it (a rate limit, a
    tenant quota): answered on the stream like a :class:`Malformed` one."""

    request_id: str
    reason: RequestRejected

    def rejection(self) -> RequestRejected:
        return self.reason


MAX_TIMEOUT_MS = 2**32 - 1  # GenerateRequest.timeout_ms is a uint32


def request_deadline(request: pb.GenerateRequest, deadline: float | None) -> float | None:
    """The monotonic instant a request must end by: ``deadline`` (its call's, if any), or
    sooner when its own ``timeout_ms`` says so (the only deadline of a request on a
    GenerateMany stream)."""
    if not request.timeout_ms:
        return deadline
    own = time.monotonic() + request.timeout_ms / 1000.0
    return own if deadline is None else min(deadline, own)


def timeout_ms_left(own_ms: int, deadline: float) -> int:
    """``timeout_ms`` for a request sent now that must end by ``deadline``: the time left,
    within what the request asked for itself (``own_ms``; 0 = nothing), at least 1 and at
    most what the uint32 holds (about 49.7 days: a caller's deadline may lie further away,
    and filling the field past its range raises)."""
    left = min(max(1, math.ceil(1000 * (deadline - time.monotonic()))), MAX_TIMEOUT_MS)
    return min(own_ms, left) if own_ms else left


@dataclass(frozen=True)
class Admitting:
    """A stream request the edge admitted but whose tenant slot is still to be taken:
    ``admit()`` waits for it (or raises the refusal), inside the request's own task, so a
    request queued for a slot holds up neither the stream's later messages (its cancels)
    nor its other requests' answers."""

    message: Any
    admit: Callable[[], Awaitable[None]]


def tolerant_deserializer(message_cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    """A grpc request deserializer that returns :class:`Malformed` instead of raising."""

    def deserialize(data: bytes) -> Message | Malformed:
        try:
            return message_cls.FromString(data)
        except DecodeError:
            fields = dict(_string_fields(message_cls.DESCRIPTOR, data, ""))
            bad = next((path for path, raw in fields.items() if not _is_utf8(raw)), "")
            # On a stream the request sits under GenerateStreamRequest.generate; name the
            # field as validate_generate does.
            bad = bad.removeprefix("generate.")
            rid = fields.get("request_id") or fields.get("generate.request_id") or b""
            if not rid:
                rid = fields.get("cancel.request_id") or b""
            return Malformed(field=bad, request_id=rid.decode("utf-8", "replace"))

    return deserialize


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _string_fields(desc: _descriptor.Descriptor, data: bytes,
                   prefix: str) -> Iterator[tuple[str, bytes]]:
    """Walk the wire format; yield (dotted path, raw bytes) of every string field."""
    pos, end = 0, len(data)
    try:
        while pos < end:
            key, pos = _varint(data, pos)
            number, wire_type = key >> 3, key & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                size, pos = _varint(data, pos)
                raw = data[pos:pos + size]
                pos += size
                field = desc.fields_by_number.get(number)
                if field is None:
                    continue
                path = prefix + field.name
                if field.type == _descriptor.FieldDescriptor.TYPE_STRING:
                    yield path, raw
                elif field.type == _descriptor.FieldDescriptor.TYPE_MESSAGE:
                    yield from _string_fields(field.message_type, raw, path + ".")
            else:
                return  # groups are not used in proto3; stop at anything unexpected
    except IndexError:
        return


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
