"""Coordinator settings that change live, stored in etcd under ``config/coordinator``.

The key holds a JSON object of overrides, e.g. ``{"load_eps": 0.5, "health_down_after": 5}``;
a setting it leaves out keeps the value the coordinator started with, so deleting the key
returns every coordinator to its start-up settings. Only settings the coordinator reads on
every use are here (routing's bounded-load eps, the health loop's cadence and thresholds,
retries, a forward's first-token and stall deadlines): changing them needs no restart and no drain.

Parsing and validation are pure (``parse_overrides``, ``apply_overrides``); the
``DynamicConfigWatcher`` reads the key at start, watches it, and hands each new valid config
to a callback. A bad document is logged and ignored: the last good config stays.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ultrakv.cluster.store import (
    Compare,
    EtcdStore,
    EtcdUnavailableError,
    Put,
    StoreError,
    key_absent,
)
from ultrakv.cluster.tasks import cancel_task
from ultrakv.coordinator.health import HealthPolicy

log = logging.getLogger(__name__)

CONFIG_KEY = "config/coordinator"  # relative to the store prefix

# (low, high, low inclusive) per setting; the health timeout's upper bound is the interval.
_FLOAT_RANGES: dict[str, tuple[float, float, bool]] = {
    "load_eps": (0.0, 10.0, False),
    "health_interval_s": (0.05, 60.0, True),
    "health_timeout_s": (0.0, 60.0, False),
    "failed_hold_s": (0.0, 600.0, True),
    "first_token_timeout_s": (0.0, 3600.0, False),
    "stall_timeout_s": (0.0, 3600.0, False),
}
_INT_RANGES: dict[str, tuple[int, int]] = {
    "health_down_after": (1, 100),
    "health_up_after": (1, 100),
    "max_attempts": (1, 16),
    "prefix_routing": (0, 1),
    "session_offload": (0, 1),
}


class ConfigError(ValueError):
    """A dynamic config document or value is invalid; the message names the field."""


@dataclass(frozen=True)
class DynamicConfig:
    """The live-changeable part of ``CoordinatorSettings``; validated when built."""

    load_eps: float = 0.25  # bounded loads for requests without a session
    health_interval_s: float = 1.0
    health_timeout_s: float = 1.0
    health_down_after: int = 3
    health_up_after: int = 2
    max_attempts: int = 4  # forwards per request (first try + retries/resumes)
    failed_hold_s: float = 3.0  # a node whose forward failed stays off the ring this long
    first_token_timeout_s: float = 60.0  # a forward's deadline for its first message
    stall_timeout_s: float = 20.0  # ... and between two messages
    # 1: requests without a session go to the node holding their longest cached prefix;
    # 0: to the hash of their first block (docs/prefix-routing.md)
    prefix_routing: int = 1
    # 1: a session turn whose owner is over its bound runs on the node holding its prefix
    # (docs/prefix-routing.md); 0: the owner runs every turn
    session_offload: int = 0

    def __post_init__(self) -> None:
        for name, (low, high, closed) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or not (
                (low <= value if closed else low < value) and value <= high
            ):
                raise ConfigError(
                    f"{name} must be in {'[' if closed else '('}{low:g}, {high:g}], got {value!r}"
                )
        for name, (low, high) in _INT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{name} must be an integer, got {value!r}")
            if not low <= value <= high:
                raise ConfigError(f"{name} must be in [{low}, {high}], got {value}")
        if self.health_timeout_s > self.health_interval_s:
            raise ConfigError(
                f"health_timeout_s must be in (0, health_interval_s={self.health_interval_s:g}],"
                f" got {self.health_timeout_s:g}"
            )

    @classmethod
    def from_settings(cls, settings: Any) -> DynamicConfig:
        """The dynamic part of a ``CoordinatorSettings`` (its start-up values)."""
        h: HealthPolicy = settings.health
        return cls(load_eps=settings.load_eps, health_interval_s=h.interval_s,
                   health_timeout_s=h.timeout_s, health_down_after=h.down_after,
                   health_up_after=h.up_after, max_attempts=settings.max_attempts,
                   failed_hold_s=settings.failed_hold_s,
                   first_token_timeout_s=settings.first_token_timeout_s,
                   stall_timeout_s=settings.stall_timeout_s,
                   prefix_routing=int(settings.prefix_routing),
                   session_offload=int(settings.session_offload))

    def health_policy(self) -> HealthPolicy:
        """The health loop's policy under this config."""
        return HealthPolicy(interval_s=self.health_interval_s, timeout_s=self.health_timeout_s,
                            down_after=self.health_down_after, up_after=self.health_up_after)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


FIELDS: tuple[str, ...] = tuple(f.name for f in fields(DynamicConfig))


