"""Who a request comes from: the tenant and role of its API key.

The edge sets the principal of each call (a context variable, so it follows the call into
the tasks its handler starts); the client-facing servicer reads it to stamp the tenant on
requests and to decide what an admin alone may see.
"""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass


class Role(enum.Enum):
    """``admin`` may also clear caches, clean up sessions, see and delete other tenants'
    sessions and read detailed stats."""

    USER = "user"
    ADMIN = "admin"

    @classmethod
    def parse(cls, value: str) -> Role:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"role must be one of {[r.value for r in cls]}, got {value!r}") from None


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. ``key_id`` is empty for the open (no keys file) edge."""

    tenant: str
    role: Role
    key_id: str = ""

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


# No keys file: one anonymous tenant that may do everything (loopback development).
OPEN = Principal(tenant="", role=Role.ADMIN)

_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "ultrakv_principal", default=None)


def current_principal() -> Principal | None:
    """The principal the edge authenticated for this call, if any."""
    return _current.get()


def set_principal(principal: Principal) -> contextvars.Token:
    return _current.set(principal)


def reset_principal(token: contextvars.Token) -> None:
    _current.reset(token)
