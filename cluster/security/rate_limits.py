"""Token-bucket rate limits (per key and per client IP, requests/s and tokens/s) and tenant
quotas on requests in flight and waiting. Pure logic over an injectable clock."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_BUCKETS = 100_000  # idle buckets beyond this are forgotten (they would be full anyway)


class RateLimited(Exception):
    """Over a limit; ``retry_after_s`` says when the same request would pass."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass
class Bucket:
    tokens: float
    stamp: float


class TokenBuckets:
    """One token bucket per name: ``rate`` per second, holding at most ``burst``.

    ``rate`` 0 disables the limit. A request costing more than ``burst`` is allowed when the
    bucket is full (it would never pass otherwise) and leaves the bucket in debt.
    """

    def __init__(self, rate: float, burst: float, what: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0 or burst < 0:
            raise ValueError(f"{what}: rate and burst must be >= 0, got {rate} and {burst}")
        self.rate = rate
        self.burst = burst or rate
        self.what = what
        self.clock = clock
        self._buckets: OrderedDict[str, Bucket] = OrderedDict()

    @property
    def active(self) -> bool:
        return self.rate > 0

    def take(self, name: str, cost: float = 1.0) -> None:
        """Take ``cost`` from ``name``'s bucket or raise RateLimited (taking nothing)."""
        if not self.active or cost <= 0:
            return
        now = self.clock()
        bucket = self._buckets.pop(name, None) or Bucket(self.burst, now)
        self._buckets[name] = bucket  # most recently used last
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= min(cost, self.burst):
            bucket.tokens -= cost
        else:
            need = min(cost, self.burst) - bucket.tokens
            raise RateLimited(f"{self.what} exceeded ({self.rate:g}/s)", need / self.rate)
        while len(self._buckets) > MAX_BUCKETS:
            self._buckets.popitem(last=False)


class TenantSlots:
    """Requests in flight per tenant (at most ``max_running``) and waiting for a slot (at
    most ``max_queued``); beyond both, RateLimited. ``max_running`` 0 = unlimited."""

    def __init__(self, max_running: int = 0, max_queued: int = 0,
                 retry_after_s: float = 0.25) -> None:
        if max_running < 0 or max_queued < 0:
            raise ValueError("tenant_max_running and tenant_max_queued must be >= 0")
        self.max_running = max_running
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s
        self._running: dict[str, int] = {}
        self._queued: dict[str, int] = {}
        self._freed: dict[str, asyncio.Condition] = {}

    def running(self, tenant: str) -> int:
        return self._running.get(tenant, 0)

    async def acquire(self, tenant: str) -> None:
        if not self.max_running:
            return
        if self._running.get(tenant, 0) >= self.max_running:
            if self._queued.get(tenant, 0) >= self.max_queued:
                raise RateLimited(
                    f"tenant {tenant!r} has {self.max_running} requests running and "
                    f"{self.max_queued} waiting, the most it may", self.retry_after_s)
            self._queued[tenant] = self._queued.get(tenant, 0) + 1
            freed = self._freed.setdefault(tenant, asyncio.Condition())
            try:
                async with freed:
                    await freed.wait_for(lambda: self._running.get(tenant, 0) < self.max_running)
            finally:
                self._queued[tenant] -= 1
        self._running[tenant] = self._running.get(tenant, 0) + 1

    def release(self, tenant: str) -> None:
        if not self.max_running:
            return
        left = self._running.get(tenant, 0) - 1
        if left > 0:
            self._running[tenant] = left
        else:
            self._running.pop(tenant, None)
        freed = self._freed.get(tenant)
        if freed is not None:
            asyncio.get_running_loop().create_task(_notify(freed))


async def _notify(condition: asyncio.Condition) -> None:
    async with condition:
        condition.notify()
