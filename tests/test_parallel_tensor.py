"""Tensor parallelism on CPU: two gloo ranks (this process and one worker process it starts)
give the single-process engine's greedy tokens on ``tiny`` and transformers' on a saved Qwen2
checkpoint; session KV leaves and enters the split cache with every head in place; bad sizes
are refused with the field named."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
from hf_reference import assert_greedy_matches, build_checkpoint, hf_greedy
from processes import alive, children
from ultrakv.client import Client
from ultrakv.client.client import RequestError
from ultrakv.cluster.etcd_server import free_port
from ultrakv.cluster.session_state import SessionState
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.model.presets import preset_config
from ultrakv.node.parallel.sharding import (
    TensorShard,
    check_divisible,
    kv_head_slice,
    shard_checkpoint_tensor,
    shard_config,
    shard_parameter,
)
from ultrakv.node.parallel.tensor_parallel import tensor_parallel_devices

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
# A long prompt (chunked over several steps by the 48-token budget), a short one, a repetitive one.
PROMPTS = [list(range(5, 100)), [1, 2, 3], [200, 13, 77, 4, 150]]


def _config(**kw) -> EngineConfig:
    # Multi-step decode rounds and chunked prefill go through the broadcast path too.
    return EngineConfig(device="cpu", num_blocks=96, max_num_batched_tokens=48, num_scheduler_steps=3, **kw)


@pytest.fixture(scope="module")
def tiny_pair():
    single = Engine(_config(model="tiny"))
    split = Engine(_config(model="tiny", tensor_parallel_size=2))
    yield single, split
    split.shutdown()
    single.shutdown()
    assert all(p.poll() is not None for p in split.tensor_parallel._procs)


# -- pure sharding --------------------------------------------------------------------------


def test_shard_config_divides_heads_and_mlp():
    full = preset_config("llama-8b")
    half = shard_config(full, 2)
    assert (half.num_attention_heads, half.num_key_value_heads, half.intermediate_size) == (16, 4, 7168)
    assert half.hidden_size == full.hidden_size and half.head_dim == full.head_dim


def test_sizes_that_do_not_divide_are_refused_by_name():
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 must divide the model's num_attention_heads \(4\)"):
        check_divisible(preset_config("tiny"), 3)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(2\)"):
        check_divisible(preset_config("tiny"), 4)  # 4 query heads divide, 2 KV heads do not
    with pytest.raises(ValueError, match=r"tensor_parallel_size must be in \[1, 64\], got 0"):
        EngineConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match=r"tensor_parallel_size must be 1 with the CPU or disk KV tier"):
        EngineConfig(tensor_parallel_size=2, kv_cpu_gib=1.0)
    with pytest.raises(ValueError, match=r"tensor_parallel_size must be 1 with a quantized kv_cache_dtype"):
        EngineConfig(tensor_parallel_size=2, kv_cache_dtype="int8")


def test_tensor_parallel_size_beyond_the_devices_is_refused():
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 needs 2 CUDA devices from cuda:0, "
                                         r"this machine has \d+"):
        tensor_parallel_devices(torch.device("cuda", max(0, torch.cuda.device_count() - 1)), 2)


def test_engine_refuses_heads_that_do_not_divide_before_starting_workers():
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide"):
        Engine(_config(model="tiny", tensor_parallel_size=3))


def test_fused_projections_split_per_part():
    cfg = preset_config("tiny")  # q 64 rows, k 32, v 32
    full = torch.arange(cfg.q_size + 2 * cfg.kv_size, dtype=torch.float32)[:, None].expand(-1, 3)
    r0, r1 = (shard_parameter("model.layers.0.self_attn.qkv_proj.weight", full, cfg, TensorShard(r, 2))
              for r in range(2))
    # Rank 1 holds the second half of q, then of k, then of v.
    assert r1[:, 0].tolist() == [*range(32, 64), *range(80, 96), *range(112, 128)]
    assert torch.cat([r0, r1]).sort(dim=0).values.equal(full)
    bias = torch.ones(5)
    assert shard_checkpoint_tensor("model.layers.0.self_attn.o_proj.bias", bias, TensorShard(0, 2)).equal(bias)
    assert not shard_checkpoint_tensor("model.layers.0.self_attn.o_proj.bias", bias, TensorShard(1, 2)).any()
    down = torch.randn(4, 6)
    assert shard_checkpoint_tensor("model.layers.1.mlp.down_proj.weight", down, TensorShard(1, 2)).equal(down[:, 3:])
    assert kv_head_slice(8, TensorShard(3, 4)) == slice(6, 8)


# -- two gloo ranks -------------------------------------------------------------------------


@pytest.mark.cluster
def test_tiny_greedy_equals_the_single_process_engine(tiny_pair):
    single, split = tiny_pair
    assert split.tensor_parallel is not None and split.kv_caches[0].shape[3] == 1  # one of 2 KV heads
    want = [o.token_ids for o in single.generate(PROMPTS, GREEDY)]
    got = [o.token_ids for o in split.generate(PROMPTS, GREEDY)]
    assert got == want
    assert split.stats()["tokens"]["steps"] > len(PROMPTS)


@pytest.mark.cluster
def test_session_kv_gathers_and_spreads_every_head(tiny_pair):
    single, split = tiny_pair
    prompt = list(range(30, 90))
    for engine in (single, split):
        engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0), session_ids=["kv"])
    want, got = single.export_session("kv"), split.export_session("kv")
    assert got.kv.shape == want.kv.shape == (2, 2, 48, 2, 16)  # both KV heads, 3 blocks
    torch.testing.assert_close(got.kv, want.kv, rtol=1e-5, atol=1e-5)
    # Written into the split cache (each rank its head) and read back: bit-exact. The
    # cache is emptied first, or the equal prefix already cached would be kept instead.
    split.clear_cache()
    moved = SessionState(session_id="moved", token_ids=want.token_ids, turns=1,
                         model_fingerprint=split.model_fingerprint, kv_tokens=want.kv_tokens, kv=want.kv)
    assert split.import_session(moved) == 48
    assert torch.equal(split.export_session("moved").kv, want.kv)
    # The next turn continues from the imported cache and still matches.
    turn = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    a = single.generate([[5, 6, 7]], turn, session_ids=["kv"])[0]
    b = split.generate([[5, 6, 7]], turn, session_ids=["moved"])[0]
    assert b.cached_tokens == 48 and b.token_ids == a.token_ids


@pytest.mark.cluster
def test_qwen2_checkpoint_greedy_equals_transformers(tmp_path_factory):
    pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("qwen2-tp")
    hf = build_checkpoint("qwen2", path)  # q/k/v biases: sharded with their rows
    split = Engine(_config(model=str(path), tensor_parallel_size=2))
    try:
        prompts = [list(range(10, 70)), [256, 3, 99, 14]]  # one batch, chunked and short
        outs = split.generate(prompts, GREEDY)
        for prompt, out in zip(prompts, outs, strict=True):
            ref, ref_logits = hf_greedy(hf, prompt, GREEDY.max_tokens)
            assert_greedy_matches(out.token_ids, ref, ref_logits)
    finally:
        split.shutdown()


# -- a node process serving with tensor parallelism -------------------------------------------


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_a_node_serving_with_two_ranks_answers_and_leaves_no_worker_behind(stop):
    """``ultrakv node --tensor-parallel-size 2`` as a user starts it: requests over gRPC get
    the single engine's tokens, a session's next turn reuses its cache; stopped (SIGTERM) or
    killed (SIGKILL), the node leaves no worker rank running."""
    port = free_port()
    node = subprocess.Popen([sys.executable, "-m", "ultrakv.client.cli", "node", "--model", "tiny",
                             "--device", "cpu", "--port", str(port), "--tensor-parallel-size", "2",
                             "--insecure-no-cluster-secret"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        spec = {"token_ids": list(range(5, 60)), "session_id": "tp", "max_length": 8, "temperature": 0.0,
                "ignore_eos": True}
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 300  # a loaded machine takes long to import two processes
            while True:
                assert node.poll() is None, node.stderr.read()
                try:
                    client.stats()
                    break
                except RequestError:
                    assert time.monotonic() < deadline, "node not ready in 300 s"
                    time.sleep(0.5)
            first = client.process_request(spec)
            second = client.process_request({**spec, "token_ids": [7, 8, 9]})
        single = Engine(_config(model="tiny"))
        try:
            want = single.generate([spec["token_ids"]], replace(GREEDY, max_tokens=8), session_ids=["tp"])[0]
            want_next = single.generate([[7, 8, 9]], replace(GREEDY, max_tokens=8), session_ids=["tp"])[0]
        finally:
            single.shutdown()
        assert first["success"] and first["response"]["token_ids"] == want.token_ids
        assert second["response"]["token_ids"] == want_next.token_ids and second["cached_tokens"] > 0
        workers = list(children(node.pid))
        assert len(workers) == 1, workers  # rank 1
        node.send_signal(stop)
        node.wait(timeout=120)
        # SIGKILL leaves the worker to notice its parent is gone (it polls once a second).
        assert all(_gone(w, timeout=60) for w in workers), workers
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()


@pytest.mark.timeout(300)
def test_an_error_on_rank_0_after_a_command_breaks_the_group_instead_of_hanging(monkeypatch):
    """Rank 0 fails inside a forward it has already broadcast: the worker waits in a
    collective that rank 0 will never join. Before, the engine failed that step and carried
    on, and the next request hung (gloo) out of step. Now the group is broken for good: the
    worker is ended, later requests fail at once naming why, and the engine reports no
    progress (the node turns NOT_SERVING)."""
    from ultrakv.node.model import llama

    split = Engine(_config(model="tiny", tensor_parallel_size=2))
    try:
        forward = llama.MLP.forward
        calls = []

        def failing_once(self, h):
            calls.append(1)
            if len(calls) == 2:  # rank 0's second layer of its first forward (this process only)
                raise RuntimeError("injected rank-0 failure")
            return forward(self, h)

        split.generate([[9, 8, 7, 6] * 10], GREEDY, session_ids=["kept"])  # a session from before
        monkeypatch.setattr(llama.MLP, "forward", failing_once)
        first = split.generate([[1, 2, 3]], GREEDY)[0]
        assert first.finish_reason == "error" and "injected rank-0 failure" in first.error
        started = time.monotonic()
        second = split.generate([[5, 6, 7, 8]], GREEDY)[0]  # hung before
        assert time.monotonic() - started < 60
        assert second.finish_reason == "error" and "tensor-parallel group broken" in second.error
        assert split.seconds_without_progress() == float("inf")
        worker = split.tensor_parallel._procs[0]
        assert worker.wait(timeout=60) is not None  # ended
        # Its sessions can still leave, as history (the other ranks' heads are gone).
        state = split.export_session("kept")
        assert state.token_ids[:4] == [9, 8, 7, 6] and state.kv is None and state.kv_tokens == 0
    finally:
        split.shutdown()


def test_the_graph_commands_reach_a_worker_as_sent():
    """The commands that keep CUDA graphs in step across ranks, through a real gloo pair (two
    threads of this process): a worker decodes the graph plan, the capture, a greedy round's
    inputs with its first chunk of steps, and a later chunk, as rank 0 sent them."""
    from concurrent.futures import ThreadPoolExecutor

    from ultrakv.node.attention.base import AttentionMetadata
    from ultrakv.node.parallel import step_protocol
    from ultrakv.node.parallel.process_group import ProcessGroup, host_store, join_store
    from ultrakv.node.parallel.step_protocol import GraphPlan, Op

    store = host_store()
    meta = AttentionMetadata(query_start_loc=torch.arange(4, dtype=torch.int32),
                             seq_lens=torch.tensor([9, 17, 33], dtype=torch.int32),
                             block_tables=torch.arange(12, dtype=torch.int32).view(3, 4),
                             slot_mapping=torch.tensor([8, 16, 32]), max_query_len=1, max_seq_len=33)
    ids, positions = torch.tensor([5, 6, 7]), torch.tensor([8, 16, 32])
    plan = GraphPlan(max_batch=64, max_model_len=4096, max_prefill_tokens=512, greedy=True)

    def rank0() -> None:
        group = ProcessGroup(store, "graphs", 0, 2, torch.device("cpu"))
        step_protocol.send_graphs(group, plan)
        step_protocol.send_capture(group)
        step_protocol.send_forward(group, ids, positions, meta, Op.DECODE_ROUND, 3)
        step_protocol.send_continue(group, 2)
        step_protocol.send_stop(group)

    def rank1() -> list:
        # A store client of its own: two threads sharing one client's blocking reads hung
        # the pair's setup now and then.
        group = ProcessGroup(join_store("127.0.0.1", store.port), "graphs", 1, 2, torch.device("cpu"))
        got = []
        while not got or got[-1].op != Op.STOP:
            got.append(step_protocol.receive(group, (2, 16, 2, 8), torch.float32))
        return got

    with ThreadPoolExecutor(2) as pool:
        sent, received = pool.submit(rank0), pool.submit(rank1)
        sent.result(timeout=120)
        got = received.result(timeout=120)
    assert [c.op for c in got] == [Op.GRAPHS, Op.CAPTURE, Op.DECODE_ROUND, Op.CONTINUE, Op.STOP]
    assert got[0].plan == plan
    round_ = got[2]
    assert round_.num_steps == 3 and torch.equal(round_.input_ids, ids) and torch.equal(round_.positions, positions)
    assert torch.equal(round_.meta.block_tables, meta.block_tables) and round_.meta.max_seq_len == 33
    assert torch.equal(round_.meta.seq_lens, meta.seq_lens) and torch.equal(round_.meta.slot_mapping, meta.slot_mapping)
    assert got[3].num_steps == 2
