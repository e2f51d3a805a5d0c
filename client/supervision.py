"""When to restart a crashed child process: backoff and a restart budget (pure logic).

The local supervisor (``local_cluster.py``) asks :class:`RestartBudget` each time a child
exits on its own: the answer is how long to wait before starting it again, or None when the
child crashed too often within the window and the supervisor gives up on it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    """Waits grow from ``initial_backoff_s`` doubling to ``max_backoff_s``; at most
    ``max_restarts`` restarts within any ``window_s`` seconds."""

    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(f"initial_backoff_s must be in (0, max_backoff_s={self.max_backoff_s}], "
                             f"got {self.initial_backoff_s}")
        if self.max_restarts < 1:
            raise ValueError(f"max_restarts must be >= 1, got {self.max_restarts}")
        if not self.window_s > 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s}")


@dataclass
class RestartBudget:
    """One child's recent restarts under ``policy``."""

    policy: RestartPolicy
    restarts: deque[float] = field(default_factory=deque)

    def next_delay(self, now: float) -> float | None:
        """Record a crash at ``now``: seconds to wait before the restart, or None when the
        budget is spent. Crashes older than the window no longer count, so a child that
        ran well for a while starts again from the shortest wait."""
        while self.restarts and self.restarts[0] <= now - self.policy.window_s:
            self.restarts.popleft()
        if len(self.restarts) >= self.policy.max_restarts:
            return None
        delay = min(self.policy.max_backoff_s,
                    self.policy.initial_backoff_s * 2 ** len(self.restarts))
        self.restarts.append(now)
        return delay

    @property
    def used(self) -> int:
        """Restarts within the current window."""
        return len(self.restarts)
