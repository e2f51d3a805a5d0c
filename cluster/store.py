"""A thin asyncio layer over ``aetcd``: keys under one prefix, leases, watches, transactions.

Every key the rest of ultrakv names is relative to the prefix (default ``/ultrakv/``), so
``store.put("nodes/n1", ...)`` writes ``/ultrakv/nodes/n1``. Connection failures surface as
``EtcdUnavailableError`` naming the endpoint; callers decide whether to retry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import aetcd

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/ultrakv/"
DEFAULT_ENDPOINT = "127.0.0.1:2379"

# gRPC's default reconnect backoff grows to two minutes; after an etcd restart we want the
# channel back within a second.
_CHANNEL_OPTIONS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 1000,
}


class EtcdUnavailableError(ConnectionError):
    """etcd cannot be reached (down, wrong address, timed out)."""

    def __init__(self, endpoint: str, detail: str):
        super().__init__(f"cannot reach etcd at {endpoint}: {detail}")
        self.endpoint = endpoint


class StoreError(RuntimeError):
    """etcd answered with an error other than unavailability."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``"host:port"`` (optionally with ``http://``) -> ``(host, port)``."""
    raw = endpoint.removeprefix("http://").rstrip("/")
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(
            f"etcd endpoint must be HOST:PORT with PORT in [1, 65535], got {endpoint!r}"
        )
    return host, int(port)


