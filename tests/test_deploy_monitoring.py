"""The Grafana dashboard and the alert rules query only metrics the node and coordinator
export (the pods test checks the same names against a live scrape)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "ultrakv-dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "ultrakv-rules.yaml"
# Series from elsewhere: Prometheus' own `up`, etcd's leader gauge.
FOREIGN = {"up", "etcd_server_has_leader"}


def exported_metric_names() -> set[str]:
    """Sample names the collectors of nodes, coordinators and the security layer expose, read
    from their source: counters gain ``_total``, histograms ``_bucket``/``_sum``/``_count``."""
    names: set[str] = set()
    for source in (ROOT / "node" / "metrics.py", ROOT / "coordinator" / "metrics.py",
                   ROOT / "cluster" / "security" / "events.py"):
        text = source.read_text()
        for ctor, name in re.findall(
                r"(_counter|_gauge|histogram_family|CounterMetricFamily|GaugeMetricFamily)"
                r'\(\s*"(ultrakv_[a-z0-9_]+)"', text):
            if ctor in ("_counter", "CounterMetricFamily"):
                names.add(name + "_total")
            elif ctor == "histogram_family":
                names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(name)
    return names


def referenced_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (``{__name__=~...}`` matchers left out)."""
    expr = re.sub(r'\{__name__=~"[^"]*"\}', "", expr)
    expr = re.sub(r'"[^"]*"', '""', expr)  # label values are not names
    words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b(?=\s*[{\[)])", expr))
    words |= set(re.findall(r"\bultrakv_[a-z0-9_]+\b", expr))
    keywords = {"sum", "max", "min", "rate", "by", "clamp_min", "histogram_quantile", "changes",
                "or", "and", "le", "label_values"}
    return {w for w in words if w not in keywords and (w.startswith("ultrakv_") or w in FOREIGN)}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def all_referenced() -> set[str]:
    return set().union(*(referenced_metric_names(e) for e in dashboard_exprs() + rule_exprs()))


def test_dashboard_and_rules_use_exported_metrics() -> None:
    exported = exported_metric_names()
    assert "ultrakv_requests_total" in exported and "ultrakv_coordinator_ring_epoch" in exported
    missing = all_referenced() - exported - FOREIGN
    assert not missing, f"queried but never exported: {sorted(missing)}"


def test_dashboard_covers_the_operator_questions() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    text = json.dumps(panels)
    for metric in ("ultrakv_requests_total", "ultrakv_time_to_first_token_seconds_bucket",
                   "ultrakv_time_per_output_token_seconds_bucket",
                   "ultrakv_e2e_request_latency_seconds_bucket", "ultrakv_generation_tokens_total",
                   "ultrakv_prefix_cache_hit_tokens_total", "ultrakv_kv_cache_usage_ratio",
                   "ultrakv_num_requests_waiting", "ultrakv_preemptions_total",
                   "ultrakv_coordinator_ring_epoch", "ultrakv_coordinator_node_health",
                   "ultrakv_coordinator_session_moves_total", "ultrakv_security_events_total"):
        assert metric in text, metric
    for p in panels:
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]


@pytest.mark.parametrize("alert", ["UltrakvNodeDown", "UltrakvRingUnstable", "UltrakvKVCacheFull",
                                   "UltrakvTTFTHigh", "UltrakvErrorRatioHigh",
                                   "UltrakvEtcdUnreachable"])
def test_alert_rules(alert: str) -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"]
             for r in g["rules"]}
    rule = rules[alert]
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert rule["annotations"]["summary"]
    assert re.fullmatch(r"\d+m", rule["for"])
    if alert == "UltrakvKVCacheFull":
        assert "> 0.9" in rule["expr"] and rule["for"] == "5m"
