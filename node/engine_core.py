"""The engine core: a node's Engine and its step loop in a process of their own.

A node started with ``engine_process`` (EngineConfig) runs its servers, cluster agent,
outboxes and pacer in one process and the :class:`~ultrakv.node.engine.Engine` (scheduler,
block pool, sessions, KV tiers, runner, model) in a child process started with the ``spawn``
method, so the event loop's per-message gRPC work and the engine's step thread each have an
interpreter (and a GIL) of their own (docs/serving-overhead.md). This module is the child's
side; ``node/engine_client.py`` is the node's.

One duplex pipe carries pickled tuples both ways:

node -> core
    ``("add", GenerateRequest)``: queue a request (a refusal comes back in the next step
    message); ``("abort", RequestKey)``; ``("call", id, name, args, kwargs)``: one of
    :data:`CORE_CALLS`, answered by ``("reply", id, ok, value)``; ``("stop",)``.
core -> node
    ``("ready", CoreFacts)`` once the model is loaded and warmed up (``("failed", error)``
    if it could not start); ``("reply", ...)``; ``("step", deltas, refused, blocks)``: every
    delta the engine produced since the last such message (in practice one step's), the
    requests refused meanwhile and the block-pool changes, sent by one thread that takes the
    engine's lock to collect them, so a step's deltas always leave together. Requests are
    named by their :class:`~ultrakv.node.outputs.RequestKey` (tenant and id) both ways.

The core exits when the pipe closes (its node is gone), and with ``pdeathsig`` also gets
SIGKILL from the kernel when the node's starting thread dies. It ignores SIGINT and SIGTERM,
which reach a whole process group at once: its node drains, then stops it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from ultrakv.node.config import EngineConfig
from ultrakv.node.outputs import RequestKey

if TYPE_CHECKING:
    from ultrakv.node.engine import Engine

log = logging.getLogger("ultrakv.node.engine_core")

# The Engine methods the node calls through the control channel (node/engine_client.py);
# anything else is refused.
CORE_CALLS = frozenset({
    "stats", "seconds_without_progress", "has_unfinished", "prompt_token_ids", "get_session",
    "list_sessions", "session_infos", "delete_session", "cleanup_sessions", "clear_cache",
    "snapshot_sessions", "export_session", "import_session", "store_replica", "release_session",
    "promote_replica", "demote_session", "session_fenced", "fence_sessions", "prepare_turn",
    "append_turn", "session", "set_quota", "generate",
})
CONTROL_THREADS = 4  # control calls run side by side (an export must not hold up stats)
# Answered on the reader thread, never queued behind control calls: the node's health watch
# asks this with a deadline, and long exports holding every control thread must not make an
# engine that moves read as stalled (it only reads two fields under the engine's lock).
INLINE_CALLS = frozenset({"seconds_without_progress"})

# A delta on the wire: (its request's key, new token ids, new text, the RequestOutput when
# finished).
Delta = tuple[RequestKey, list[int], str, Any]
BlockChange = tuple[bool, Sequence[int], str]


@dataclass(frozen=True)
class CoreFacts:
    """What never changes once the core is up: the node process keeps these at hand."""

    pid: int
    model_name: str
    model_fingerprint: str
    model_config: Any  # ModelConfig
    tokenizer: Any
    device: str
    dtype: str
    chain_root: int | None
    max_model_len: int
    num_blocks: int
    session_layout: Any  # SessionLayout
    blocks: list[BlockChange]  # what the pool and tiers hold at start (the block log's start)


def error_payload(exc: BaseException) -> tuple[type, tuple, dict]:
    """An exception as (class, args, attributes), rebuilt by :func:`rebuild_error` without
    calling its ``__init__`` (whose signature ``args`` need not fit). One that cannot be
    pickled becomes a RuntimeError naming it."""
    payload = (type(exc), exc.args, dict(getattr(exc, "__dict__", {})))
    try:
        pickle.dumps(payload)
    except Exception:
        return RuntimeError, (f"{type(exc).__name__}: {exc}",), {}
    return payload


def rebuild_error(payload: tuple[type, tuple, dict]) -> BaseException:
    cls, args, attributes = payload
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(attributes)
    return exc


class _Outgoing:
    """Deltas, refusals and block changes waiting for the sender thread."""

    def __init__(self) -> None:
        self.deltas: list[Delta] = []
        self.refused: list[tuple[RequestKey, tuple]] = []
        self.blocks: list[BlockChange] = []
        self.lock = threading.Lock()
        self.wake = threading.Event()

    def delta(self, key: RequestKey, delta: Any) -> None:
        with self.lock:
            self.deltas.append((key, delta.token_ids, delta.text, delta.output))
        self.wake.set()

    def refuse(self, key: RequestKey, exc: BaseException) -> None:
        with self.lock:
            self.refused.append((key, error_payload(exc)))
        self.wake.set()

    def block_change(self, stored: bool, hashes: Sequence[int], tier: str) -> None:
        with self.lock:
            self.blocks.append((stored, list(hashes), tier))
        self.wake.set()

    def take(self) -> tuple[list[Delta], list, list[BlockChange]]:
        with self.lock:
            taken = self.deltas, self.refused, self.blocks
            self.deltas, self.refused, self.blocks = [], [], []
        return taken


class EngineCore:
    """The child's side of the pipe: the engine, the command reader and the step sender."""

    def __init__(self, conn: Connection, engine: Engine) -> None:
        self.conn = conn
        self.engine = engine
        self.out = _Outgoing()
        self._send_lock = threading.Lock()
        self._calls = ThreadPoolExecutor(CONTROL_THREADS, thread_name_prefix="ultrakv-core-call")
        # The engine's state lock: the sender takes it to collect deltas, so it never splits a
        # step's deltas (they are all emitted while the step holds it).
        self._engine_lock = engine._lock
        self._flush_lock = threading.Lock()
        self._stopping = False

    def send(self, message: tuple) -> None:
        with self._send_lock:
            self.conn.send(message)

    def facts(self) -> CoreFacts:
        e = self.engine
        with self._engine_lock:
            blocks: list[BlockChange] = [(True, e.pool.hashes(), "gpu")]
            if e.tiers is not None and e.tiers.host is not None:
                blocks.append((True, e.tiers.host.hashes(), "cpu"))
            if e.tiers is not None and e.tiers.disk is not None:
                blocks.append((True, e.tiers.disk.hashes(), "disk"))
            e.pool.add_observer(self.out.block_change)
        return CoreFacts(pid=os.getpid(), model_name=e.model_name,
                         model_fingerprint=e.model_fingerprint, model_config=e.model_config,
                         tokenizer=e.tokenizer, device=str(e.device),
                         dtype=str(e.dtype).removeprefix("torch."), chain_root=e.chain_root,
                         max_model_len=e.max_model_len, num_blocks=e.num_blocks,
                         session_layout=e.session_layout, blocks=blocks)

    def serve(self) -> None:
        """Send ``ready``, then run until the node says stop or goes away."""
        self.send(("ready", self.facts()))
        self.engine.start_background_loop()
        sender = threading.Thread(target=self._send_steps, name="ultrakv-core-sender", daemon=True)
        sender.start()
        try:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    log.warning("the node process is gone: engine core stopping")
                    return
                kind = message[0]
                if kind == "add":
                    self._add(message[1])
                elif kind == "abort":
                    self.engine.abort(message[1].request_id, message[1].tenant)
                elif kind == "call" and message[2] in INLINE_CALLS:
                    self._call(*message[1:])
                elif kind == "call":
                    self._calls.submit(self._call, *message[1:])
                elif kind == "stop":
                    return
        finally:
            self._stopping = True
            self.engine.shutdown()  # aborts what runs: those final deltas still go out
            self.out.wake.set()
            with contextlib.suppress(OSError, ValueError):  # unless the node is gone
                self._flush()
            self._calls.shutdown(wait=False, cancel_futures=True)

    def _add(self, request: Any) -> None:
        try:
            self.engine.add_request(request, functools.partial(self.out.delta, request.key))
        except Exception as exc:  # refused: the node raises it to the request's caller
            self.out.refuse(request.key, exc)

    def _call(self, call_id: int, name: str, args: tuple, kwargs: dict) -> None:
        try:
            if name not in CORE_CALLS:
                raise AttributeError(f"{name!r} is not an engine core call")
            value = getattr(self, f"_call_{name}", None)
            result = (value or getattr(self.engine, name))(*args, **kwargs)
            reply = ("reply", call_id, True, result)
        except Exception as exc:
            reply = ("reply", call_id, False, error_payload(exc))
        try:
            self.send(reply)
        except (OSError, ValueError):  # the node is gone
            pass
        except Exception as exc:  # the value would not pickle: the caller gets why
            self.send(("reply", call_id, False, error_payload(exc)))

    # Calls on parts of the engine (its session store) rather than on the engine itself.

    def _call_session(self, session_id: str, tenant: str | None = None) -> Any:
        with self._engine_lock:
            return self.engine.sessions.get(session_id, tenant)

    def _call_set_quota(self, quota: Any) -> None:
        self.engine.sessions.quota = quota

    def _send_steps(self) -> None:
        while not self._stopping:
            self.out.wake.wait()
            self.out.wake.clear()
            try:
                self._flush()
            except (OSError, ValueError):  # the node is gone; the reader ends the core
                return

    def _flush(self) -> None:
        """Send what waits, as one message (nothing when nothing waits). Taking and sending
        are one step under ``_flush_lock``: at shutdown the sender thread and ``serve``'s
        last flush both run this, and a later batch must not overtake an earlier one (a
        request's tokens after its final are dropped by the node)."""
        with self._flush_lock:
            with self._engine_lock:
                deltas, refused, blocks = self.out.take()
            if deltas or refused or blocks:
                self.send(("step", deltas, refused, blocks))


def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when the thread that started it exits (Linux), and exit now if
    the node already went before this ran."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def run_core(conn: Connection, config: EngineConfig, parent_pid: int, pdeathsig: bool,
             log_level: int = logging.INFO) -> None:
    """The child process's entry point (``multiprocessing`` spawn target)."""
    if pdeathsig:
        _die_with_parent(parent_pid)
    # SIGINT goes to the whole foreground process group, and SIGTERM to the whole group or
    # cgroup when systemd (or `kill -TERM -PGID`) stops the node: the node decides when the
    # core stops (it drains first); it still dies with its node (the pipe, PDEATHSIG).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s [core]: %(message)s")
    try:
        from ultrakv.node.engine import Engine

        engine = Engine(config)
        engine.warmup()
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("failed", error_payload(exc)))
        raise
    EngineCore(conn, engine).serve()
    os._exit(0)  # no interpreter teardown: torch's and the tiers' threads may still be parked
