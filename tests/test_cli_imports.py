"""Client-side commands never import torch, triton or transformers.

Each command runs in a fresh interpreter against a real node server (in this process) and
reports which of those modules it loaded; the startup cost of PyTorch (seconds, more under
load) belongs to the processes that run a model, not to `ultrakv --help` or `ultrakv stats`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.server import BackgroundServer

HEAVY = ("torch", "triton", "transformers")

# Runs one command through the CLI's entry point, then writes what it loaded to a file.
_PROBE = """
import json, sys
from ultrakv.client.cli import main
out, argv = sys.argv[1], sys.argv[2:]
try:
    rc = main(argv)
except SystemExit as exc:
    rc = exc.code
with open(out, "w") as f:
    json.dump({"rc": rc, "modules": sorted({name.split(".")[0] for name in sys.modules})}, f)
"""


@pytest.fixture(scope="module")
def address():
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=64))
    with BackgroundServer(engine) as srv:
        yield srv.address
    engine.shutdown()


def _run(tmp_path: Path, argv: list[str]) -> dict:
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(out), *argv],
                          capture_output=True, text=True, timeout=120)
    assert out.exists(), proc.stderr
    result = json.loads(out.read_text())
    return {"rc": result["rc"], "heavy": sorted(set(result["modules"]) & set(HEAVY)),
            "stderr": proc.stderr}


def _commands(address: str, tmp_path: Path, etcd_endpoint: str | None) -> dict[str, list[str]]:
    batch_in = tmp_path / "in.jsonl"
    batch_in.write_text('{"text": "a", "max_length": 2}\n{"text": "b", "max_length": 2}\n')
    conn = ["--address", address]
    commands = {
        "help": ["--help"],
        "test": ["test", "--text", "Hi", "--max-length", "3", *conn],
        "stats": ["stats", *conn],
        "stats --json": ["stats", "--json", *conn],
        "health": ["health", *conn],
        "clear-cache": ["clear-cache", *conn],
        "sessions": ["sessions", "cleanup", "--max-age", "3600", *conn],
        "monitor": ["monitor", "--dashboard", "--iterations", "1", "--interval", "0.1", *conn],
        "batch": ["batch", str(batch_in), str(tmp_path / "out.jsonl"), *conn],
        "config --generate": ["config", "--generate", "--output", str(tmp_path / "u.yaml")],
    }
    archive = str(tmp_path / "backup.tar.zst")  # the node serving alone backs itself up
    commands.update({
        "backup create": ["backup", "create", "--output", archive, *conn],
        "backup list": ["backup", "list", "--dir", str(tmp_path)],
        "backup verify": ["backup", "verify", archive],
        "backup restore": ["backup", "restore", archive, "--into-cluster", *conn],
    })
    if etcd_endpoint:
        commands["config show"] = ["config", "show", "--etcd", etcd_endpoint]
    return commands


def test_client_commands_do_not_import_torch(address, etcd, tmp_path):
    loaded = {}
    for name, argv in _commands(address, tmp_path, etcd.endpoint).items():
        result = _run(tmp_path, argv)
        assert result["rc"] == 0, f"{name}: exit {result['rc']}\n{result['stderr']}"
        if result["heavy"]:
            loaded[name] = result["heavy"]
    assert not loaded, f"client commands imported {loaded}"


def test_library_imports_stay_light():
    """The client library and the light node modules the config file needs load no torch."""
    code = ("import sys, ultrakv.client, ultrakv.client.client, ultrakv.client.config_file, "
            "ultrakv.node, ultrakv.node.config, ultrakv.cluster.session_transfer, "
            "ultrakv.cluster.checkpoint, ultrakv.coordinator.server; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert not set(proc.stdout.split()) & set(HEAVY)


def test_node_start_loads_no_compiler_stack():
    """Building an engine and its server loads neither torch's compiler stack (dynamo, fx's
    symbolic shapes and sympy: seconds of a node's start) nor triton or transformers."""
    code = ("import sys; from ultrakv.node import Engine, EngineConfig; "
            "from ultrakv.node.server import NodeServer; "
            "NodeServer(Engine(EngineConfig(model='tiny', device='cpu', num_blocks=16))); "
            "print(sorted(m for m in ('torch._dynamo', 'sympy', 'triton', 'transformers') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
