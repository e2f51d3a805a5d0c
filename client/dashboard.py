"""``ultrakv stats`` and ``ultrakv monitor --dashboard``: the cluster's figures as tables.

Rates (requests/s, tokens/s) come from the difference of two stats snapshots; latency
percentiles, cache figures and queue depth are the nodes' own. The headline cache figure is
the token hit rate (prompt tokens served from cache over prompt tokens): the block hit rate
counts KV-block lookups, so one cold and one warm request already read 100%. Tables fit 80
columns; ``wide`` adds the columns that do not (addresses, pids, percentiles, block hits).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rich import box
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
    cache_hit_rate: float  # KV-block lookups that hit
    token_hit_rate: float  # prompt tokens served from cache
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
            cache_hit_rate=cache["hit_rate"], token_hit_rate=token_hit_rate(node),
            blocks_used=cache["blocks_used"],
            blocks_total=cache["blocks_total"], queue_depth=node["queue_depth"],
            running=node["running"], sessions=node["sessions"]))
    return rows


def token_hit_rate(figures: dict) -> float:
    """Prompt tokens served from cache over all prompt tokens (a node's or the totals)."""
    prompt = int(figures.get("prompt_tokens", 0))
    return int(figures.get("cached_tokens", 0)) / prompt if prompt else 0.0


def headline(stats: dict) -> str:
    """One line over the tables: the token hit rate first, the block hit rate beside it."""
    totals = stats["totals"]
    return (f"token hit rate {token_hit_rate(totals):.1%} ({int(totals['cached_tokens'])} of "
            f"{int(totals['prompt_tokens'])} prompt tokens from cache); "
            f"KV block hits {totals['cache_hit_rate']:.1%}; {len(stats['nodes'])} node(s)")


def _pcts(values: tuple[float, ...]) -> str:
    return "/".join(f"{v:.1f}" if v < 100 else f"{v:.0f}" for v in values)


def _table(title: str, columns: list[str] | tuple[str, ...], **kwargs) -> Table:
    # Light borders and folding rather than "…": long names wrap, no figure is cut.
    table = Table(title=title, box=box.SIMPLE_HEAD, **kwargs)
    for column in columns:
        left = column in ("node", "address", "model")
        table.add_column(column, justify="left" if left else "right", overflow="fold")
    return table


def stats_table(stats: dict, address: str, wide: bool = False) -> Table:
    """``ultrakv stats``: one row per node."""
    columns = ["node", "sessions", "requests", "tokens out", "token hit", "blocks used",
               "queue", "TTFT p50 ms"]
    if wide:
        columns[1:1] = ["address", "pid", "model"]
        columns.insert(columns.index("blocks used"), "block hit")
    models = ", ".join(sorted({n["model"] for n in stats["nodes"]}))
    table = _table(f"ultrakv @ {address}" + (f", model {models}" if models else ""), columns,
                   caption=headline(stats))
    for n in stats["nodes"]:
        cells = {"node": n["node_id"], "address": n["address"], "pid": str(n["pid"]),
                 "model": n["model"], "sessions": str(n["sessions"]),
                 "requests": str(n["requests_total"]), "tokens out": str(n["completion_tokens"]),
                 "token hit": f"{token_hit_rate(n):.1%}",
                 "block hit": f"{n['cache']['hit_rate']:.1%}",
                 "blocks used": f"{n['cache']['blocks_used']}/{n['cache']['blocks_total']}",
                 "queue": str(n["queue_depth"]),
                 "TTFT p50 ms": f"{n['latency']['ttft_p50_ms']:.1f}"}
        table.add_row(*(cells[c] for c in columns))
    return table


def render(rows: list[NodeFigures], address: str, wide: bool = False) -> Table:
    """The dashboard table, one row per node plus a total when there are several."""
    if wide:
        columns = ("node", "req/s", "tok/s", "TTFT ms p50/p95/p99", "TPOT ms p50/p95/p99",
                   "token hit", "block hit", "blocks used", "queue", "running", "sessions")
    else:
        columns = ("node", "req/s", "tok/s", "TTFT ms p50/p99", "TPOT ms p50/p99",
                   "token hit", "queue", "sessions")
    table = _table(f"ultrakv @ {address}  ({time.strftime('%H:%M:%S')})", columns, expand=True)
    for r in rows:
        cells = {"node": f"{r.node_id}\n[dim]{r.address}[/dim]" if wide else r.node_id,
                 "req/s": f"{r.requests_per_s:.1f}", "tok/s": f"{r.tokens_per_s:.0f}",
                 "TTFT ms p50/p95/p99": _pcts(r.ttft_ms), "TPOT ms p50/p95/p99": _pcts(r.tpot_ms),
                 "TTFT ms p50/p99": _pcts(r.ttft_ms[::2]), "TPOT ms p50/p99": _pcts(r.tpot_ms[::2]),
                 "token hit": f"{r.token_hit_rate:.1%}", "block hit": f"{r.cache_hit_rate:.1%}",
                 "blocks used": f"{r.blocks_used}/{r.blocks_total}",
                 "queue": str(r.queue_depth), "running": str(r.running),
                 "sessions": str(r.sessions)}
        table.add_row(*(cells[c] for c in columns))
    if len(rows) > 1:
        totals = {"node": "[b]total[/b]", "req/s": f"{sum(r.requests_per_s for r in rows):.1f}",
                  "tok/s": f"{sum(r.tokens_per_s for r in rows):.0f}",
                  "blocks used": f"{sum(r.blocks_used for r in rows)}/"
                                 f"{sum(r.blocks_total for r in rows)}",
                  "queue": str(sum(r.queue_depth for r in rows)),
                  "running": str(sum(r.running for r in rows)),
                  "sessions": str(sum(r.sessions for r in rows))}
        table.add_row(*(totals.get(c, "") for c in columns))
    return table


def run_dashboard(fetch_stats: Callable[[], dict], address: str, interval_s: float = 1.0,
                  iterations: int | None = None, wide: bool = False) -> None:
    """Refresh every ``interval_s`` until Ctrl-C (or ``iterations`` refreshes)."""
    previous: dict | None = None
    last = time.monotonic()
    count = 0
    with Live(Group(), refresh_per_second=4, screen=False) as live:
        try:
            while iterations is None or count < iterations:
                current = fetch_stats()
                now = time.monotonic()
                live.update(render(figures(previous, current, now - last), address, wide))
                previous, last = current, now
                count += 1
                if iterations is None or count < iterations:
                    time.sleep(interval_s)
        except KeyboardInterrupt:
            pass
