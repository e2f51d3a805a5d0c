"""Prometheus metrics of a node, read from ``Engine.stats()`` at scrape time.

Nothing here runs on the serving path except :meth:`LatencyHistogram.observe` (a bisect and
two additions per finished request). The collector builds metric families from one
``stats()`` snapshot per scrape, so the engine keeps plain counters and pays nothing for
Prometheus::

    registry = CollectorRegistry()
    registry.register(NodeCollector(engine, node_id="node-1"))
    serve_metrics(9100, registry)  # http://host:9100/metrics
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from ultrakv.cluster.rejections import REJECTIONS

log = logging.getLogger("ultrakv.node.metrics")

# vLLM's bucket edges (seconds), with finer low edges: a CPU or small model answers in ms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)


class LatencyHistogram:
    """Counts of observations per fixed bucket plus their sum; O(1) observe, no allocation.

    ``counts[i]`` holds observations ``<= bounds[i]`` and ``> bounds[i-1]`` (Prometheus
    ``le`` semantics); the last slot holds those above every bound.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"bounds must be strictly increasing, got {bounds}")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> dict[str, Any]:
        """``{"buckets": [[le, cumulative count], ...], "sum": s, "count": n}``; ``count``
        is the ``+Inf`` bucket (kept out of the list so the dict stays JSON-safe)."""
        buckets, total = [], 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            total += count
            buckets.append([bound, total])
        return {"buckets": buckets, "sum": self.sum, "count": total + self.counts[-1]}


def histogram_family(name: str, doc: str, labels: dict[str, str],
                     snapshot: dict[str, Any]) -> HistogramMetricFamily:
    """A HistogramMetricFamily from a :meth:`LatencyHistogram.snapshot`."""
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    buckets = [(_le(b), float(c)) for b, c in snapshot["buckets"]]
    buckets.append(("+Inf", float(snapshot["count"])))
    family.add_metric(list(labels.values()), buckets, snapshot["sum"])
    return family


def _le(bound: float) -> str:
    return repr(float(bound))


