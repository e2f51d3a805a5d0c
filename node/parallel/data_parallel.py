"""Data parallelism inside one node: one engine per device, behind the one-engine interface.

:class:`EngineGroup` answers what the node's servers, agent and metrics ask of an
:class:`~ultrakv.node.engine.Engine`, and sends each session to one engine: placed on first
sight by consistent hashing over the devices with bounded load (``cluster.ring``'s
``BoundedLoadRouter``: no device holds more than ``ceil((1 + eps) * average)`` sessions),
then sticky, because its KV lives there. Requests without a session go by the hash of their
prompt's start (shared prefixes meet on one device), bounded by each engine's queue.
Sessions move between devices with :meth:`EngineGroup.move_session`: the KV goes device to
device (CUDA peer copy; no host memory, no gRPC).

Stats add up the engines' counters and list each device under ``gpus`` (KV usage, running,
waiting, sessions, generated tokens per second, and NVML utilisation where ``pynvml``
imports and the device is CUDA).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from ultrakv.cluster.errors import SessionNotFoundError
from ultrakv.cluster.ring import BoundedLoadRouter, HashRing, bounded_lookup, stable_hash64
from ultrakv.cluster.session_state import SessionState
from ultrakv.cluster.validation import SessionLayout
from ultrakv.node.config import EngineConfig
from ultrakv.node.engine import Engine, batch_of, resolve_device
from ultrakv.node.outputs import (
    GenerateRequest,
    PreparedTurn,
    Prompt,
    RequestKey,
    RequestOutput,
    SessionInfo,
    StreamDelta,
)
from ultrakv.node.sampling_params import Priority, SamplingParams
from ultrakv.node.sessions import Session, TenantQuota

PLACEMENT_EPS = 0.25
_RATE_WINDOW_S = 10.0


def data_parallel_devices(gpus: str, device: str) -> list[torch.device]:
    """The devices ``gpus`` names (see ``EngineConfig.gpus``). ValueError naming the limit
    for an index or count past the visible CUDA devices, or a CUDA list without CUDA."""
    base = resolve_device(device)
    if base.type == "cpu":
        if not gpus.isdigit():
            raise ValueError(f"gpus must be a count N with device cpu (N engines on the CPU, for tests), got {gpus!r}")
        return [base] * int(gpus)
    count = torch.cuda.device_count()
    if gpus == "all":
        indices = list(range(count))
    elif gpus.isdigit():
        if int(gpus) > count:
            raise ValueError(f"gpus must be at most the {count} visible CUDA devices, got {gpus}")
        indices = list(range(int(gpus)))
    else:
        indices = [int(i) for i in gpus.split(",")]
        bad = [i for i in indices if i >= count]
        if bad:
            raise ValueError(f"gpus indices must be in [0, {count - 1}], got {bad[0]}")
        if len(set(indices)) != len(indices):
            raise ValueError(f"gpus must not name a device twice, got {gpus!r}")
    return [torch.device("cuda", i) for i in indices]


def open_engine(config: EngineConfig) -> Engine | EngineGroup:
    """An Engine, or an EngineGroup when ``config.gpus`` asks for one engine per device."""
    if not config.gpus:
        return Engine(config)
    return EngineGroup(config, data_parallel_devices(config.gpus, config.device))


class _GroupSessions:
    """The parts of a SessionStore the node's servers touch, over every engine's store."""

    def __init__(self, group: EngineGroup):
        self._group = group

    @property
    def quota(self) -> TenantQuota:
        return self._group.engines[0].sessions.quota

    @quota.setter
    def quota(self, quota: TenantQuota) -> None:
        # Per engine: a tenant's quota bounds what it holds on each device.
        for engine in self._group.engines:
            engine.sessions.quota = quota

    def get(self, session_id: str, tenant: str | None = None) -> Session:
        return self._group._owner_engine(session_id).sessions.get(session_id, tenant)

    def __len__(self) -> int:
        return sum(len(e.sessions) for e in self._group.engines)


def _tier_share(config: EngineConfig, index: int, count: int) -> dict:
    """Engine ``index``'s share of the node's KV tiers: the host-memory size split evenly, a
    disk directory of its own (one directory has one writer and one size cap)."""
    share: dict = {"kv_cpu_gib": config.kv_cpu_gib / count}
    if config.kv_disk_dir:
        share["kv_disk_dir"] = str(Path(config.kv_disk_dir) / f"gpu{index}")
        share["kv_disk_gib"] = config.kv_disk_gib / count
    return share


class EngineGroup:
    """Several engines of one model, one per device, behind the Engine interface."""

    def __init__(self, config: EngineConfig, devices: list[torch.device]):
        if not devices:
            raise ValueError("gpus must name at least one device")
        self.config = config
        self.engines: list[Engine] = []
        try:
            for i, device in enumerate(devices):
                # Built with its device current: its graphs' pool and streams live there.
                with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
                    self.engines.append(Engine(replace(config, device=str(device), gpus="",
                                                       **_tier_share(config, i, len(devices)))))
        except BaseException:
            self.shutdown()
            raise
        self.gpu_ids = [str(i) for i in range(len(devices))]
        self._by_id = dict(zip(self.gpu_ids, self.engines, strict=True))
        self._router = BoundedLoadRouter(HashRing(self.gpu_ids), PLACEMENT_EPS)
        self._lock = threading.Lock()
        self._requests: dict[RequestKey, Engine] = {}
        self._rates: dict[str, list[tuple[float, int]]] = {g: [] for g in self.gpu_ids}
        self._nvml = _Nvml.open(devices)
        self.sessions = _GroupSessions(self)
        first = self.engines[0]
        self.model_config = first.model_config
        self.model_name = first.model_name
        self.model_fingerprint = first.model_fingerprint
        self.chain_root = first.chain_root
        self.tokenizer = first.tokenizer
        self.max_model_len = min(e.max_model_len for e in self.engines)
        self.device = first.device
        self.dtype = first.dtype

    # -- placement ----------------------------------------------------------------------------

    def _held_by(self, session_id: str) -> Engine | None:
        for engine in self.engines:
            if engine.sessions.newest(session_id) is not None:
                return engine
        return None

    def _owner_engine(self, session_id: str) -> Engine:
        """The engine holding ``session_id``; SessionNotFoundError when none does."""
        with self._lock:
            gpu = self._router.owner(session_id)
        engine = self._by_id[gpu] if gpu is not None else self._held_by(session_id)
        if engine is None:
            raise SessionNotFoundError(session_id)
        return engine

    def gpu_of(self, session_id: str) -> str:
        """The device id (``"0"``, ``"1"``...) a session is placed on (placing it if new)."""
        with self._lock:
            gpu = self._router.owner(session_id)
            if gpu is None:
                held = self._held_by(session_id)
                if held is not None:  # restored or imported before the router saw it
                    gpu = self.gpu_ids[self.engines.index(held)]
                    self._router.pin(session_id, gpu)
                else:
                    gpu = self._router.assign(session_id)
            return gpu

    def _engine_for(self, request: GenerateRequest) -> Engine:
        if request.session_id:
            return self._by_id[self.gpu_of(request.session_id)]
        prompt = request.prompt
        key = repr(prompt[:64]) if isinstance(prompt, (str, list)) else repr(prompt)
        queues = {g: self._queue(e) for g, e in self._by_id.items()}
        return self._by_id[bounded_lookup(self._router.ring, str(stable_hash64(key)), queues, PLACEMENT_EPS)]

    @staticmethod
    def _queue(engine: Engine) -> int:
        return len(engine.scheduler.running) + len(engine.scheduler.waiting)

    def _release_gone(self) -> None:
        """Forget placements of sessions no engine holds any more (deleted, expired)."""
        with self._lock:
            for sid, gpu in self._router.owners().items():
                if self._by_id[gpu].sessions.newest(sid) is None:
                    self._router.release(sid)

    # -- requests -----------------------------------------------------------------------------

    def validate(self, request: GenerateRequest) -> None:
        self._engine_for(request).validate(request)

    def prompt_token_ids(self, request: GenerateRequest) -> list[int]:
        """The tokens the request would run, on the engine it would run on."""
        return self._engine_for(request).prompt_token_ids(request)

    async def stream(self, request: GenerateRequest) -> AsyncIterator[StreamDelta]:
        engine = self._engine_for(request)
        with self._lock:
            self._requests[request.key] = engine
        try:
            async for delta in engine.stream(request):
                yield delta
        finally:
            with self._lock:
                self._requests.pop(request.key, None)

    def stream_to(self, request: GenerateRequest, on_delta: Callable[[StreamDelta], None]) -> None:
        """:meth:`Engine.stream_to` on the engine the request goes to."""
        engine = self._engine_for(request)
        key = request.key

        def deliver(delta: StreamDelta) -> None:
            if delta.finished:
                with self._lock:
                    self._requests.pop(key, None)
            on_delta(delta)

        with self._lock:
            self._requests[key] = engine
        try:
            engine.stream_to(request, deliver)
        except BaseException:
            with self._lock:
                self._requests.pop(key, None)
            raise

    def abort(self, request_id: str, tenant: str = "") -> bool:
        """Stop ``tenant``'s request ``request_id`` on the engine running it."""
        with self._lock:
            engine = self._requests.get(RequestKey(tenant, request_id))
        engines = [engine] if engine is not None else self.engines
        return any(e.abort(request_id, tenant) for e in engines)

    def generate(self, prompts: list[Prompt] | Prompt, params: SamplingParams | list[SamplingParams] | None = None,
                 *, session_ids: list[str | None] | None = None,
                 priorities: list[Priority] | None = None) -> list[RequestOutput]:
        """Like Engine.generate; each engine runs its share of the batch on its own thread."""
        prompts, params_list = batch_of(prompts, params)
        n = len(prompts)
        shares: dict[int, list[int]] = {}
        for i, prompt in enumerate(prompts):
            req = GenerateRequest(prompt=prompt, session_id=session_ids[i] if session_ids else None)
            shares.setdefault(self.engines.index(self._engine_for(req)), []).append(i)

        def run(engine_index: int, rows: list[int]) -> list[RequestOutput]:
            return self.engines[engine_index].generate(
                [prompts[i] for i in rows], [params_list[i] for i in rows],
                session_ids=[session_ids[i] for i in rows] if session_ids else None,
                priorities=[priorities[i] for i in rows] if priorities else None)

        out: list[RequestOutput | None] = [None] * n
        with ThreadPoolExecutor(max_workers=len(shares)) as pool:
            futures = {pool.submit(run, e, rows): rows for e, rows in shares.items()}
            for future, rows in futures.items():
                for i, output in zip(rows, future.result(), strict=True):
                    out[i] = output
        return out  # type: ignore[return-value]

    def has_unfinished(self) -> bool:
        return any(e.has_unfinished() for e in self.engines)

    def seconds_without_progress(self) -> float:
        return max(e.seconds_without_progress() for e in self.engines)

    # -- sessions -----------------------------------------------------------------------------

    def get_session(self, session_id: str, tenant: str | None = None) -> SessionInfo:
        return self._owner_engine(session_id).get_session(session_id, tenant)

    def list_sessions(self) -> list[SessionInfo]:
        return [info for e in self.engines for info in e.list_sessions()]

    def delete_session(self, session_id: str, tenant: str | None = None) -> None:
        self._owner_engine(session_id).delete_session(session_id, tenant)
        self._release_gone()

    def cleanup_sessions(self, max_age_s: float) -> int:
        removed = sum(e.cleanup_sessions(max_age_s) for e in self.engines)
        self._release_gone()
        return removed

    def clear_cache(self) -> int:
        return sum(e.clear_cache() for e in self.engines)

    @property
    def session_layout(self) -> SessionLayout:
        return self.engines[0].session_layout

    def export_session(self, session_id: str) -> SessionState:
        return self._owner_engine(session_id).export_session(session_id)

    def import_session(self, state: SessionState) -> int:
        return self._by_id[self.gpu_of(state.session_id)].import_session(state)

    def store_replica(self, session_id: str, token_ids: list[int], turns: int, tenant: str = "",
                      messages: list[tuple[str, str]] | None = None) -> None:
        self._by_id[self.gpu_of(session_id)].store_replica(session_id, token_ids, turns, tenant,
                                                           messages)

    def promote_replica(self, session_id: str) -> bool:
        return self._owner_engine(session_id).promote_replica(session_id)

    def demote_session(self, session_id: str) -> bool:
        return self._owner_engine(session_id).demote_session(session_id)

    def session_fenced(self, session_id: str) -> bool:
        return any(engine.session_fenced(session_id) for engine in self.engines)

    def fence_sessions(self, until: float) -> list[str]:
        return [sid for engine in self.engines for sid in engine.fence_sessions(until)]

    def prepare_turn(self, request: GenerateRequest) -> PreparedTurn:
        return self._engine_for(request).prepare_turn(request)

    def append_turn(self, request: GenerateRequest, turns: int, prompt_token_ids: list[int],
                    output_token_ids: list[int], text: str, finish_reason: str
                    ) -> tuple[RequestOutput, bool]:
        return self._engine_for(request).append_turn(request, turns, prompt_token_ids, output_token_ids,
                                                     text, finish_reason)

    def move_session(self, session_id: str, gpu: str) -> int:
        """Move a session (history and cached KV) to device ``gpu``; returns the KV tokens
        that arrived. The KV goes device to device; the session is gone from its old engine."""
        if gpu not in self._by_id:
            raise ValueError(f"gpu must be one of {self.gpu_ids}, got {gpu!r}")
        src_gpu = self.gpu_of(session_id)
        if src_gpu == gpu:
            return 0
        src, dst = self._by_id[src_gpu], self._by_id[gpu]
        state = src.export_session(session_id, kv_device=dst.device)
        taken = dst.import_session(state)
        src.delete_session(session_id)
        with self._lock:
            self._router.pin(session_id, gpu)
        return taken

    # -- lifecycle and stats ------------------------------------------------------------------

    def warmup(self) -> None:
        for engine in self.engines:
            engine.warmup()

    def shutdown(self) -> None:
        for engine in self.engines:
            engine.shutdown()

    def stats(self) -> dict:
        per_engine = [e.stats() for e in self.engines]
        merged = _merge(per_engine)
        merged["device"] = ",".join(str(e.device) for e in self.engines)
        now = time.monotonic()
        gpus = []
        for gpu, engine, s in zip(self.gpu_ids, self.engines, per_engine, strict=True):
            cache = s["cache"]
            entry = {
                "gpu": gpu,
                "device": str(engine.device),
                "kv_usage": cache["blocks_used"] / max(1, cache["num_blocks"]),
                "running": s["requests"]["running"],
                "waiting": s["requests"]["waiting"],
                "sessions": s["sessions"]["count"],
                "tokens_per_s": self._rate(gpu, now, s["tokens"]["generated"]),
            }
            utilization = self._nvml.utilization(int(gpu)) if self._nvml else None
            if utilization is not None:
                entry["utilization"] = utilization
            gpus.append(entry)
        merged["gpus"] = gpus
        with self._lock:
            merged["placement"] = {"sessions_per_gpu": self._router.loads(), "eps": PLACEMENT_EPS}
        return merged

    def _rate(self, gpu: str, now: float, generated: int) -> float:
        """Generated tokens per second over the last ``_RATE_WINDOW_S`` of stats calls."""
        with self._lock:
            samples = self._rates[gpu]
            samples.append((now, generated))
            while len(samples) > 2 and now - samples[1][0] >= _RATE_WINDOW_S:
                samples.pop(0)
            (t0, g0) = samples[0]
        return (generated - g0) / (now - t0) if now > t0 else 0.0