@dataclass(frozen=True)
class KeyValue:
    """One stored key; ``key`` is relative to the store prefix."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    """A change under a watched prefix; ``value`` is empty for deletes."""

    kind: Literal["put", "delete"]
    key: str
    value: bytes
    revision: int


@dataclass(frozen=True)
class Lease:
    """A granted lease: its id and the TTL etcd granted (may exceed the one asked for)."""

    id: int
    ttl_s: int


@dataclass(frozen=True)
class Compare:
    """A transaction guard on one key.

    ``target``: ``version`` (0 = absent), ``create`` / ``mod`` (revisions) or ``value``.
    """

    key: str
    target: Literal["version", "create", "mod", "value"]
    op: Literal["==", "!=", "<", ">"]
    operand: int | bytes


@dataclass(frozen=True)
class Put:
    """A transaction operation writing ``value`` at ``key``, optionally bound to a lease."""

    key: str
    value: bytes
    lease: int | None = None


@dataclass(frozen=True)
class Delete:
    """A transaction operation deleting ``key`` (or every key under it with ``prefix``)."""

    key: str
    prefix: bool = False


def key_absent(key: str) -> Compare:
    """Guard: ``key`` does not exist."""
    return Compare(key, "version", "==", 0)


class EtcdStore:
    """Keys, leases, watches and transactions under one prefix of one etcd endpoint."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 5.0,
    ):
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"prefix must start and end with '/', got {prefix!r}")
        self.endpoint = endpoint
        self.prefix = prefix
        self.timeout_s = timeout_s
        host, port = parse_endpoint(endpoint)
        self._client = aetcd.Client(host, port, timeout=timeout_s, options=_CHANNEL_OPTIONS)

    # -- plumbing ---------------------------------------------------------------------------

    def _full(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _rel(self, full: bytes) -> str:
        return full.decode().removeprefix(self.prefix)

    async def _call(self, coro: Awaitable):
        try:
            return await coro
        except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError) as e:
            raise EtcdUnavailableError(self.endpoint, str(e) or type(e).__name__) from e
        except aetcd.ClientError as e:
            raise StoreError(f"etcd at {self.endpoint} refused the request: {e}") from e

    def _kv(self, kv) -> KeyValue:
        return KeyValue(self._rel(kv.key), kv.value, kv.create_revision, kv.mod_revision, kv.lease)

    async def connect(self, wait_s: float = 0.0) -> None:
        """Check that etcd answers, trying again for up to ``wait_s`` seconds (a process
        starting on a loaded machine can see its first connection attempts fail); raises
        ``EtcdUnavailableError`` naming the endpoint."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            try:
                await self._call(self._client.status())
                return
            except EtcdUnavailableError as exc:
                if loop.time() >= deadline:
                    raise
                log.info("waiting for etcd (%s)", exc)
                await asyncio.sleep(min(0.5, max(0.0, deadline - loop.time())))

    async def db_size(self) -> tuple[int, int]:
        """The answering member's database size and the part of it holding live data (bytes):
        the first never shrinks without a defrag, the second falls after a compaction."""
        from aetcd.rpc import rpc_pb2

        await self._call(self._client.status())  # connects the maintenance stub
        resp = await self._call(self._client.maintenancestub.Status(
            rpc_pb2.StatusRequest(), timeout=self.timeout_s))
        return resp.dbSize, resp.dbSizeInUse

    async def close(self) -> None:
        """Close the channel (watches end)."""
        await self._client.close()

    async def __aenter__(self) -> EtcdStore:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- keys -------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes | str, lease: int | None = None) -> int:
        """Write ``key``; returns the store revision of the write."""
        data = value.encode() if isinstance(value, str) else value
        resp = await self._call(self._client.put(self._full(key), data, lease=lease))
        return resp.header.revision

    async def get(self, key: str) -> KeyValue | None:
        """The value at ``key``, or None."""
        resp = await self._call(self._client.get(self._full(key)))
        return None if resp is None else self._kv(resp)

    async def delete(self, key: str) -> bool:
        """Delete ``key``; True when it existed."""
        return await self._call(self._client.delete(self._full(key))) is not None

    async def get_prefix(self, sub: str = "") -> tuple[list[KeyValue], int]:
        """Every key under ``prefix + sub`` (sorted by key) and the revision read at."""
        resp = await self._call(self._client.get_prefix(self._full(sub), sort_order="ascend"))
        return [self._kv(kv) for kv in resp], resp.header.revision

    async def current_revision(self) -> int:
        """The store revision now (read from the header of a range read of no key)."""
        resp = await self._call(self._client.get_prefix(self._full("\0"), keys_only=True))
        return resp.header.revision

    async def compact(self, revision: int) -> None:
        """Drop key history older than ``revision`` (etcd's compaction, whole store);
        ``StoreError`` when it is already compacted that far or ``revision`` is in the future."""
        await self._call(self._client.compact(revision))

    # -- leases -----------------------------------------------------------------------------

    async def grant_lease(self, ttl_s: int) -> Lease:
        """A new lease; keys bound to it vanish ``ttl_s`` after its last refresh."""
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1, got {ttl_s}")
        lease = await self._call(self._client.lease(ttl_s))
        return Lease(lease.id, lease.ttl)

    async def lease_remaining_s(self, lease_id: int) -> int:
        """Seconds the lease has left unless refreshed, read without refreshing it; -1 when
        it no longer exists."""
        reply = await self._call(self._client.get_lease_info(lease_id, keys=False))
        return int(reply.TTL)

    async def refresh_lease(self, lease_id: int) -> int:
        """Refresh once; returns the remaining TTL, 0 when the lease no longer exists."""
        reply = await self._call(self._client.refresh_lease(lease_id))
        return 0 if reply is None else int(reply.TTL)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke the lease, deleting every key bound to it."""
        await self._call(self._client.revoke_lease(lease_id))

    async def keep_alive(
        self,
        lease: Lease,
        on_lost: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Refresh ``lease`` every third of its TTL until cancelled.

        While etcd is unreachable it keeps trying (etcd does not age leases while it is
        down). When etcd answers that the lease is gone (expired or revoked), it awaits
        ``on_lost`` and returns.
        """
        interval = max(0.2, lease.ttl_s / 3.0)
        while True:
            try:
                remaining = await self.refresh_lease(lease.id)
            except EtcdUnavailableError as e:
                log.warning("lease %x keepalive: %s; retrying", lease.id, e)
                await asyncio.sleep(min(interval, 0.5))
                continue
            if remaining <= 0:
                log.warning("lease %x expired or was revoked", lease.id)
                if on_lost is not None:
                    await on_lost()
                return
            await asyncio.sleep(interval)

    # -- watches ----------------------------------------------------------------------------

    async def watch_prefix(
        self, sub: str = "", start_revision: int | None = None
    ) -> AsyncIterator[WatchEvent]:
        """Events under ``prefix + sub`` from ``start_revision`` (inclusive) on.

        Ends by raising ``EtcdUnavailableError`` when the stream breaks; the caller re-reads
        and watches again from the revision after what it saw.
        """
        watch = await self._call(
            self._client.watch_prefix(self._full(sub), start_revision=start_revision)
        )
        events = aiter(watch)
        try:
            while True:
                try:
                    ev = await self._call(anext(events))
                except StopAsyncIteration:
                    raise EtcdUnavailableError(self.endpoint, "watch stream ended") from None
                kind: Literal["put", "delete"] = "put" if ev.kind == "PUT" else "delete"
                yield WatchEvent(kind, self._rel(ev.kv.key), ev.kv.value, ev.kv.mod_revision)
        finally:
            try:
                await watch.cancel()
            except (aetcd.ClientError, asyncio.CancelledError):
                pass  # the stream is already gone

    # -- transactions -----------------------------------------------------------------------

    async def txn(
        self,
        compare: Sequence[Compare],
        success: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
    ) -> bool:
        """Apply ``success`` atomically if every guard holds, else ``failure``; True on success."""
        t = self._client.transactions
        targets = {"version": t.version, "create": t.create, "mod": t.mod, "value": t.value}
        guards = []
        for c in compare:
            g = targets[c.target](self._full(c.key))
            guards.append(
                {"==": g.__eq__, "!=": g.__ne__, "<": g.__lt__, ">": g.__gt__}[c.op](c.operand)
            )

        def ops(items: Sequence[Put | Delete]) -> list:
            out = []
            for op in items:
                if isinstance(op, Put):
                    out.append(t.put(self._full(op.key), op.value, lease=op.lease))
                else:
                    end = aetcd.utils.prefix_range_end(self._full(op.key)) if op.prefix else None
                    out.append(t.delete(self._full(op.key), range_end=end))
            return out

        succeeded, _ = await self._call(
            self._client.transaction(guards, ops(success), ops(failure))
        )
        return bool(succeeded)
