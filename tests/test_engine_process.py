"""A node whose engine runs in a process of its own (``engine_process``, node/engine_core.py).

The client-facing tests of test_wire_server.py run here again over an EngineClient (the
same assertions: streaming and its token ids, sessions and their cached prefix, batches,
cancel, disconnect and deadline aborts, refusals naming the field); then what only a
separate process can do: a session moved between an in-process node and a core-process
node continues identically, the node fails fast when its core dies, and the core does not
outlive its node.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
from processes import alive
from test_engine_api import (  # noqa: F401  (over the core process's proxy table)
    test_two_tenants_run_and_abort_the_same_request_id_apart,
)
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
from ultrakv.client.client import RequestError, RetryPolicy
from ultrakv.client.local_cluster import ClusterSpec, LocalCluster
from ultrakv.cluster.block_hashing import hash_token_blocks
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.engine_client import EngineClient
from ultrakv.node.outputs import GenerateRequest, StreamDelta
from ultrakv.node.server import BackgroundServer, ServerSettings

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


async def test_a_steps_deltas_for_every_stream_cross_in_one_message(engine):
    """16 streams of 24 tokens: every token arrives, in order, in no more messages than the
    engine ran steps (not one per token or per stream)."""
    n, tokens = 16, 24
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    got: dict[str, list[int]] = {f"fan-{i}": [] for i in range(n)}
    done = asyncio.Event()
    finished: list[str] = []

    def on_delta(delta: StreamDelta) -> None:
        got[delta.request_id].extend(delta.token_ids)
        if delta.finished:
            finished.append(delta.request_id)
            if len(finished) == n:
                done.set()

    steps0, messages0 = engine.stats()["tokens"]["steps"], engine.delta_messages
    for i in range(n):
        engine.stream_to(GenerateRequest(prompt=[3 + i, 5, 7, 11], sampling=params,
                                         request_id=f"fan-{i}"), on_delta)
    await asyncio.wait_for(done.wait(), 60)
    steps = engine.stats()["tokens"]["steps"] - steps0
    assert all(len(ids) == tokens for ids in got.values())
    assert engine.delta_messages - messages0 <= steps < n * tokens


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


def test_a_wedged_core_counts_as_making_no_progress(engine, monkeypatch):
    """A core that does not answer (stopped here with SIGSTOP) reads as infinitely stalled,
    so the node reports NOT_SERVING; once it answers again, its own figure is back."""
    from ultrakv.node import engine_client

    monkeypatch.setattr(engine_client, "PROGRESS_TIMEOUT_S", 0.5)
    os.kill(engine.core_pid, signal.SIGSTOP)
    try:
        assert engine.seconds_without_progress() == math.inf
    finally:
        os.kill(engine.core_pid, signal.SIGCONT)
    assert engine.seconds_without_progress() < math.inf


def test_a_core_busy_with_long_control_calls_still_says_how_it_progresses(engine, monkeypatch):
    """Long control calls (exports of big sessions, batch generates) holding every control
    thread of the core must not make a core whose engine moves read as stalled (before, the
    progress question queued behind them and timed out: NOT_SERVING for a healthy node)."""
    from concurrent.futures import ThreadPoolExecutor

    from ultrakv.node import engine_client
    from ultrakv.node.engine_core import CONTROL_THREADS

    monkeypatch.setattr(engine_client, "PROGRESS_TIMEOUT_S", 2.0)
    params = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)
    with ThreadPoolExecutor(CONTROL_THREADS + 1) as pool:
        long_calls = [pool.submit(engine.generate, [[3, 5, 7 + i]], params)
                      for i in range(CONTROL_THREADS + 1)]
        deadline = time.monotonic() + 30
        while len(engine._calls) <= CONTROL_THREADS and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.seconds_without_progress() < math.inf
        assert all(not call.done() for call in long_calls)  # they held the threads meanwhile
        assert [len(call.result(300)[0].token_ids) for call in long_calls] == [1500] * 5


def _core_of(node_pid: int) -> int:
    """The pid of the node's engine core (its child started by multiprocessing's spawn)."""
    for child in Path(f"/proc/{node_pid}/task/{node_pid}/children").read_text().split():
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
            return int(child)
    raise AssertionError(f"node {node_pid} has no engine core process")


def _torch_loaded(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_a_stream_moves_to_another_node_when_its_nodes_core_dies(tmp_path):
    """Through a coordinator: SIGKILL the core of the node serving a stream; its request
    ends there UNAVAILABLE on ``node``, which the coordinator takes as the node failing (not
    as the request's error: before, the client got the error), so the stream resumes on the
    other node with the same tokens; the node without a core exits 1."""
    spec = ClusterSpec(nodes=2, coordinators=1, data_dir=tmp_path, port=0, device="cpu",
                       num_blocks=256, checkpoint_interval_s=3600.0, log_dir=tmp_path / "logs",
                       node_args=["--engine-process"])
    request = {"text": "count", "max_length": 300, "temperature": 0.0, "ignore_eos": True}
    with LocalCluster(spec) as cluster, Client(cluster.address, timeout=120) as c:
        # A node with a core has torch loaded once it serves: the first tensor from its core
        # (a checkpoint's KV) must not import it on the reader thread, under every stream.
        assert all(_torch_loaded(n.pid) for n in cluster.nodes.values())
        want = c.process_request(request)["response"]["token_ids"]
        ids: list[int] = []
        victim, result = None, None
        for chunk in c.stream(request):
            ids.extend(chunk.token_ids)
            if victim is None and ids:
                victim = next(n["node_id"] for n in c.stats()["nodes"] if n["running"])
                os.kill(_core_of(cluster.nodes[victim].pid), signal.SIGKILL)
            if chunk.finished:
                result = chunk.result
        assert result is not None and result["success"], result
        assert result["node"] != victim and ids == want
        assert cluster.nodes[victim].wait(timeout=60) == 1


@pytest.mark.gpu
def test_a_cuda_node_runs_its_engine_in_a_core_process_by_default(tmp_path):
    """On CUDA with no flag a node's engine is a core process (the default for one CUDA
    engine); a request through a coordinator gets the in-process CUDA engine's greedy tokens."""
    import torch
    from ultrakv.node import Engine, SamplingParams

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    prompt = list(range(1, 40))
    engine = Engine(EngineConfig(model="tiny", device="cuda", num_blocks=256))
    want = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0].token_ids
    engine.shutdown()
    spec = ClusterSpec(nodes=1, coordinators=1, data_dir=tmp_path, port=0, device="cuda", num_blocks=256,
                       checkpoint_interval_s=3600.0, log_dir=tmp_path / "logs")
    with LocalCluster(spec) as cluster, Client(cluster.address, timeout=300) as c:
        node = next(iter(cluster.nodes.values()))
        assert alive(_core_of(node.pid))
        out = c.process_request({"token_ids": prompt, "max_length": 24, "temperature": 0.0, "ignore_eos": True})
        assert out["response"]["token_ids"] == want


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
        assert alive(core)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 30
        while alive(core) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not alive(core), "the engine core outlived its node"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_sigterm_to_the_nodes_process_group_leaves_the_stopping_to_the_node(tmp_path):
    """systemd (and ``kill -TERM -PGID``) signal every process of the node's group at once:
    the core leaves the stopping to its node, which drains and stops it, instead of dying
    at once and failing the node's requests (before, SIGTERM killed the core: the node then
    failed its running requests UNAVAILABLE and exited 1)."""
    script = textwrap.dedent("""
        import signal, sys, threading
        from ultrakv.node import EngineConfig, SamplingParams
        from ultrakv.node.engine_client import EngineClient
        if __name__ == "__main__":
            terminated = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: terminated.set())
            client = EngineClient(EngineConfig(model="tiny", device="cpu", num_blocks=64))
            print("ready", flush=True)
            terminated.wait(120)
            try:  # the node drains: a request still runs on its core
                out = client.generate(["still there?"], SamplingParams(max_tokens=4, temperature=0.0))
                print("generated", len(out[0].token_ids), flush=True)
            except Exception as exc:
                print("failed", type(exc).__name__, exc, flush=True)
            client.shutdown()
            print("lost", client.lost_reason, flush=True)
    """)
    path = tmp_path / "node_like.py"
    path.write_text(script)
    proc = subprocess.Popen([sys.executable, str(path)], stdout=subprocess.PIPE,
                            stderr=open(tmp_path / "node.log", "wb"), text=True,
                            start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert out.split("\n")[:2] == ["generated 4", "lost stopped"], out
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_engine_process_is_a_config_key_and_a_flag_on_by_default_for_one_cuda_engine(tmp_path):
    from ultrakv.client.cli import _node_config, build_parser

    parser = build_parser()
    assert not _node_config(parser.parse_args(["node"]), "cpu").engine.wants_engine_process()
    assert _node_config(parser.parse_args(["node", "--device", "cuda"]), "cpu").engine.wants_engine_process()
    assert not _node_config(parser.parse_args(["node", "--device", "cuda", "--no-engine-process"]),
                            "cpu").engine.wants_engine_process()
    assert _node_config(parser.parse_args(["node", "--engine-process"]), "cpu").engine.wants_engine_process()
    assert not EngineConfig(device="cuda", gpus="2").wants_engine_process()
    assert not EngineConfig(device="cuda", tensor_parallel_size=2).wants_engine_process()
    config = tmp_path / "node.yaml"
    config.write_text("engine:\n  engine_process: true\n")
    from_file = parser.parse_args(["serve", "--config", str(config)])
    assert _node_config(from_file, "cpu").engine.wants_engine_process()
    config.write_text("engine:\n  device: cuda\n  engine_process: false\n")
    assert not _node_config(parser.parse_args(["serve", "--config", str(config)]), "cpu").engine.wants_engine_process()
    with pytest.raises(ValueError, match="engine_process must be false with gpus"):
        EngineConfig(engine_process=True, gpus="2")


def test_engine_process_takes_true_false_or_null_only(tmp_path):
    """A config file's ``engine_process: auto`` or ``"false"`` is refused naming the key:
    before, any such string counted as true (a core process on the CPU, or against the
    operator's "false")."""
    from ultrakv.client.config_file import load_config

    for value in ('auto', '"false"', "1"):
        path = tmp_path / "node.yaml"
        path.write_text(f"engine:\n  engine_process: {value}\n")
        with pytest.raises(ValueError, match="engine_process must be true, false or null"):
            load_config(path)
    assert EngineConfig(engine_process=None).engine_process is None


def test_a_core_that_cannot_start_raises_its_error_in_the_node():
    with pytest.raises(FileNotFoundError, match="model must be a preset"):
        EngineClient(EngineConfig(model="no-such-model", device="cpu", num_blocks=16))


def test_stats_of_a_wedged_core_fail_unavailable_instead_of_hanging(monkeypatch):
    """A Stats call (and so a metrics scrape) on a node whose core is stopped (SIGSTOP) gets
    UNAVAILABLE on field ``node`` after STATS_TIMEOUT_S instead of holding its thread, and
    the caller's deadline, for as long as the core stays stopped."""
    from ultrakv.node import engine_client

    monkeypatch.setattr(engine_client, "STATS_TIMEOUT_S", 1.0)
    core = EngineClient(replace(CONFIG, num_blocks=32))
    try:
        with BackgroundServer(core, ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.5)) as srv, \
                Client(srv.address, timeout=60, retry=RetryPolicy(attempts=1)) as c:
            assert c.stats()["nodes"]
            os.kill(core.core_pid, signal.SIGSTOP)
            try:
                with pytest.raises(RequestError, match="UNAVAILABLE") as err:
                    c.stats()
                assert "did not answer within 1 s" in str(err.value)
            finally:
                os.kill(core.core_pid, signal.SIGCONT)
            assert c.stats()["nodes"]  # answered again once the core runs
    finally:
        core.shutdown()


