"""The ``ultrakv`` command line, config files and the dashboard figures."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from ultrakv.client import Client
from ultrakv.client.cli import build_parser, main
from ultrakv.client.config_file import PRESETS, load_config, load_preset
from ultrakv.client.dashboard import figures, render
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.server import BackgroundServer


@pytest.fixture(scope="module")
def server():
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=128))
    with BackgroundServer(engine) as srv:
        yield srv
    engine.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("preset", PRESETS)
def test_generated_config_reads_back_as_the_preset(tmp_path, preset):
    path = tmp_path / "ultrakv.yaml"
    assert main(["config", "--generate", "--preset", preset, "--output", str(path)]) == 0
    text = path.read_text()
    assert f"preset {preset}" in text.splitlines()[0]
    assert "  # share KV blocks between equal prefixes\n" in text  # commented keys
    assert load_config(path) == load_preset(preset)[0]


def test_presets_differ_where_they_should():
    dev, prod = load_preset("development")[0], load_preset("production")[0]
    bulk = load_preset("bulk_processing")[0]
    assert (dev.engine.model, dev.engine.device, dev.server.host) == ("tiny", "cpu", "127.0.0.1")
    assert prod.server.grace_period_s > dev.server.grace_period_s
    assert bulk.server.limits.max_batch_size > prod.server.limits.max_batch_size


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("engine:\n  modle: tiny\n")
    with pytest.raises(ValueError, match="engine.modle is not a config key"):
        load_config(bad)
    bad.write_text("engine:\n  max_num_seqs: 0\n")
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1, got 0"):
        load_config(bad)
    assert main(["serve", "--config", str(bad)]) == 2


def test_cli_client_commands(server, tmp_path, capsys):
    addr = ["--address", server.address]
    assert main(["test", *addr, "--text", "Hello", "--max-length", "8", "--session",
                 "cli-s1"]) == 0
    out = capsys.readouterr().out
    assert "8 tokens (length)" in out and "session cli-s1" in out
    assert main(["health", *addr]) == 0
    assert f"{server.address}: SERVING" in capsys.readouterr().out
    assert main(["stats", *addr, "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["nodes"][0]["sessions"] >= 1
    assert main(["stats", *addr]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["sessions", "cleanup", "--max-age", "0", *addr]) == 0
    assert "removed 1 sessions" in capsys.readouterr().out
    assert main(["clear-cache", *addr]) == 0
    assert "cached blocks" in capsys.readouterr().out
    assert main(["monitor", "--dashboard", "--iterations", "2", "--interval", "0.05",
                 *addr]) == 0
    # The summary is one line even when piped and longer than the 80-column default width.
    long_id = "cli-session-whose-name-pushes-the-summary-past-eighty-columns"
    assert main(["test", *addr, "--text", "Hi", "--max-length", "2", "--session", long_id]) == 0
    summary = next(line for line in capsys.readouterr().out.splitlines() if "2 tokens" in line)
    assert f"session {long_id}, node" in summary


def test_cli_batch_writes_results_in_order(server, tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"text": f"line {i}", "max_length": 4, "temperature": 0} for i in range(5)]
    rows.insert(2, {"text": "bad", "max_length": 0})
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["batch", str(src), str(dst), "--address", server.address]) == 1  # one failed
    results = [json.loads(line) for line in dst.read_text().splitlines()]
    assert [r["success"] for r in results] == [True, True, False, True, True, True]
    assert results[2]["error_field"] == "sampling.max_length"


def test_health_of_a_dead_address_exits_1(capsys):
    assert main(["health", "--address", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    assert "UNREACHABLE" in capsys.readouterr().out


def test_stats_piped_keeps_each_node_on_one_line(server, capsys, monkeypatch):
    # Piped (no terminal) the table wrapped at 80 columns: node ids and --wide's headers broke.
    monkeypatch.delenv("COLUMNS", raising=False)
    with Client(server.address, timeout=10) as client:
        node_id = client.stats()["nodes"][0]["node_id"]
    assert main(["stats", "--address", server.address, "--wide"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if node_id in line)
    assert server.address in row and "tiny" in row


def test_health_wait_is_the_bound_it_says(capsys):
    # `health --wait 3` on a dead address took 11.7 s: each poll retried for ~11 s itself.
    started = time.monotonic()
    assert main(["health", "--address", f"127.0.0.1:{free_port()}", "--wait", "2"]) == 1
    assert time.monotonic() - started < 2 + 6  # the wait, one last poll, and slack for a loaded machine
    assert "UNREACHABLE" in capsys.readouterr().out


def test_serve_starts_logs_and_stops_cleanly_on_ctrl_c(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ultrakv.client.cli", "serve", "--port",
                             str(port), "--model", "tiny", "--num-blocks", "64", "--http-port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Client(f"127.0.0.1:{port}", timeout=5) as c:
            deadline = time.monotonic() + 180  # generous: CI machines are shared and loaded
            while not c.health()["healthy"]:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
            assert c.process_request({"text": "hi", "max_length": 3})["success"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "loading model tiny on cpu" in log
    # the socket's own address (loopback by default: issue 10) and where local clients dial it
    assert f"serving tiny, listening on 127.0.0.1:{port} (clients dial 127.0.0.1:{port})" in log
    assert "stopped" in log and "Traceback" not in log


def test_chat_turns_and_a_ctrl_c_that_stops_one_reply_not_the_chat(server):
    """Ctrl-C during a reply ended `ultrakv chat` with a traceback (and, on a first turn, the
    session). Now it stops that reply and the chat goes on. (The escaping of model output's
    control characters is tested on its own: rich writes no codes to a pipe, and tiny rarely
    emits one, so an assertion here could not fail.)"""
    proc = subprocess.Popen([sys.executable, "-m", "ultrakv.client.cli", "chat", "--address", server.address,
                             "--session", "cli-chat", "--max-length", "3000", "--temperature", "1.0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        proc.stdin.write(b"Tell me a long story\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120
        while server.server.engine.stats()["requests"]["running"] == 0:  # the reply streams
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.stdin.write(b"And now?\n")
        proc.stdin.close()
        out = proc.stdout.read().decode()
        assert proc.wait(timeout=120) == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "reply stopped; the turn was not kept" in out and "Traceback" not in out
    assert "session cli-chat" in out  # the next turn's summary line: the chat went on
    with Client(server.address, timeout=10) as client:
        assert client.get_session("cli-chat")["turns"] == 1  # the stopped turn was not kept


def test_terminal_safe_escapes_control_characters():
    from ultrakv.client.cli import terminal_safe

    assert terminal_safe("a\x1b[31mb\nc\td\x07\x7f") == "a\\x1b[31mb\nc\td\\x07\\x7f"
    assert terminal_safe("x\x9b31my\x85é") == "x\\x9b31my\\x85é"  # C1 controls (CSI, NEL); é stays


def test_dashboard_figures_from_two_snapshots():
    def snap(requests: int, tokens: int) -> dict:
        return {"nodes": [{
            "node_id": "n1", "address": "a:1", "requests_total": requests,
            "completion_tokens": tokens, "queue_depth": 2, "running": 3, "sessions": 4,
            "latency": {"ttft_p50_ms": 1.0, "ttft_p95_ms": 2.0, "ttft_p99_ms": 3.0,
                        "tpot_p50_ms": 0.5, "tpot_p95_ms": 0.6, "tpot_p99_ms": 0.7},
            "cache": {"hit_rate": 0.25, "blocks_used": 10, "blocks_total": 100}}]}

    first = figures(None, snap(10, 100), 0.0)[0]
    assert (first.requests_per_s, first.tokens_per_s) == (0.0, 0.0)
    row = figures(snap(10, 100), snap(30, 500), 2.0)[0]
    assert (row.requests_per_s, row.tokens_per_s) == (10.0, 200.0)
    assert row.ttft_ms == (1.0, 2.0, 3.0) and row.cache_hit_rate == 0.25
    assert render([row, row], "a:1").row_count == 3  # two nodes and the total


def test_stream_pacing_reaches_nodes_and_coordinators_from_the_file_and_the_flags(tmp_path):
    from ultrakv.client.cli import _coordinator_settings, _node_config, _stream_pacing_args
    from ultrakv.cluster.service import StreamPacing

    config = tmp_path / "ultrakv.yaml"
    config.write_text("server:\n  stream_messages_per_s: 500\n  stream_max_wait_ms: 100\n")
    parser = build_parser()
    node = parser.parse_args(["node", "--config", str(config), "--stream-max-wait-ms", "60"])
    assert _node_config(node, "cpu").server.stream_pacing() == StreamPacing(0.005, 500, 60)
    coordinator = parser.parse_args(["coordinator", "--etcd", "127.0.0.1:1", "--config", str(config),
                                     "--insecure-no-cluster-secret", "--stream-messages-per-s", "250"])
    assert _coordinator_settings(coordinator).stream_pacing == StreamPacing(0.005, 250, 100)
    # `serve --nodes N` hands the flags to every node and coordinator it starts.
    serve = parser.parse_args(["serve", "--nodes", "2", "--stream-messages-per-s", "500",
                               "--stream-max-wait-ms", "100"])
    passed = parser.parse_args(["node", *_stream_pacing_args(serve)])
    assert (passed.stream_messages_per_s, passed.stream_max_wait_ms) == (500, 100)
    assert _stream_pacing_args(parser.parse_args(["serve"])) == []  # defaults stay the servers'
    assert StreamPacing() == StreamPacing(0.005, 2000, 40)  # unchanged defaults


@pytest.mark.parametrize(("key", "value", "limits"), [
    ("stream_messages_per_s", 0, "1..1000000 messages/s"),
    ("stream_max_wait_ms", 1500, "0..1000 ms"),
    ("stream_max_wait_ms", ".nan", "0..1000 ms"),
])
def test_a_stream_budget_out_of_range_is_refused_naming_the_key_and_its_limits(
        tmp_path, capsys, key, value, limits):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"server:\n  {key}: {value}\n")
    with pytest.raises(ValueError, match=f"{key} must be within {limits}, got"):
        load_config(bad)
    flag = "--" + key.replace("_", "-")
    for command in (["node"], ["coordinator", "--etcd", "127.0.0.1:1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, flag, str(value).lstrip(".")])
        err = capsys.readouterr().err
        assert f"argument {flag}: must be a number within {limits.split()[0]}" in err
