"""A session as one unit: what migration, replication and checkpoints carry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class SessionState:
    """A session as one unit, for migration, replication and checkpoints.

    ``kv`` holds the keys/values of the first ``kv_tokens`` tokens of the history (whole
    blocks only), laid out [num_layers, 2, kv_tokens, num_kv_heads, head_dim] on CPU; it may be
    None (history only), in which case the importer recomputes the KV on the next turn.
    ``model_fingerprint`` guards against importing KV computed by another model; ``tenant``
    is the salt of the session's block hashes. ``messages``: the chat conversation so far as
    (role, content) pairs, for a session whose turns were chat messages (a new turn renders
    it again to find what to prefill), else empty.
    """

    session_id: str
    token_ids: list[int]
    turns: int
    model_fingerprint: str
    kv_tokens: int = 0
    kv: torch.Tensor | None = None
    tenant: str = ""
    messages: list[tuple[str, str]] = field(default_factory=list)