def _counter(name: str, doc: str, labels: dict[str, str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _gauge(name: str, doc: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class NodeCollector(Collector):
    """``ultrakv_*`` metrics of one engine, labelled ``node`` and ``model``."""

    def __init__(self, engine: Any, node_id: str | Callable[[], str],
                 replication: Callable[[], Any] | None = None) -> None:
        """``replication``: the node's ``ReplicationStats`` now (None outside a cluster)."""
        self.engine = engine
        self._node_id = node_id
        self._replication = replication

    def collect(self) -> Iterator[Metric]:
        s = self.engine.stats()
        node = self._node_id() if callable(self._node_id) else self._node_id
        base = {"node": node, "model": str(s["model"])}
        req, tok, cache, hist = s["requests"], s["tokens"], s["cache"], s["histograms"]

        info = GaugeMetricFamily("ultrakv_node_info", "Static facts about the node (value 1).",
                                 labels=[*base, "device", "dtype", "attention_backend"])
        info.add_metric([*base.values(), str(s["device"]), str(s["dtype"]),
                         str(s["attention_backend"])], 1)
        yield info

        finished = CounterMetricFamily("ultrakv_requests", "Finished requests by finish reason.",
                                       labels=[*base, "finish_reason"])
        for reason, count in sorted(req["finished"].items()):
            finished.add_metric([*base.values(), reason], count)
        yield finished
        yield _counter("ultrakv_requests_received", "Requests admitted to the engine.", base,
                       req["total"])
        yield _counter("ultrakv_prompt_tokens", "Prompt tokens of finished requests.", base,
                       tok["prompt"])
        yield _counter("ultrakv_generation_tokens", "Generated tokens.", base, tok["generated"])
        yield _counter("ultrakv_prefix_cache_hit_tokens",
                       "Prompt tokens served from the KV cache (not prefilled).", base,
                       tok["cached"])
        yield _counter("ultrakv_prefix_cache_queries", "KV blocks looked up in the prefix cache.",
                       base, cache["hits"] + cache["misses"])
        yield _counter("ultrakv_prefix_cache_hits", "KV blocks found in the prefix cache.", base,
                       cache["hits"])
        tiers = s.get("kv_tiers", {})
        tier_hits = CounterMetricFamily("ultrakv_kv_tier_hits",
                                        "KV blocks a prefix match found, by tier (gpu: in the "
                                        "pool; cpu, disk: loaded back from there).",
                                        labels=[*base, "tier"])
        tier_blocks = GaugeMetricFamily("ultrakv_kv_tier_blocks", "KV blocks held per tier below "
                                        "the GPU pool.", labels=[*base, "tier"])
        for tier in ("gpu", "cpu", "disk"):
            if tier in tiers:
                tier_hits.add_metric([*base.values(), tier], tiers[tier]["hits"])
                if tier != "gpu":
                    tier_blocks.add_metric([*base.values(), tier], tiers[tier]["blocks"])
        yield tier_hits
        yield tier_blocks
        if "skipped" in tiers:
            yield _counter("ultrakv_kv_tier_loads_skipped", "KV blocks a prefix match found in the "
                           "CPU or disk tier but recomputed: loading them was estimated slower.",
                           base, tiers["skipped"])
        if "disk" in tiers:
            yield _counter("ultrakv_kv_disk_dropped_writes", "KV blocks not written to the disk "
                           "tier (queue full under backpressure, or the tier off).", base,
                           tiers["disk"]["dropped"])
            yield _counter("ultrakv_kv_disk_unwritten_blocks", "KV blocks the CPU tier evicted but "
                           "did not write to the disk tier: disk loads were estimated slower than "
                           "recomputing (a trickle still goes, to keep measuring).", base,
                           tiers.get("unwritten", 0))
            yield _counter("ultrakv_kv_disk_corrupted_blocks", "Disk tier block files that failed "
                           "their checksum on read (dropped and recomputed).", base,
                           tiers["disk"]["corrupted"])
            yield _gauge("ultrakv_kv_disk_tier_enabled", "1 while the disk tier works; 0 after a "
                         "write error turned it off.", base, int(tiers["disk"]["enabled"]))
        yield _counter("ultrakv_kv_cache_evictions", "Cached KV blocks reclaimed for new use.",
                       base, cache["evictions"])
        yield _counter("ultrakv_preemptions", "Sequences preempted (recomputed later).", base,
                       req["preemptions"])
        yield _counter("ultrakv_scheduler_steps", "Engine steps run.", base, tok["steps"])
        yield _counter("ultrakv_batched_tokens", "Tokens run through the model.", base,
                       tok["batched"])

        yield _gauge("ultrakv_num_requests_running", "Requests in the running batch.", base,
                     req["running"])
        yield _gauge("ultrakv_num_requests_waiting", "Requests waiting for admission.", base,
                     req["waiting"])
        blocks = GaugeMetricFamily("ultrakv_kv_cache_blocks",
                                   "KV blocks by state (cached is part of free).",
                                   labels=[*base, "state"])
        for state in ("used", "free", "cached"):
            blocks.add_metric([*base.values(), state], cache[f"blocks_{state}"])
        yield blocks
        num_blocks = cache["num_blocks"]
        yield _gauge("ultrakv_kv_cache_usage_ratio", "Fraction of KV blocks in use (0..1).", base,
                     cache["blocks_used"] / num_blocks if num_blocks else 0.0)
        yield _gauge("ultrakv_sessions", "Sessions held (owned).", base, s["sessions"]["count"])
        yield _gauge("ultrakv_session_replicas", "Replicated session histories held.", base,
                     s["sessions"]["replicas"])
        yield _counter("ultrakv_session_replicas_dropped",
                       "Replicas pushed out by engine.max_replicas / max_replica_tokens.", base,
                       s["sessions"].get("replicas_dropped", 0))

        yield from _gpu_families(base, s.get("gpus", []))

        yield histogram_family("ultrakv_time_to_first_token_seconds",
                               "Arrival to first generated token.", base, hist["ttft_s"])
        yield histogram_family("ultrakv_time_per_output_token_seconds",
                               "Mean time per output token after the first, per request.", base,
                               hist["tpot_s"])
        yield histogram_family("ultrakv_e2e_request_latency_seconds",
                               "Arrival to finish, per request.", base, hist["e2e_s"])
        yield REJECTIONS.metric()
        replication = self._replication() if self._replication is not None else None
        if replication is not None:
            family = CounterMetricFamily(
                "ultrakv_session_turn_replication",
                "Completed session turns by how their copies went (node/replication.py): "
                "replicated (every copy), under_replicated (acknowledged with fewer), "
                "unreplicated (acknowledged with none: no other node registered), not_durable "
                "and superseded (not acknowledged).", labels=[*base, "outcome"])
            for outcome, count in sorted(asdict(replication).items()):
                family.add_metric([*base.values(), outcome], count)
            yield family


# Per-device gauges of a data-parallel node (node/parallel/data_parallel.py): stats key, help.
_GPU_GAUGES = {
    "kv_usage": ("ultrakv_gpu_kv_cache_usage_ratio", "Fraction of the device's KV blocks in use (0..1)."),
    "running": ("ultrakv_gpu_num_requests_running", "Requests in the device engine's running batch."),
    "waiting": ("ultrakv_gpu_num_requests_waiting", "Requests waiting in the device engine's queue."),
    "sessions": ("ultrakv_gpu_sessions", "Sessions placed on the device."),
    "tokens_per_s": ("ultrakv_gpu_generation_tokens_per_second",
                     "Tokens the device generated per second (over the last scrapes, <= 10 s)."),
    "utilization": ("ultrakv_gpu_utilization_ratio", "Busy fraction of the device from NVML (0..1)."),
}


def _gpu_families(base: dict[str, str], gpus: list[dict]) -> Iterator[Metric]:
    """One gauge family per per-device stat, labelled ``gpu``; none for a one-engine node,
    and no utilisation where NVML is absent."""
    for key, (name, doc) in _GPU_GAUGES.items():
        rows = [g for g in gpus if key in g]
        if not rows:
            continue
        family = GaugeMetricFamily(name, doc, labels=[*base, "gpu"])
        for g in rows:
            family.add_metric([*base.values(), str(g["gpu"])], float(g[key]))
        yield family