def _merge(stats: list[dict]) -> dict:
    """The engines' stats as one node's: counters and histogram buckets add up, latency
    percentiles take the worst engine's, ratios are recomputed, the rest is the first's."""
    out: dict[str, Any] = {}
    # Every engine's keys: counts keyed by name (finish reasons, say) differ between engines.
    keys = list(dict.fromkeys(k for s in stats for k in s))
    for key in keys:
        present = [s for s in stats if key in s]
        value = present[0][key]
        values = [s[key] for s in present]
        if key == "latency":
            out[key] = {k: max(v[k] for v in values) for k in value}
        elif key == "buckets":
            out[key] = [[b[0], sum(v[i][1] for v in values)] for i, b in enumerate(value)]
        elif isinstance(value, dict):
            out[key] = _merge(values)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "max_model_len":
            out[key] = sum(v for v in values if v is not None)
        else:
            out[key] = value
    if "hit_rate" in out and "hits" in out:
        looked = out["hits"] + out.get("misses", 0)
        out["hit_rate"] = out["hits"] / looked if looked else 0.0
    return out


class _Nvml:
    """GPU utilisation from NVML (``pynvml``, from nvidia-ml-py), where it imports."""

    def __init__(self, pynvml: Any, handles: dict[int, Any]):
        self._pynvml = pynvml
        self._handles = handles

    @classmethod
    def open(cls, devices: list[torch.device]) -> _Nvml | None:
        if not any(d.type == "cuda" for d in devices):
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml, {i: pynvml.nvmlDeviceGetHandleByIndex(d.index or 0)
                                for i, d in enumerate(devices)})
        except Exception:  # no NVML here: the stats simply leave utilisation out
            return None

    def utilization(self, gpu: int) -> float | None:
        """Percent of the last sample period the GPU was busy, in [0, 1]."""
        try:
            return self._pynvml.nvmlDeviceGetUtilizationRates(self._handles[gpu]).gpu / 100.0
        except Exception:
            return None
