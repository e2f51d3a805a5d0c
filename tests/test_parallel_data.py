"""Data parallel inside a node, on CPU: two engines in one process (``gpus="2"`` with device
cpu), sessions placed by consistent hashing with bounded load and kept where their KV is,
per-device stats and metrics, and a session moved between engines with its KV bit-exact."""

from __future__ import annotations

import pytest
import torch
from prometheus_client.registry import CollectorRegistry
from ultrakv.cluster.errors import SessionNotFoundError
from ultrakv.cluster.ring import HashRing, bounded_capacity
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.metrics import NodeCollector
from ultrakv.node.parallel.data_parallel import EngineGroup, _merge, data_parallel_devices, open_engine

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _config(**kw) -> EngineConfig:
    return EngineConfig(model="tiny", device="cpu", num_blocks=128, **kw)


@pytest.fixture(scope="module")
def group():
    g = open_engine(_config(gpus="2"))
    yield g
    g.shutdown()


def test_gpus_spec_is_validated_with_the_field_named():
    for bad in ("0", "two", "1,", "-1"):
        with pytest.raises(ValueError, match="gpus must be 'all', a device count N >= 1 or device indices"):
            EngineConfig(gpus=bad)
    with pytest.raises(ValueError, match="gpus must be empty with tensor_parallel_size > 1"):
        EngineConfig(gpus="2", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="gpus must be a count N with device cpu"):
        data_parallel_devices("0,1", "cpu")
    assert data_parallel_devices("3", "cpu") == [torch.device("cpu")] * 3
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device must be 'cpu' or 'auto' on a machine without CUDA"):
            data_parallel_devices("all", "cuda")


def test_a_single_engine_without_gpus():
    assert not isinstance(open_engine(EngineConfig(model="tiny", device="cpu", num_blocks=8)), EngineGroup)


def test_sessions_spread_with_bounded_load_and_stay_put(group):
    ids = [f"user-{i}" for i in range(40)]
    placed = {sid: group.gpu_of(sid) for sid in ids}
    loads = [list(placed.values()).count(g) for g in group.gpu_ids]
    # Never more than ceil((1 + eps) * (n + 1) / 2) on one device.
    ring = HashRing(group.gpu_ids)
    assert max(loads) <= bounded_capacity(ring, "0", len(ids) - 1, 0.25)
    assert min(loads) > 0
    assert all(group.gpu_of(sid) == gpu for sid, gpu in placed.items())  # sticky


def test_turns_go_to_the_sessions_engine_and_match_one_engine(group):
    single = Engine(_config())
    try:
        sids = ["a", "b", "c", "d"]
        prompts = [[10 + i, 20, 30, 40] * 5 for i in range(4)]
        want = single.generate(prompts, GREEDY, session_ids=sids)
        got = group.generate(prompts, GREEDY, session_ids=sids)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert {group.gpu_of(s) for s in sids} == {"0", "1"}  # both engines served
        # The second turn finds its history (and KV) on the same engine.
        second = group.generate([[1, 2, 3]] * 4, GREEDY, session_ids=sids)
        assert all(o.cached_tokens >= 16 for o in second)
        for sid in sids:
            owner = group.engines[int(group.gpu_of(sid))]
            other = group.engines[1 - int(group.gpu_of(sid))]
            assert owner.get_session(sid).turns == 2
            with pytest.raises(SessionNotFoundError):
                other.get_session(sid)
    finally:
        single.shutdown()


def test_per_gpu_stats_and_metrics(group):
    group.generate([[5, 6, 7, 8]] * 3, GREEDY, session_ids=["m1", "m2", "m3"])
    stats = group.stats()
    per = stats["gpus"]
    assert [g["gpu"] for g in per] == ["0", "1"] and all("utilization" not in g for g in per)  # no NVML on CPU
    assert sum(g["sessions"] for g in per) == stats["sessions"]["count"]
    assert stats["cache"]["num_blocks"] == 256  # two pools of 128
    assert stats["tokens"]["generated"] == sum(e.stats()["tokens"]["generated"] for e in group.engines)
    group.generate([[9, 9, 9]], GREEDY, session_ids=["m1"])
    assert group.stats()["gpus"][int(group.gpu_of("m1"))]["tokens_per_s"] > 0
    registry = CollectorRegistry()
    registry.register(NodeCollector(group, "n1"))
    usage = {s.labels["gpu"]: s.value for m in registry.collect() for s in m.samples
             if s.name == "ultrakv_gpu_kv_cache_usage_ratio"}
    assert set(usage) == {"0", "1"} and all(0 <= v <= 1 for v in usage.values())


def test_merge_adds_counters_and_buckets_and_keeps_the_worst_latency():
    a = {"tokens": {"generated": 3}, "latency": {"ttft_p99_s": 0.5}, "model": "tiny",
         "histograms": {"ttft_s": {"buckets": [[0.1, 1], [1.0, 2]], "sum": 0.3, "count": 2}},
         "cache": {"hits": 1, "misses": 3, "hit_rate": 0.25}}
    b = {"tokens": {"generated": 4}, "latency": {"ttft_p99_s": 0.9}, "model": "tiny",
         "histograms": {"ttft_s": {"buckets": [[0.1, 0], [1.0, 5]], "sum": 2.0, "count": 5}},
         "cache": {"hits": 3, "misses": 1, "hit_rate": 0.75}}
    m = _merge([a, b])
    assert m["tokens"]["generated"] == 7 and m["latency"]["ttft_p99_s"] == 0.9 and m["model"] == "tiny"
    assert m["histograms"]["ttft_s"] == {"buckets": [[0.1, 1], [1.0, 7]], "sum": 2.3, "count": 7}
    assert m["cache"]["hit_rate"] == 0.5


def test_merge_takes_keys_only_some_engines_have():
    # Counts keyed by name differ between engines: one saw only "length" finishes, the other
    # only "error" (the 2-GPU run's stats raised TypeError summing 4 and None).
    m = _merge([{"finished": {"length": 4}}, {"finished": {"error": 4}, "new": 1}])
    assert m == {"finished": {"length": 4, "error": 4}, "new": 1}


def test_move_session_carries_its_kv_bit_exact(group):
    sid = "mover"
    group.generate([list(range(40, 90))], GREEDY, session_ids=[sid])
    src = group.gpu_of(sid)
    dst = "1" if src == "0" else "0"
    before = group.export_session(sid)
    assert group.move_session(sid, dst) == before.kv_tokens == 48
    assert group.gpu_of(sid) == dst
    with pytest.raises(SessionNotFoundError):
        group.engines[int(src)].get_session(sid)
    after = group.engines[int(dst)].export_session(sid)
    assert after.token_ids == before.token_ids and torch.equal(after.kv, before.kv)
    nxt = group.generate([[1, 2]], GREEDY, session_ids=[sid])[0]
    assert nxt.cached_tokens == 48


def test_a_node_server_over_the_group_serves_sessions_and_stats(group):
    from ultrakv.client import Client
    from ultrakv.node.server import BackgroundServer

    with BackgroundServer(group) as srv, Client(srv.address, timeout=60) as c:
        first = c.process_request({"text": "Hello there, a prompt long enough for two blocks",
                                   "max_length": 4, "temperature": 0.0, "session_id": "wire-1"})
        second = c.process_request({"text": " again", "max_length": 4, "temperature": 0.0,
                                    "session_id": "wire-1"})
        assert first["success"] and second["success"] and second["cached_tokens"] > 0
        engine = group.engines[int(group.gpu_of("wire-1"))]
        assert engine.get_session("wire-1").turns == 2
        stats = c.stats()
        assert "gpus" in str(stats)
