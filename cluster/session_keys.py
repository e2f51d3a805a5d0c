"""Session keys: a tenant's session id as the cluster names it inside.

Session ids are the clients' own, so two tenants may well pick the same one. The
client-facing edge (cluster/service.py, cluster/openai_api.py), where the tenant is known
from the caller's key, turns each id into a key of that tenant's: ``<tenant>~<session id>``.
Everything behind the edge (the ring, nodes, replication, checkpoints, migration, the turn
ledger) sees the key alone, so another tenant's equal id is another session, one it can
neither probe nor take. Answers name the client's id again.

The key cannot alias: ``~`` is in neither a tenant name nor a session id, so the key splits
at its only ``~``, and no client's id is ever a key of another tenant. Without a tenant (no
keys file: one open tenant) the key is the id itself, so single-tenant deployments and their
checkpoints keep their ids.
"""

from __future__ import annotations

SEPARATOR = "~"


def session_key(tenant: str, session_id: str) -> str:
    """The key tenant ``tenant``'s session ``session_id`` has inside the cluster."""
    return f"{tenant}{SEPARATOR}{session_id}" if tenant else session_id


def split_session_key(key: str) -> tuple[str, str]:
    """``(tenant, session id)`` of a key ("" as the tenant of an open one)."""
    tenant, separator, session_id = key.partition(SEPARATOR)
    return (tenant, session_id) if separator else ("", key)


def client_session_id(key: str) -> str:
    """The id the session's tenant named it by."""
    return split_session_key(key)[1]
