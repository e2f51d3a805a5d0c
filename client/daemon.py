"""``ultrakv serve --detach``, ``ultrakv status`` and ``ultrakv stop``: a server in the
background that a user can find and stop by name.

A detached server is an ``ultrakv serve`` child in a session of its own (a terminal's Ctrl-C
and hang-up do not reach it), its output in ``<data dir>/ultrakv.log``. Its pid is in
``<data dir>/ultrakv.pid`` and the address clients dial in ``<data dir>/ultrakv.address``, so
``status`` and ``stop`` find it from the data dir alone, and never touch another user's
server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PID_FILE = "ultrakv.pid"
ADDRESS_FILE = "ultrakv.address"
LOG_FILE = "ultrakv.log"


@dataclass(frozen=True)
class Detached:
    """What the data dir says about a detached server."""

    data_dir: Path
    pid: int | None  # None: no pid file, or a pid that is not (any longer) an ultrakv serve
    address: str

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    @property
    def running(self) -> bool:
        return self.pid is not None


def read_detached(data_dir: str | Path) -> Detached:
    """The detached server recorded under ``data_dir``; ``pid`` is None unless that process
    is alive and is an ``ultrakv serve`` (a pid file can outlive its process, and its pid be
    reused)."""
    data_dir = Path(data_dir).resolve()
    try:
        pid = int((data_dir / PID_FILE).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    try:
        address = (data_dir / ADDRESS_FILE).read_text().strip()
    except OSError:
        address = ""
    if pid is not None and not _is_ultrakv_serve(pid):
        pid = None
    return Detached(data_dir, pid, address)


def _is_ultrakv_serve(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and b"serve" in cmdline and any(b"ultrakv" in part for part in cmdline)


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether process ``pid`` is ``ancestor`` or one of its descendants (/proc's parent
    links; False once the chain leaves, or for a process gone)."""
    for _ in range(64):
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return False
        if pid <= 1:
            return False
    return False


def detach(argv: Sequence[str], data_dir: str | Path, address: str,
           preflight: Callable[[], None], healthy: Callable[[int], bool],
           timeout_s: float) -> Detached:
    """Start ``ultrakv <argv>`` in the background and wait until ``healthy(pid)`` (or the child
    exits: RuntimeError with its log's last lines, or ``timeout_s`` passes: TimeoutError).
    Refuses when a server detached from ``data_dir`` still runs; then ``preflight()`` may
    refuse (a taken port) before anything starts."""
    current = read_detached(data_dir)
    if current.running:
        raise RuntimeError(f"an ultrakv serve started from {current.data_dir} is already running "
                           f"(pid {current.pid}, {current.address or 'address unknown'}); "
                           "`ultrakv stop` first, or give another --data-dir")
    preflight()
    data_dir = current.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ultrakv.client.cli", *argv],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    (data_dir / PID_FILE).write_text(f"{proc.pid}\n")
    (data_dir / ADDRESS_FILE).write_text(f"{address}\n")
    deadline = time.monotonic() + timeout_s
    while not healthy(proc.pid):
        if proc.poll() is not None:
            _remove_files(data_dir)
            raise RuntimeError(f"ultrakv serve exited with status {proc.returncode} while "
                               f"starting; the end of {data_dir / LOG_FILE}:\n"
                               f"{_tail(data_dir / LOG_FILE)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"ultrakv serve (pid {proc.pid}) is not serving at {address} "
                               f"after {timeout_s:.0f} s; it keeps starting in the background "
                               f"(see {data_dir / LOG_FILE}, `ultrakv stop` to stop it)")
        time.sleep(0.2)
    return Detached(data_dir, proc.pid, address)


def stop(data_dir: str | Path, timeout_s: float) -> Detached:
    """SIGTERM the detached server (it stops its children and exits), SIGKILL its process
    group after ``timeout_s``; remove its pid and address files. Returns what was found
    (``pid`` None: nothing was running)."""
    found = read_detached(data_dir)
    if found.pid is not None:
        os.kill(found.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _is_ultrakv_serve(found.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _is_ultrakv_serve(found.pid):
            os.killpg(found.pid, signal.SIGKILL)  # its own session: the group is its own
    _remove_files(found.data_dir)
    return found


def _remove_files(data_dir: Path) -> None:
    for name in (PID_FILE, ADDRESS_FILE):
        (data_dir / name).unlink(missing_ok=True)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