def parse_overrides(text: str | bytes) -> dict[str, float | int]:
    """The overrides stored at ``config/coordinator``: a JSON object of known settings.

    Raises ``ConfigError`` for bad JSON, a non-object, or an unknown key (a typo must not
    pass silently). Values are checked by ``apply_overrides``.
    """
    try:
        doc = json.loads(text) if text else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{CONFIG_KEY} must be a JSON object, got invalid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ConfigError(f"{CONFIG_KEY} must be a JSON object, got {type(doc).__name__}")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; known: {', '.join(FIELDS)}")
    return doc


def apply_overrides(base: DynamicConfig, overrides: Mapping[str, Any]) -> DynamicConfig:
    """``base`` with ``overrides`` applied; ``ConfigError`` names the first invalid field."""
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}; known: {', '.join(FIELDS)}")
    return replace(base, **overrides)


def parse_assignment(text: str) -> tuple[str, float | int]:
    """``"KEY=VALUE"`` from the command line -> (key, number); the key must be a setting."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"setting must be KEY=VALUE, got {text!r}")
    if key not in FIELDS:
        raise ConfigError(f"unknown setting {key!r}; known: {', '.join(FIELDS)}")
    try:
        value: float | int = int(raw) if key in _INT_RANGES else float(raw)
    except ValueError:
        kind = "an integer" if key in _INT_RANGES else "a number"
        raise ConfigError(f"{key} must be {kind}, got {raw!r}") from None
    return key, value


ConfigCallback = Callable[[DynamicConfig], Awaitable[None] | None]


class DynamicConfigWatcher:
    """Follows ``config/coordinator`` and calls ``on_change`` with each new valid config.

    ``base`` is the coordinator's start-up config: the stored overrides apply on top of it,
    and a deleted key means ``base`` again. ``current`` is the config in force.
    """

    def __init__(self, store: EtcdStore, base: DynamicConfig,
                 on_change: ConfigCallback | None = None, retry_s: float = 0.5):
        self.store = store
        self.base = base
        self.current = base
        self.on_change = on_change
        self.retry_s = retry_s
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read the key (applying what it holds), then watch it in the background."""
        revision = await self._read()
        self._task = asyncio.create_task(self._watch(revision), name="dynamic-config")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None

    async def _read(self) -> int:
        """Apply the stored document; returns the revision read at."""
        kvs, revision = await self.store.get_prefix(CONFIG_KEY)
        kv = next((kv for kv in kvs if kv.key == CONFIG_KEY), None)
        await self._apply(kv.value if kv is not None else b"", revision)
        return revision

    async def _watch(self, revision: int) -> None:
        while True:
            try:
                async for ev in self.store.watch_prefix(CONFIG_KEY, start_revision=revision + 1):
                    revision = ev.revision
                    if ev.key == CONFIG_KEY:
                        await self._apply(ev.value if ev.kind == "put" else b"", revision)
            except (EtcdUnavailableError, StoreError) as e:
                # Keep the last good config while etcd is away; re-read when it is back.
                log.warning("dynamic config watch: %s; retrying", e)
                await asyncio.sleep(self.retry_s)
                try:
                    revision = await self._read()
                except (EtcdUnavailableError, StoreError):
                    pass

    async def _apply(self, value: bytes, revision: int) -> None:
        try:
            config = apply_overrides(self.base, parse_overrides(value))
        except ConfigError as e:
            log.error("ignoring %s at revision %d (keeping the last good config): %s",
                      CONFIG_KEY, revision, e)
            return
        if config == self.current:
            return
        self.current = config
        log.info("dynamic config at revision %d: %s", revision, config)
        if self.on_change is None:
            return
        try:
            result = self.on_change(config)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("applying the dynamic config failed")


async def read_overrides(store: EtcdStore) -> tuple[dict[str, float | int], int]:
    """The stored overrides and the key's mod revision (0 when absent)."""
    kv = await store.get(CONFIG_KEY)
    if kv is None:
        return {}, 0
    return parse_overrides(kv.value), kv.mod_revision


async def set_overrides(store: EtcdStore, changes: Mapping[str, float | int],
                        base: DynamicConfig | None = None) -> dict[str, float | int]:
    """Merge ``changes`` into the stored overrides, validated over ``base`` (the defaults),
    and write them back atomically (compare-and-swap: a concurrent writer makes this fail
    with ``RuntimeError`` rather than be overwritten). Returns the stored overrides."""
    current, mod = await read_overrides(store)
    merged = {**current, **changes}
    apply_overrides(base or DynamicConfig(), merged)  # raises ConfigError naming the field
    guard = Compare(CONFIG_KEY, "mod", "==", mod) if mod else key_absent(CONFIG_KEY)
    if not await store.txn([guard], [Put(CONFIG_KEY, json.dumps(merged, sort_keys=True).encode())]):
        raise RuntimeError(f"{CONFIG_KEY} changed while being set; retry")
    return merged
