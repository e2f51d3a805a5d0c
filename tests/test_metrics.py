"""Prometheus metrics: the node collector over a real engine, /metrics over HTTP, the
coordinator collector over a ClusterBackend, the --metrics-port flag."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.registry import CollectorRegistry
from ultrakv.client.cli import _node_config, build_parser
from ultrakv.cluster.etcd_server import free_port
from ultrakv.coordinator.metrics import CoordinatorCollector
from ultrakv.coordinator.server import ClusterBackend, CoordinatorSettings
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.metrics import LatencyHistogram, NodeCollector
from ultrakv.node.server import BackgroundServer, ServerSettings

NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def engine() -> Engine:
    eng = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=NUM_BLOCKS, seed=0))
    yield eng
    eng.shutdown()


def _registry(engine: Engine) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(NodeCollector(engine, node_id="n1"))
    return registry


def test_latency_histogram_buckets_follow_le_semantics() -> None:
    h = LatencyHistogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap["buckets"] == [[0.1, 2], [1.0, 3]]  # 0.1 is <= 0.1
    assert snap["count"] == 4 and snap["sum"] == pytest.approx(2.65)
    with pytest.raises(ValueError, match="bounds must be strictly increasing"):
        LatencyHistogram((1.0, 0.5))


def test_node_collector_reads_engine_counters(engine: Engine) -> None:
    registry = _registry(engine)
    labels = {"node": "n1", "model": engine.model_name}

    def value(name: str, **extra: str) -> float:
        got = registry.get_sample_value(name, {**labels, **extra})
        return 0.0 if got is None else got

    before = value("ultrakv_requests_total", finish_reason="length")
    before_e2e = value("ultrakv_e2e_request_latency_seconds_count")
    prompt = list(range(1, 40))  # two full blocks: the repeat hits the prefix cache
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.generate([prompt], params)
    engine.generate([prompt, [7, 8, 9]], params)

    assert value("ultrakv_requests_total", finish_reason="length") == before + 3
    assert value("ultrakv_e2e_request_latency_seconds_count") == before_e2e + 3
    assert value("ultrakv_time_to_first_token_seconds_count") == before_e2e + 3
    assert value("ultrakv_time_per_output_token_seconds_count") == before_e2e + 3
    assert value("ultrakv_time_to_first_token_seconds_bucket", le="+Inf") == before_e2e + 3
    assert value("ultrakv_e2e_request_latency_seconds_sum") > 0
    assert value("ultrakv_prefix_cache_hit_tokens_total") >= 32
    assert value("ultrakv_prefix_cache_hits_total") >= 2
    assert value("ultrakv_prefix_cache_queries_total") >= value("ultrakv_prefix_cache_hits_total")
    assert value("ultrakv_generation_tokens_total") >= 12
    used = value("ultrakv_kv_cache_blocks", state="used")
    free = value("ultrakv_kv_cache_blocks", state="free")
    assert used + free == NUM_BLOCKS
    assert value("ultrakv_kv_cache_usage_ratio") == pytest.approx(used / NUM_BLOCKS)
    assert value("ultrakv_num_requests_running") == 0
    assert value("ultrakv_node_info", device="cpu", dtype=engine.stats()["dtype"],
                 attention_backend=engine.attention_backend) == 1


def test_metrics_over_http_from_node_server(engine: Engine) -> None:
    port = free_port()
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.2, node_id="web-1",
                              metrics_port=port)
    engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0.0))
    with BackgroundServer(engine, settings):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    assert "ultrakv_time_to_first_token_seconds_bucket{" in text
    assert 'node="web-1"' in text
    assert "ultrakv_kv_cache_blocks{" in text


def test_cli_metrics_port_reaches_server_settings() -> None:
    args = build_parser().parse_args(["node", "--model", "tiny", "--metrics-port", "9123"])
    assert _node_config(args, default_device="cpu").server.metrics_port == 9123
    args = build_parser().parse_args(["serve", "--nodes", "2", "--metrics-port", "9123"])
    with pytest.raises(ValueError, match="--metrics-port needs --nodes 1"):
        args.func(args)
    args = build_parser().parse_args(["coordinator", "--etcd", "x:1", "--metrics-port", "9"])
    assert args.metrics_port == 9


def test_coordinator_collector_exposes_counters() -> None:
    backend = ClusterBackend(CoordinatorSettings(etcd="127.0.0.1:2379"))
    backend.counters.forwarded("n1", "ok")
    backend.counters.forwarded("n1", "ok")
    backend.counters.forwarded("n2", "node_failed")
    backend.counters.retried("resume")
    backend.counters.moved(live=True, ok=True, kv_tokens=48)
    backend.counters.routed("prefix")
    backend.counters.stood_in("served")
    registry = CollectorRegistry()
    registry.register(CoordinatorCollector(backend))
    get = registry.get_sample_value
    assert get("ultrakv_coordinator_forwarded_requests_total",
               {"node": "n1", "outcome": "ok"}) == 2
    assert get("ultrakv_coordinator_forwarded_requests_total",
               {"node": "n2", "outcome": "node_failed"}) == 1
    assert get("ultrakv_coordinator_retries_total", {"kind": "resume"}) == 1
    assert get("ultrakv_coordinator_retries_total", {"kind": "retry"}) == 0
    assert get("ultrakv_coordinator_session_moves_total", {"mode": "live", "result": "ok"}) == 1
    assert get("ultrakv_coordinator_moved_kv_tokens_total") == 48
    assert get("ultrakv_coordinator_sessionless_routes_total", {"choice": "prefix"}) == 1
    assert get("ultrakv_coordinator_sessionless_routes_total", {"choice": "spread"}) == 0
    assert get("ultrakv_coordinator_stand_in_turns_total", {"outcome": "served"}) == 1
    assert get("ultrakv_coordinator_stand_in_turns_total", {"outcome": "fell_back"}) == 0
    assert get("ultrakv_coordinator_block_index_resyncs_total") == 0
    assert get("ultrakv_coordinator_ring_nodes") == 0
    assert get("ultrakv_coordinator_ring_epoch") == backend.ring.epoch
    assert get("ultrakv_coordinator_nodes", {"state": "serving"}) == 0
    assert get("ultrakv_coordinator_pending_session_moves") == 0
