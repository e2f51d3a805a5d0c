"""`ultrakv serve --nodes N`: etcd, coordinator and nodes on one machine; Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from processes import alive
from processes import children as children_of
from ultrakv.client import Client
from ultrakv.cluster.etcd_server import free_port

pytestmark = pytest.mark.cluster


def _wait(predicate, proc: subprocess.Popen, what: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            value = predicate()
            if value:
                return value
        except Exception:
            pass
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def test_serve_nodes_restarts_crashed_children_and_sigterm_stops_every_process(tmp_path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ultrakv.client.cli", "serve", "--nodes", "2",
                             "--model", "tiny", "--port", str(port), "--data-dir", str(tmp_path),
                             "--num-blocks", "128", "--http-port", "0"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    addresses = [f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}"]  # two coordinators by default
    try:
        with Client(addresses, timeout=5) as client, Client(addresses[1], timeout=5) as second:
            _wait(lambda: len(client.stats()["nodes"]) == 2 == len(second.stats()["nodes"]),
                  proc, "two nodes behind both coordinators")
            r = client.process_request({"text": "Hello", "max_length": 4, "session_id": "cli-1"})
            assert r["success"] and r["node"] in {"node-1", "node-2"}
            pids = {n["node_id"]: n["pid"] for n in client.stats()["nodes"]}
            assert len(set(pids.values())) == 2 and proc.pid not in pids.values()

            # A node crashes: the supervisor starts it again (same id), the rest serve on.
            os.kill(pids["node-1"], signal.SIGKILL)
            restarted = _wait(lambda: {n["node_id"]: n["pid"] for n in client.stats()["nodes"]
                                       }.get("node-1") not in (None, pids["node-1"]) and
                              client.stats(), proc, "node-1 back with a new pid")
            assert len(restarted["nodes"]) == 2
            for i in range(6):  # sessions on both nodes, node-1 included
                r = client.process_request({"text": f"again {i}", "max_length": 4,
                                            "session_id": f"cli-{i}"})
                assert r["success"], r

            # A coordinator crashes: the client fails over to the other; it comes back.
            coordinators = {p: c for p, c in children_of(proc.pid).items() if " coordinator " in c}
            assert len(coordinators) == 2
            first = next(p for p, c in coordinators.items() if f"--port {port} " in c + " ")
            os.kill(first, signal.SIGKILL)
            for i in range(4):
                assert client.process_request({"text": "on", "max_length": 2,
                                               "session_id": f"cli-{i}"})["success"]
            _wait(lambda: len([c for c in children_of(proc.pid).values()
                               if " coordinator " in c]) == 2, proc, "coordinator restarted")
            with Client(addresses[0], timeout=5) as back:
                _wait(lambda: len(back.stats()["nodes"]) == 2, proc, "coordinator-1 serving")
            children = children_of(proc.pid)
        assert len(children) == 5  # etcd, two coordinators, two nodes
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "cluster serving on" in log and "stopped" in log and "Traceback" not in log
    assert "node-1 exited with status -9; restarting it in" in log
    assert "coordinator-1 exited with status -9; restarting it in" in log
    assert not any(alive(pid) for pid in children)


def test_a_ctrl_c_to_the_whole_group_lets_every_child_drain(tmp_path) -> None:
    """A terminal's Ctrl-C reaches serve --nodes and all its children; the supervisor then
    sends each a SIGTERM, which a child took for a second Ctrl-C and exited at once (130),
    dropping its requests and, for a node, its final checkpoint."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ultrakv.client.cli", "serve", "--nodes", "2",
                             "--model", "tiny", "--port", str(port), "--data-dir", str(tmp_path),
                             "--num-blocks", "256", "--http-port", "0"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            _wait(lambda: len(client.stats()["nodes"]) == 2, proc, "two nodes")
            assert client.process_request({"text": "Hi", "max_length": 2, "session_id": "grp"})["success"]
            os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log = proc.stdout.read()
    assert "exiting now" not in log, log[-3000:]
    assert "stopped" in log


def test_serve_with_an_unreachable_etcd_names_it() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-m", "ultrakv.client.cli", "serve", "--nodes", "2",
                          "--etcd", endpoint, "--port", str(free_port()), "--http-port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"cannot reach etcd at {endpoint}" in out.stderr
