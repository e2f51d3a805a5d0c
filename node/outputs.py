"""What goes into and comes out of the engine: typed requests, streamed deltas, final outputs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from ultrakv.node.chat import ChatMessage
from ultrakv.node.sampling_params import Priority, SamplingParams


@dataclass(frozen=True)
class RequestKey:
    """What names a running request on a node: its tenant and its request id.

    Request ids are the clients' own, so two tenants may choose the same one; every table of
    running requests (the engine's, an engine core's proxy, data parallelism's, the server's
    turn attempts) is keyed by both, so no tenant can see (as a refusal), block or abort
    another's request by naming its id. A pair, not a joined string: no tenant name can
    alias another's ids."""

    tenant: str
    request_id: str


# Text, token ids, or a chat conversation (ChatMessage objects or {"role", "content"} dicts).
Prompt = str | list[int] | list[ChatMessage] | list[dict[str, str]]


@dataclass
class GenerateRequest:
    """One generation request.

    ``prompt`` is text, token ids or chat messages (rendered with the model's chat template,
    ending by opening the assistant's turn). With a ``session_id`` it is the *new* part of
    the conversation: the engine appends it to the session's history and generates from there;
    for messages, only the new messages (the session remembers the conversation). With
    ``full_context`` the prompt is instead the whole conversation (as OpenAI clients send it):
    the session's history only supplies the cached prefix, and the turn leaves the session
    holding prompt + output.
    ``tenant`` salts prefix hashes so tenants never share cached blocks.
    ``deadline`` is a ``time.monotonic()`` instant after which the request is aborted.
    ``resume_token_ids``: tokens this request already generated elsewhere (a stream resumed on
    another node); the prompt continues with them exactly, as token ids.
    """

    prompt: Prompt
    sampling: SamplingParams = field(default_factory=SamplingParams)
    session_id: str | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    priority: Priority = Priority.NORMAL
    tenant: str = ""
    deadline: float | None = None
    full_context: bool = False
    resume_token_ids: list[int] = field(default_factory=list)

    @property
    def key(self) -> RequestKey:
        """The request's name among those running (see :class:`RequestKey`)."""
        return RequestKey(self.tenant, self.request_id)


@dataclass
class RequestOutput:
    """The finished result of one request."""

    request_id: str
    session_id: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    cached_tokens: int
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    ttft_s: float
    latency_s: float
    error: str | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(frozen=True)
class PreparedTurn:
    """What a session turn would run on the node holding the session, for another node to
    run it there instead: the whole prompt's token ids (history + the request's prompt) and
    the session's turn version (0: no session yet), whether a turn runs on it now, and
    whether a request arriving now would wait for admission (a full batch, a queue), and
    how many the batch admits at once now."""

    token_ids: list[int]
    turns: int
    busy: bool
    would_wait: bool
    free_slots: int


@dataclass
class StreamDelta:
    """New tokens of one request since the last delta; the last one carries ``output``, or
    ``error`` when the request never ran (refused by an engine core process, or the core is
    gone: node/engine_client.py); the in-process engine raises such errors instead."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    output: RequestOutput | None = None
    error: Exception | None = None


@dataclass
class SessionInfo:
    """Per-session figures."""

    session_id: str
    num_tokens: int
    num_cached_blocks: int
    turns: int
    created_at: float
    last_used_at: float
    replica: bool = False  # held for the session's owner, not served from here yet
