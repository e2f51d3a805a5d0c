"""`ultrakv serve --detach`, `ultrakv status`, `ultrakv stop`: the README's server runs in
the background, found and stopped by its data dir, never by a process-name match."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import alive
from ultrakv.client import Client
from ultrakv.cluster.etcd_server import free_port

pytestmark = pytest.mark.cluster


def _ultrakv(*argv: str, timeout: float = 360) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ultrakv.client.cli", *argv],
                          capture_output=True, text=True, timeout=timeout)


def test_detach_status_stop(tmp_path: Path) -> None:
    data = tmp_path / "data"
    port, http = free_port(), free_port()
    started = _ultrakv("serve", "--detach", "--model", "tiny", "--port", str(port), "--http-port", str(http),
                       "--data-dir", str(data), "--num-blocks", "64")
    pid = int((data / "ultrakv.pid").read_text()) if (data / "ultrakv.pid").exists() else None
    try:
        # It returns once serving, naming where, its pid and its log.
        assert started.returncode == 0, started.stderr
        assert f"ultrakv serving at 127.0.0.1:{port} (pid {pid})" in started.stdout
        assert alive(pid)
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            assert client.process_request({"text": "hi", "max_length": 2})["success"]
        assert "listening on" in (data / "ultrakv.log").read_text()  # its output is there

        status = _ultrakv("status", "--data-dir", str(data))
        assert status.returncode == 0 and f"(pid {pid})" in status.stdout
        assert "SERVING" in status.stdout

        # A second one from the same data dir is refused, naming the first.
        again = _ultrakv("serve", "--detach", "--port", str(free_port()), "--data-dir", str(data))
        assert again.returncode == 2 and f"already running (pid {pid}" in again.stderr

        stopped = _ultrakv("stop", "--data-dir", str(data))
        assert stopped.returncode == 0 and f"stopped ultrakv serve (pid {pid})" in stopped.stdout
        assert not alive(pid)
        assert not (data / "ultrakv.pid").exists()
        assert "stopped" in (data / "ultrakv.log").read_text().splitlines()[-1]
        assert _ultrakv("status", "--data-dir", str(data)).returncode == 3
        assert _ultrakv("stop", "--data-dir", str(data)).returncode == 0  # nothing to stop
    finally:
        if pid is not None and alive(pid):
            os.kill(pid, 9)


def test_a_stale_pid_file_is_not_a_running_server(tmp_path: Path) -> None:
    (tmp_path / "ultrakv.pid").write_text(f"{os.getpid()}\n")  # alive, but not ultrakv serve
    out = _ultrakv("status", "--data-dir", str(tmp_path))
    assert out.returncode == 3 and "no ultrakv serve --detach is running" in out.stdout
    assert _ultrakv("stop", "--data-dir", str(tmp_path)).returncode == 0
    assert alive(os.getpid()) and not (tmp_path / "ultrakv.pid").exists()


def test_a_second_ctrl_c_stops_serve_at_once(tmp_path: Path) -> None:
    """The first SIGINT lets running requests finish within the grace period; a second one
    was ignored (as a user pressing Ctrl-C again would find). Now it ends the process at once,
    status 130, leaving no child behind."""
    import signal
    import time

    from processes import children

    port = free_port()
    log_path = tmp_path / "serve.log"
    log_file = open(log_path, "w")  # noqa: SIM115 (the child writes it; closed below)
    proc = subprocess.Popen([sys.executable, "-m", "ultrakv.client.cli", "serve", "--model", "tiny",
                             "--port", str(port), "--http-port", "0", "--data-dir", str(tmp_path / "data")],
                            stdout=log_file, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with Client(f"127.0.0.1:{port}", timeout=300) as client:
            deadline = time.monotonic() + 300  # a loaded machine takes long to import the node
            while True:
                try:
                    if client.health()["status"] == "SERVING":
                        break
                except Exception:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.3)
            stream = client.stream({"text": "Go on", "max_length": 4000, "ignore_eos": True})
            next(stream)  # a generation runs: the first signal's stop waits for it (5 s grace)
            kids = children(proc.pid)
            proc.send_signal(signal.SIGINT)
            # The second Ctrl-C once the first has begun the stop (not a fixed pause: a loaded
            # machine may not have handled the first one yet).
            while "a second Ctrl-C stops at once" not in log_path.read_text():
                assert proc.poll() is None and time.monotonic() < deadline + 120
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log_file.close()
    out = log_path.read_text()
    assert proc.returncode == 130, out[-2000:]
    assert "second SIGINT: exiting now" in out
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in kids)


def test_the_detach_probe_takes_only_the_server_it_started() -> None:
    """A server another process had started on the port (taken between the port check and
    the model's load) passed `serve --detach`'s probe, which then reported it as its own."""
    from ultrakv.client.cli import serves_as_started
    from ultrakv.node import Engine, EngineConfig
    from ultrakv.node.server import BackgroundServer

    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=32))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with BackgroundServer(engine) as srv:
            assert serves_as_started(srv.address, os.getpid())  # this process serves it
            assert not serves_as_started(srv.address, other.pid)  # not that one
    finally:
        other.kill()
        other.wait()
        engine.shutdown()