def test_a_wedged_core_turns_the_node_not_serving_while_calls_on_it_hang(monkeypatch):
    """Calls on a wedged core (SIGSTOP) never return, each holding one of the event loop's
    worker threads: more of them than the loop has threads must not keep the progress watch
    from running, or the node would report SERVING for as long as the core stays wedged."""
    from concurrent.futures import ThreadPoolExecutor

    from ultrakv.node import engine_client

    monkeypatch.setattr(engine_client, "PROGRESS_TIMEOUT_S", 2.0)

    core = EngineClient(replace(CONFIG, num_blocks=32))
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.5, stall_timeout_s=4.0)  # watched every second
    try:
        with BackgroundServer(core, settings) as srv, \
                Client(srv.address, timeout=30, retry=RetryPolicy(attempts=1)) as c:
            assert c.health()["status"] == "SERVING"
            os.kill(core.core_pid, signal.SIGSTOP)
            try:
                workers = min(32, (os.cpu_count() or 1) + 4) + 2  # asyncio.to_thread's pool, and more
                with Client(srv.address, timeout=1, retry=RetryPolicy(attempts=1)) as quick, \
                        ThreadPoolExecutor(workers) as pool:
                    stuck = [pool.submit(quick.stats) for _ in range(workers)]
                    for call in stuck:
                        with pytest.raises(RequestError, match="DEADLINE_EXCEEDED"):
                            call.result(30)  # the node's thread stays blocked
                deadline = time.monotonic() + 30
                while c.health()["status"] == "SERVING" and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert c.health()["status"] == "NOT_SERVING"
            finally:
                os.kill(core.core_pid, signal.SIGCONT)
    finally:
        core.shutdown()
