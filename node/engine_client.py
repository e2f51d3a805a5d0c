"""The node's handle on an engine core running in a child process (``engine_process``).

:class:`EngineClient` offers what the node's servers, cluster agent, checkpoints,
replication and metrics call on an :class:`~ultrakv.node.engine.Engine`, each call crossing
to the core (node/engine_core.py) over one pipe: everything listed here, and nothing else,
crosses the boundary. Arguments and results are pickled; a session's KV (a CPU tensor) goes
through shared memory (torch's multiprocessing reductions).

Generation is pushed: :meth:`EngineClient.stream_to` sends the request and returns; after
every engine step the core sends one message with that step's deltas for every running
request, and a reader thread here hands them to each event loop in one wakeup, where the
in-process engine's mailbox would. A request the core refuses (a full queue, a bad prompt)
ends with a delta carrying the error, which the caller raises.

Failure is fail-stop: when the core dies the pipe closes, every request in flight ends with
:class:`EngineCoreLostError` (UNAVAILABLE, so a coordinator resumes it on another node),
every call raises it, :meth:`seconds_without_progress` turns infinite (the node reports
NOT_SERVING) and ``on_lost`` runs (``ultrakv node`` then stops and exits non-zero, for its
supervisor to restart it). The core exits when the node does (the pipe closes).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import grpc
from ultrakv.cluster.errors import InvalidRequestError
from ultrakv.cluster.session_state import SessionState
from ultrakv.cluster.validation import NODE_FAILING_FIELD, RequestRejected, SessionLayout
from ultrakv.node.config import EngineConfig
from ultrakv.node.engine_core import CoreFacts, rebuild_error, run_core
from ultrakv.node.kv.block_event_log import BlockEventLog
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

log = logging.getLogger("ultrakv.node.engine_client")

Listener = Callable[[StreamDelta], None]
# Loading a large model and compiling its kernels can take minutes.
START_TIMEOUT_S = 1800.0
STOP_TIMEOUT_S = 30.0
PROGRESS_TIMEOUT_S = 10.0  # a core that does not say how it progresses within this is wedged
STATS_TIMEOUT_S = 10.0  # a Stats call or a metrics scrape fails after this instead of hanging


class EngineCoreLostError(RequestRejected):
    """The node's engine core process is gone (gRPC UNAVAILABLE on field ``node``: a
    coordinator resumes the request on another node, as for a node that died)."""

    def __init__(self, reason: str) -> None:
        super().__init__(grpc.StatusCode.UNAVAILABLE, NODE_FAILING_FIELD,
                         f"the node's engine process is gone ({reason}); the node is stopping",
                         retry_after_s=1.0)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    on_delta: Listener


class _CoreSessions:
    """The session-store operations the node's servers use, on the core's store."""

    def __init__(self, client: EngineClient) -> None:
        self._client = client
        self._quota = TenantQuota()

    @property
    def quota(self) -> TenantQuota:
        return self._quota

    @quota.setter
    def quota(self, quota: TenantQuota) -> None:
        self._client._call("set_quota", quota)
        self._quota = quota

    def get(self, session_id: str, tenant: str | None = None) -> Session:
        """A copy of the session as it is now (SessionNotFoundError when not held)."""
        return self._client._call("session", session_id, tenant)


class EngineClient:
    """An Engine in a child process, behind the calls the node makes on one. See the module
    docstring; ``EngineClient(config)`` returns once the core has loaded and warmed up."""

    def __init__(self, config: EngineConfig, on_lost: Callable[[str], None] | None = None,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        if config.gpus:
            raise ValueError("engine_process must be false with gpus (data parallel engines "
                             "in a core process are not supported yet)")
        self.config = config
        self.on_lost = on_lost
        self.sessions = _CoreSessions(self)
        self.lost_reason: str | None = None
        self._stopping = False  # shutdown() asked the core to stop: its exit is no loss
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # the tables below
        self._streams: dict[RequestKey, _Stream] = {}  # by tenant and id, as the engine's
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count(1)
        # Step messages that carried deltas: at most one per engine step, whatever the streams.
        self.delta_messages = 0
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=run_core, name="ultrakv-engine-core", daemon=False,
            args=(child, config, os.getpid(),
                  threading.current_thread() is threading.main_thread(),
                  logging.getLogger().getEffectiveLevel()))
        self._process.start()
        child.close()  # the core's end lives in the core only: its death closes the pipe here
        # While the core loads: what unpickling a tensor from it needs (torch, its shared-memory
        # reductions). Left to the first tensor to arrive (a checkpoint's KV export), the import
        # ran on the reader thread and held every stream's tokens for seconds (3 s on an H100
        # host, 4-6 s on the 2-core CPU machine: TTFT p99 of 3.6 s at 8 requests/s).
        import torch.multiprocessing  # noqa: F401
        try:
            facts = self._wait_ready(start_timeout_s)
        except BaseException:
            self._kill()
            raise
        self.core_pid = facts.pid
        self.model_name = facts.model_name
        self.model_fingerprint = facts.model_fingerprint
        self.model_config = facts.model_config
        self.tokenizer = facts.tokenizer
        self.device = facts.device
        self.dtype = facts.dtype
        self.chain_root = facts.chain_root
        self.max_model_len = facts.max_model_len
        self.num_blocks = facts.num_blocks
        self.session_layout: SessionLayout = facts.session_layout
        # Where blocks live, for the coordinators' prefix routing: fed by the step messages.
        self.block_log = BlockEventLog(config.block_size, facts.chain_root)
        for stored, hashes, tier in facts.blocks:
            self.block_log(stored, hashes, tier)
        self._reader = threading.Thread(target=self._read, name="ultrakv-core-reader", daemon=True)
        self._reader.start()
        log.info("engine core process %d ready: model=%s device=%s", facts.pid,
                 facts.model_name, facts.device)

    def _wait_ready(self, timeout_s: float) -> CoreFacts:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(1.0):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine core process exited with code "
                                   f"{self._process.exitcode} while starting (see its log above)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine core did not start within {timeout_s:g} s")
        try:
            kind, value = self._conn.recv()
        except EOFError:
            self._process.join(10)
            raise RuntimeError(f"the engine core process exited with code "
                               f"{self._process.exitcode} while starting") from None
        if kind == "failed":
            raise rebuild_error(value)
        return value

    # -- the pipe -----------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        if self.lost_reason is not None:
            raise EngineCoreLostError(self.lost_reason)
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):
            raise EngineCoreLostError(self.lost_reason or "its pipe is closed") from None

    def _call(self, name: str, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        """Run ``name`` on the core's engine and wait for its answer (blocking: from a worker
        thread, as the server calls the in-process engine); TimeoutError after
        ``timeout_s``."""
        future: Future = Future()
        call_id = next(self._ids)
        with self._lock:
            if self.lost_reason is not None:
                raise EngineCoreLostError(self.lost_reason)
            self._calls[call_id] = future
        try:
            self._send(("call", call_id, name, args, kwargs))
            return future.result(timeout_s)
        finally:
            with self._lock:
                self._calls.pop(call_id, None)

    def _read(self) -> None:
        """The reader thread: replies to their callers, each step's deltas to the loops."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a message that does not unpickle here: nothing can own it
                log.exception("engine core message lost")
                continue
            if message[0] == "step":
                self.delta_messages += bool(message[1])
                self._deliver(*message[1:])
            elif message[0] == "reply":
                _, call_id, ok, value = message
                with self._lock:
                    future = self._calls.pop(call_id, None)
                if future is not None:
                    if ok:
                        future.set_result(value)
                    else:
                        future.set_exception(rebuild_error(value))
        self._lose("stopped" if self._stopping else self._exit_reason())

    def _deliver(self, deltas: list, refused: list, blocks: list) -> None:
        for stored, hashes, tier in blocks:
            self.block_log(stored, hashes, tier)
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Listener, StreamDelta]]] = {}
        with self._lock:
            for key, token_ids, text, output in deltas:
                stream = (self._streams.get(key) if output is None
                          else self._streams.pop(key, None))
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream.on_delta, StreamDelta(
                        key.request_id, token_ids, text, output is not None, output)))
            for key, error in refused:
                stream = self._streams.pop(key, None)
                if stream is not None:
                    batches.setdefault(stream.loop, []).append((stream.on_delta, StreamDelta(
                        key.request_id, [], "", True, error=rebuild_error(error))))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_notify_all, items)
            except RuntimeError:  # that loop has closed: nobody is left to read
                pass

    def _exit_reason(self) -> str:
        self._process.join(5)
        code = self._process.exitcode
        if code is None:
            return "its pipe closed"
        return f"killed by signal {-code}" if code < 0 else f"exited with code {code}"

    def _lose(self, reason: str) -> None:
        """The core is gone: fail what waits on it, once."""
        with self._lock:
            if self.lost_reason is not None:
                return
            self.lost_reason = reason
            calls, self._calls = self._calls, {}
            streams, self._streams = self._streams, {}
        if reason != "stopped":
            log.error("engine core process %s: %s", self._process.pid, reason)
        error = EngineCoreLostError(reason)
        for future in calls.values():
            future.set_exception(error)
        batches: dict[asyncio.AbstractEventLoop, list[tuple[Listener, StreamDelta]]] = {}
        for key, stream in streams.items():
            batches.setdefault(stream.loop, []).append(
                (stream.on_delta, StreamDelta(key.request_id, [], "", True, error=error)))
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_notify_all, items)
            except RuntimeError:
                pass
        if reason != "stopped" and self.on_lost is not None:
            self.on_lost(reason)

    def _kill(self) -> None:
        if self._process.is_alive():
            self._process.kill()
        self._process.join(10)
        self._conn.close()

    # -- requests -----------------------------------------------------------------------------

    def validate(self, request: GenerateRequest) -> None:
        """Nothing here: the core checks a request as it queues it (prompt, session,
        lengths), and a refusal ends the request's stream with the engine's error, which
        the caller raises as it would this method's."""

    def stream_to(self, request: GenerateRequest, on_delta: Listener) -> None:
        """Queue ``request`` in the core; ``on_delta`` gets its deltas on the calling event
        loop, all of a step's in one wakeup (as :meth:`Engine.stream_to`). A refusal arrives
        as a finished delta whose ``error`` is set."""
        loop = asyncio.get_running_loop()
        key = request.key
        with self._lock:
            if self.lost_reason is not None:
                raise EngineCoreLostError(self.lost_reason)
            if key in self._streams:  # the same tenant's: another's may share the id
                raise InvalidRequestError(
                    "request_id", f"request_id {request.request_id!r} is already running")
            self._streams[key] = _Stream(loop, on_delta)
        try:
            self._send(("add", request))
        except BaseException:
            with self._lock:
                self._streams.pop(key, None)
            raise

    def abort(self, request_id: str, tenant: str = "") -> bool:
        """Stop ``tenant``'s request ``request_id`` (its final delta follows); False when it
        is not running."""
        key = RequestKey(tenant, request_id)
        with self._lock:
            running = key in self._streams
        if running:
            try:
                self._send(("abort", key))
            except EngineCoreLostError:
                return False
        return running

    def generate(self, prompts: list[Prompt] | Prompt,
                 params: SamplingParams | list[SamplingParams] | None = None, *,
                 session_ids: list[str | None] | None = None,
                 priorities: list[Priority] | None = None) -> list[RequestOutput]:
        """:meth:`Engine.generate`, run in the core (blocking)."""
        return self._call("generate", prompts, params, session_ids=session_ids,
                          priorities=priorities)

    def prompt_token_ids(self, request: GenerateRequest) -> list[int]:
        return self._call("prompt_token_ids", request)

    def has_unfinished(self) -> bool:
        return self._call("has_unfinished")

    def seconds_without_progress(self) -> float:
        """As the engine's; infinite once the core is gone or does not answer within
        ``PROGRESS_TIMEOUT_S`` (wedged: the node reports NOT_SERVING either way)."""
        if self.lost_reason is not None:
            return math.inf
        try:
            return self._call("seconds_without_progress", timeout_s=PROGRESS_TIMEOUT_S)
        except (EngineCoreLostError, TimeoutError):
            return math.inf

    def stats(self) -> dict:
        try:
            stats = self._call("stats", timeout_s=STATS_TIMEOUT_S)
        except TimeoutError:
            # A wedged core (stopped, or a step that never ends) would hold the caller's
            # thread for good: a Stats call or a metrics scrape fails instead.
            raise RequestRejected(grpc.StatusCode.UNAVAILABLE, NODE_FAILING_FIELD,
                                  f"the node's engine process did not answer within {STATS_TIMEOUT_S:g} s",
                                  retry_after_s=1.0) from None
        stats["engine_process"] = {"pid": self.core_pid, "delta_messages": self.delta_messages}
        return stats

    # -- sessions -----------------------------------------------------------------------------

    def get_session(self, session_id: str, tenant: str | None = None) -> SessionInfo:
        return self._call("get_session", session_id, tenant)

    def list_sessions(self) -> list[SessionInfo]:
        return self._call("list_sessions")

    def session_infos(self, copies: list[tuple[Session, bool]]) -> list[SessionInfo]:
        return self._call("session_infos", copies)

    def delete_session(self, session_id: str, tenant: str | None = None) -> None:
        self._call("delete_session", session_id, tenant)

    def cleanup_sessions(self, max_age_s: float) -> int:
        return self._call("cleanup_sessions", max_age_s)

    def clear_cache(self) -> int:
        return self._call("clear_cache")

    def snapshot_sessions(self) -> list[tuple[Session, bool]]:
        return self._call("snapshot_sessions")

    def export_session(self, session_id: str, kv_device: str = "cpu",
                       snapshot: Session | None = None) -> SessionState:
        """The session's history and cached KV; the KV comes on the CPU whatever
        ``kv_device`` says (CUDA stays in the core)."""
        return self._call("export_session", session_id, "cpu", snapshot)

    def import_session(self, state: SessionState) -> int:
        return self._call("import_session", state)

    def store_replica(self, session_id: str, token_ids: list[int], turns: int, tenant: str = "",
                      messages: list[tuple[str, str]] | None = None) -> None:
        self._call("store_replica", session_id, token_ids, turns, tenant, messages)

    def release_session(self, session_id: str, turns: int) -> None:
        self._call("release_session", session_id, turns)

    def promote_replica(self, session_id: str) -> bool:
        return self._call("promote_replica", session_id)

    def demote_session(self, session_id: str) -> bool:
        return self._call("demote_session", session_id)

    def session_fenced(self, session_id: str) -> bool:
        return self._call("session_fenced", session_id)

    def fence_sessions(self, until: float) -> list[str]:
        return self._call("fence_sessions", until)

    def prepare_turn(self, request: GenerateRequest) -> PreparedTurn:
        return self._call("prepare_turn", request)

    def append_turn(self, request: GenerateRequest, turns: int, prompt_token_ids: list[int],
                    output_token_ids: list[int], text: str, finish_reason: str
                    ) -> tuple[RequestOutput, bool]:
        return self._call("append_turn", request, turns, prompt_token_ids, output_token_ids,
                          text, finish_reason)

    # -- lifecycle ----------------------------------------------------------------------------

    def warmup(self) -> None:
        """Nothing: the core warms up before it reports ready."""

    def shutdown(self) -> None:
        """Stop the core (its engine aborts what runs and persists its disk tier) and wait
        for it; killed if it does not end within ``STOP_TIMEOUT_S``."""
        self._stopping = True
        if self.lost_reason is None:
            try:
                self._send(("stop",))
            except EngineCoreLostError:
                pass
            self._process.join(STOP_TIMEOUT_S)
        self._lose("stopped")
        self._kill()


def _notify_all(items: list[tuple[Listener, StreamDelta]]) -> None:
    for on_delta, delta in items:
        try:
            on_delta(delta)
        except Exception:  # one failing listener never stops the others' deltas
            log.debug("listener for %s failed; dropping its delta", delta.request_id, exc_info=True)
