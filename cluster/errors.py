"""Engine errors. Each names the field and the limit; servers map them to gRPC status codes."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """A request field is out of range (gRPC INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the model's context or the size limit (RESOURCE_EXHAUSTED)."""


class QueueFullError(EngineError):
    """The admission queue is full (RESOURCE_EXHAUSTED, retry later)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TenantQuotaError(QueueFullError):
    """A tenant holds as many sessions or history tokens on this node as its quota allows
    (RESOURCE_EXHAUSTED, retry after deleting or letting sessions expire)."""


class SessionNotFoundError(EngineError, KeyError):
    """A session operation names a session the node does not hold (NOT_FOUND)."""

    def __init__(self, session_id: str):
        super().__init__(f"session_id {session_id!r} not found")
        self.session_id = session_id

    def __str__(self) -> str:  # KeyError would quote the message again
        return self.args[0]


class SessionBusyError(EngineError):
    """A turn was sent for a session whose previous turn is still running (gRPC
    RESOURCE_EXHAUSTED on ``session_id`` with a retry hint: HTTP 429 with ``retry-after``)."""

    retry_after_s = 1.0

    def __init__(self, session_id: str):
        super().__init__(f"session_id {session_id!r} already has a turn in progress; send turns one at a time")
        self.session_id = session_id


class IncompatibleSessionError(EngineError):
    """An imported session was computed by another model (gRPC FAILED_PRECONDITION)."""


class CapacityError(EngineError):
    """A node-wide cap (sessions, replicas) is reached and nothing can make room
    (gRPC RESOURCE_EXHAUSTED)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class SessionFencedError(EngineError):
    """This node lost its cluster lease while it held the session: the cluster may have
    handed the session to another node meanwhile, so its copy here takes no turn until a
    coordinator's re-sharding settles it (gRPC UNAVAILABLE on ``session_id``: retry)."""

    def __init__(self, session_id: str, node: str = "this node"):
        super().__init__(f"session_id {session_id!r}: {node} lost its cluster lease while it "
                         "held the session, and its copy takes no turn until re-sharding has "
                         "settled it; retry shortly")
        self.session_id = session_id


class SessionSupersededError(EngineError):
    """This node's copy of a session is no longer the session: a ring successor took it over
    (this node was taken off the ring, and the session moved on without it). A turn taken on
    the stale copy is not acknowledged (gRPC ABORTED on field ``session_id``: the coordinator
    takes the node off its ring and resumes the request on the session's owner)."""

    def __init__(self, session_id: str, detail: str):
        super().__init__(f"session_id {session_id!r} is owned by another node now ({detail}); "
                         "this node's turn on its stale copy is not kept")
        self.session_id = session_id
