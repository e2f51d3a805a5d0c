"""A node whose engine runs in a process of its own (``engine_process``, node/engine_core.py).

The client-facing tests of test_wire_server.py run here again over an EngineClient (the
same assertions: streaming and its token ids, sessions and their cached prefix, batches,
cancel, disconnect and deadline aborts, refusals naming the field); then what only a
separate process can do: a session moved between an in-process node and a core-process
node continues identically, the node fails fast when its core dies, and the core does not
outlive its node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from test_wire_server import (  # noqa: F401  (tests and fixtures run here over a core process)
    client,
    server,
    stub,
    test_a_pulled_request_left_early_is_aborted,
    test_a_pushed_request_gives_its_sink_every_token_once_in_order,
    test_bad_requests_do_not_disturb_others_on_the_stream,
    test_cancel_frees_blocks,
    test_client_disconnect_frees_blocks,
    test_one_stream_carries_several_requests,
    test_process_request_dict_shape_and_session_cache_hit,
    test_prompt_over_the_size_limit_is_resource_exhausted,
    test_request_deadline_is_honoured,
    test_stream_and_unary_give_the_same_greedy_text,
    test_unknown_session_is_not_found,
)
from ultrakv.client import Client
from ultrakv.client.client import RetryPolicy
from ultrakv.cluster.block_hashing import hash_token_blocks
from ultrakv.cluster.etcd_server import free_port
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.engine_client import EngineClient
from ultrakv.node.server import BackgroundServer, ServerSettings
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2_grpc

pytestmark = pytest.mark.cluster

CONFIG = EngineConfig(model="tiny", device="cpu", num_blocks=256, max_num_seqs=16)
PROMPT = "A conversation long enough to fill a few KV blocks of sixteen tokens each. " * 2


@pytest.fixture(scope="module")
def engine():
    eng = EngineClient(CONFIG)
    yield eng
    eng.shutdown()


def test_greedy_tokens_match_the_in_process_engine(engine):
    local = Engine(CONFIG)
    try:
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        prompts = ["The quick brown fox", [5, 9, 13, 21, 34]]
        want = [o.token_ids for o in local.generate(prompts, params)]
    finally:
        local.shutdown()
    assert [o.token_ids for o in engine.generate(prompts, params)] == want


def test_the_block_log_hears_the_cores_pool(engine):
    """What a coordinator routes by prefix on: the blocks a request computes in the core
    reach the node's block event log."""
    prompt = list(range(7, 7 + 40))  # two full blocks of 16
    engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0.0))
    want = hash_token_blocks(prompt, 16, "", engine.chain_root)
    deadline = time.monotonic() + 10
    while not set(want) <= engine.block_log.held("gpu") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert set(want) <= engine.block_log.held("gpu")


def test_a_session_moves_between_an_in_process_node_and_a_core_process_node(engine, client):  # noqa: F811
    """Export from a node whose engine is in-process, import into the core-process node: the
    history arrives with its KV (the next turn finds it cached) and the next turn's tokens
    are those the first node gives for it."""
    local = Engine(CONFIG)
    try:
        first = local.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0),
                               session_ids=["moved"])[0]
        state = local.export_session("moved")
        assert state.kv is not None and state.kv_tokens >= 32
        assert engine.import_session(state) == state.kv_tokens
        there = client.process_request({"text": " and then?", "max_length": 8,
                                        "temperature": 0.0, "session_id": "moved"})
        here = local.generate([" and then?"], SamplingParams(max_tokens=8, temperature=0.0),
                              session_ids=["moved"])[0]
    finally:
        local.shutdown()
    assert there["success"] and there["cached_tokens"] >= state.kv_tokens
    assert there["response"]["token_ids"] == here.token_ids
    assert engine.get_session("moved").num_tokens == len(here.prompt_token_ids) + 8
    assert len(here.prompt_token_ids) > len(first.prompt_token_ids) + 8  # history + the new turn
    back = engine.export_session("moved")  # and back out, KV through shared memory
    assert back.kv_tokens >= state.kv_tokens and back.kv.shape[2] == back.kv_tokens


