"""A session as one unit: what migration, replication and checkpoints carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from ultrakv.v1 import types_pb2 as pb


@dataclass(frozen=True)
class LastTurn:
    """The record of the turn that made a session's history (node/turn_ledger.py): its result
    and the digest of its prompt and sampling. It travels with the history, so whichever node
    holds the history answers a retry of that turn from it instead of taking the turn again."""

    result: pb.GenerateResult
    digest: bytes


@dataclass
class SessionState:
    """A session as one unit, for migration, replication and checkpoints.

    ``kv`` holds the keys/values of the first ``kv_tokens`` tokens of the history (whole
    blocks only), laid out [num_layers, 2, kv_tokens, num_kv_heads, head_dim] on CPU; it may be
    None (history only), in which case the importer recomputes the KV on the next turn.
    ``model_fingerprint`` guards against importing KV computed by another model; ``tenant``
    is the salt of the session's block hashes. ``messages``: the chat conversation so far as
    (role, content) pairs, for a session whose turns were chat messages (a new turn renders
    it again to find what to prefill), else empty. ``last_turn``: the record of the turn
    that made this history (``turns`` turns), when its holder had it.
    """

    session_id: str
    token_ids: list[int]
    turns: int
    model_fingerprint: str
    kv_tokens: int = 0
    kv: torch.Tensor | None = None
    tenant: str = ""
    messages: list[tuple[str, str]] = field(default_factory=list)
    last_turn: LastTurn | None = None
