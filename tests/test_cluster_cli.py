"""`ultrakv serve --nodes N`: etcd, coordinator and nodes on one machine; Ctrl-C stops all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from ultrakv.client import Client
from ultrakv.cluster.etcd_server import free_port

pytestmark = pytest.mark.cluster


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_serve_nodes_runs_a_cluster_and_ctrl_c_stops_every_process(tmp_path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ultrakv.client.cli", "serve", "--nodes", "2",
                             "--port", str(port), "--data-dir", str(tmp_path),
                             "--num-blocks", "128"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Client(f"127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline
                try:
                    if len(client.stats()["nodes"]) == 2:
                        break
                except Exception:
                    pass
                time.sleep(0.3)
            r = client.process_request({"text": "Hello", "max_length": 4, "session_id": "cli-1"})
            assert r["success"] and r["node"] in {"node-1", "node-2"}
            pids = [n["pid"] for n in client.stats()["nodes"]]
        assert len(set(pids)) == 2 and proc.pid not in pids
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "cluster serving on" in log and "stopped" in log and "Traceback" not in log
    assert not any(_alive(pid) for pid in pids)


def test_serve_with_an_unreachable_etcd_names_it() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-m", "ultrakv.client.cli", "serve", "--nodes", "2",
                          "--etcd", endpoint, "--port", str(free_port())],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"cannot reach etcd at {endpoint}" in out.stderr