def test_a_node_reports_not_serving_and_fails_requests_once_its_core_is_gone():
    """In-process: the core is SIGKILLed; ``on_lost`` hears why (once), the health check turns
    NOT_SERVING, and a new request is refused UNAVAILABLE instead of hanging."""
    lost: list[str] = []
    core = EngineClient(replace(CONFIG, num_blocks=32), on_lost=lost.append)
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.5, stall_timeout_s=0.4)
    try:
        with BackgroundServer(core, settings) as srv, \
                Client(srv.address, timeout=30, retry=RetryPolicy(attempts=1)) as c:
            assert c.health()["status"] == "SERVING"
            os.kill(core.core_pid, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while c.health()["status"] == "SERVING" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert c.health()["status"] == "NOT_SERVING"
            assert lost == ["killed by signal 9"]
            r = c.process_request({"text": "anyone there?", "max_length": 4})
            assert not r["success"] and r["error_code"] == "UNAVAILABLE", r
    finally:
        core.shutdown()


def _node_command(port: int) -> list[str]:
    return [sys.executable, "-m", "ultrakv.client.cli", "node", "--model", "tiny", "--device",
            "cpu", "--host", "127.0.0.1", "--port", str(port), "--num-blocks", "256",
            "--engine-process", "--insecure-no-cluster-secret"]


def _core_pid(address: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the node exited with {proc.returncode}"
        try:
            with Client(address, timeout=5) as c:
                return int(c.stats()["nodes"][0]["engine"]["engine_process"]["pid"])
        except Exception:
            time.sleep(0.2)
    raise AssertionError("the node did not start")


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def test_the_node_fails_fast_when_its_core_dies(tmp_path):
    """SIGKILL the core under a running stream: the stream's request ends UNAVAILABLE (a
    coordinator resumes it elsewhere), and the node process exits non-zero."""
    port = free_port()
    proc = subprocess.Popen(_node_command(port), stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "node.log", "wb"))
    try:
        address = f"127.0.0.1:{port}"
        core = _core_pid(address, proc)
        channel = grpc.insecure_channel(address)
        stub = ultrakv_pb2_grpc.UltraKVStub(channel)
        request = pb.GenerateStreamRequest(generate=pb.GenerateRequest(
            request_id="doomed", text="count to a thousand",
            sampling=pb.SamplingOptions(max_length=3000, temperature=0.0, ignore_eos=True)))
        errors = []
        for m in stub.Generate(iter([request]), timeout=60):
            if m.WhichOneof("event") == "chunk" and core:
                os.kill(core, signal.SIGKILL)
                core = 0
            elif m.WhichOneof("event") == "error":
                errors.append(m.error)
            elif m.WhichOneof("event") == "result":
                pytest.fail(f"the request finished: {m.result.finish_reason}")
        channel.close()
        assert [e.code for e in errors] == ["UNAVAILABLE"], errors
        assert "engine process is gone" in errors[0].message
        assert proc.wait(timeout=60) == 1, (tmp_path / "node.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("started_by", ["main thread", "other thread"])
def test_the_core_exits_when_its_node_is_killed(tmp_path, started_by):
    """Started by the node's main thread the kernel kills the core with its node
    (PR_SET_PDEATHSIG); started by another thread, the core sees its pipe close and stops."""
    script = textwrap.dedent(f"""
        import threading, time
        from ultrakv.node import EngineConfig
        from ultrakv.node.engine_client import EngineClient
        def start():
            client = EngineClient(EngineConfig(model="tiny", device="cpu", num_blocks=64))
            print(client.core_pid, flush=True)
            time.sleep(600)
        if {started_by == "main thread"}:
            start()
        else:
            threading.Thread(target=start).start()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "node.log", "wb"), text=True)
    try:
        core = int(proc.stdout.readline())
        assert not _gone(core)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while not _gone(core) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(core), "the engine core outlived its node"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_core_that_cannot_start_raises_its_error_in_the_node():
    with pytest.raises(FileNotFoundError, match="model must be a preset"):
        EngineClient(EngineConfig(model="no-such-model", device="cpu", num_blocks=16))
