"""``ultrakv monitor --dashboard``: a live terminal view of the cluster from ``stats()``.

Rates (requests/s, tokens/s) come from the difference of two stats snapshots; latency
percentiles, cache figures and queue depth are the nodes' own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Group
from rich.live import Live
from rich.table import Table


@dataclass(frozen=True)
class NodeFigures:
    """One row of the dashboard."""

    node_id: str
    address: str
    requests_per_s: float
    tokens_per_s: float
    ttft_ms: tuple[float, float, float]  # p50, p95, p99
    tpot_ms: tuple[float, float, float]
    cache_hit_rate: float
    blocks_used: int
    blocks_total: int
    queue_depth: int
    running: int
    sessions: int


def figures(previous: dict | None, current: dict, elapsed_s: float) -> list[NodeFigures]:
    """Dashboard rows from two ``Client.stats()`` snapshots ``elapsed_s`` apart (rates are 0
    for the first snapshot and for nodes that just appeared)."""
    before = {n["node_id"]: n for n in (previous or {}).get("nodes", [])}
    rows = []
    for node in current["nodes"]:
        prev = before.get(node["node_id"])
        if prev is not None and elapsed_s > 0:
            rps = max(0, node["requests_total"] - prev["requests_total"]) / elapsed_s
            tps = max(0, node["completion_tokens"] - prev["completion_tokens"]) / elapsed_s
        else:
            rps = tps = 0.0
        lat, cache = node["latency"], node["cache"]
        rows.append(NodeFigures(
            node_id=node["node_id"], address=node["address"], requests_per_s=rps,
            tokens_per_s=tps,
            ttft_ms=(lat["ttft_p50_ms"], lat["ttft_p95_ms"], lat["ttft_p99_ms"]),
            tpot_ms=(lat["tpot_p50_ms"], lat["tpot_p95_ms"], lat["tpot_p99_ms"]),
            cache_hit_rate=cache["hit_rate"], blocks_used=cache["blocks_used"],
            blocks_total=cache["blocks_total"], queue_depth=node["queue_depth"],
            running=node["running"], sessions=node["sessions"]))
    return rows


def _pcts(values: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def render(rows: list[NodeFigures], address: str) -> Table:
    """The dashboard table, one row per node plus a total when there are several."""
    table = Table(title=f"ultrakv @ {address}  ({time.strftime('%H:%M:%S')})", expand=True)
    for column in ("node", "req/s", "tok/s", "TTFT ms p50/p95/p99", "TPOT ms p50/p95/p99",
                   "cache hit", "blocks used", "queue", "running", "sessions"):
        table.add_column(column, justify="left" if column == "node" else "right")
    for r in rows:
        table.add_row(f"{r.node_id}\n[dim]{r.address}[/dim]", f"{r.requests_per_s:.1f}",
                      f"{r.tokens_per_s:.0f}", _pcts(r.ttft_ms), _pcts(r.tpot_ms),
                      f"{r.cache_hit_rate:.1%}", f"{r.blocks_used}/{r.blocks_total}",
                      str(r.queue_depth), str(r.running), str(r.sessions))
    if len(rows) > 1:
        table.add_row("[b]total[/b]", f"{sum(r.requests_per_s for r in rows):.1f}",
                      f"{sum(r.tokens_per_s for r in rows):.0f}", "", "", "",
                      f"{sum(r.blocks_used for r in rows)}/{sum(r.blocks_total for r in rows)}",
                      str(sum(r.queue_depth for r in rows)), str(sum(r.running for r in rows)),
                      str(sum(r.sessions for r in rows)))
    return table


def run_dashboard(fetch_stats: Callable[[], dict], address: str, interval_s: float = 1.0,
                  iterations: int | None = None) -> None:
    """Refresh every ``interval_s`` until Ctrl-C (or ``iterations`` refreshes)."""
    previous: dict | None = None
    last = time.monotonic()
    count = 0
    with Live(Group(), refresh_per_second=4, screen=False) as live:
        try:
            while iterations is None or count < iterations:
                current = fetch_stats()
                now = time.monotonic()
                live.update(render(figures(previous, current, now - last), address))
                previous, last = current, now
                count += 1
                if iterations is None or count < iterations:
                    time.sleep(interval_s)
        except KeyboardInterrupt:
            pass
