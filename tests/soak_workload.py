"""A steady-state soak for ``tests/test_cluster_soak.py`` and ``benchmarks/bench_soak.py``.

A cluster whose live set is bounded by configuration (a short idle-session TTL, a small
session and replica budget per node, a small checkpoint-directory budget) serves clients
that keep opening new conversations: sessions are created and expire continuously. After a
warm-up (enough sessions created to fill every budget several times over), the soak samples
etcd's resident memory and database size, each node's and coordinator's resident memory and
the checkpoint directory's size, every few hundred turns. Samples are taken per *turn*, not
per second, and growth is fitted against turns served: a loaded machine serves fewer turns
a second, but a leak grows with the work done, so the bound holds at any speed.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from fault_workload import ConversationLoad
from ultrakv.client import AsyncClient
from ultrakv.client.local_cluster import ClusterSpec, LocalCluster
from ultrakv.client.supervision import RestartPolicy
from ultrakv.cluster.store import EtcdStore


@dataclass(frozen=True)
class SoakBudget:
    """What bounds the live set of each node."""

    session_ttl_s: float = 2.0
    max_sessions: int = 24
    max_replicas: int = 48
    checkpoint_max_bytes: int = 1 << 20


def soak_spec(data_dir: Path, budget: SoakBudget, nodes: int = 2, coordinators: int = 1,
              num_blocks: int = 512) -> ClusterSpec:
    """A cluster under ``data_dir`` whose nodes run with ``budget`` (through a config file)."""
    config = data_dir / "node.yaml"
    config.write_text(yaml.safe_dump({"engine": {
        "session_ttl_s": budget.session_ttl_s, "max_sessions": budget.max_sessions,
        "max_replicas": budget.max_replicas}}))
    return ClusterSpec(nodes=nodes, coordinators=coordinators, data_dir=data_dir, port=0,
                       device="cpu", num_blocks=num_blocks, lease_ttl_s=2,
                       checkpoint_interval_s=1.0, log_dir=data_dir / "logs",
                       # supervised: on a loaded machine a coordinator may give up on etcd
                       # while both start (status 2), and is started again
                       restart=RestartPolicy(initial_backoff_s=0.2, max_backoff_s=2.0,
                                             max_restarts=10, window_s=600),
                       node_args=["--config", str(config),
                                  "--checkpoint-max-bytes", str(budget.checkpoint_max_bytes)])


def rss_mib(pid: int | None) -> float:
    """A process's resident memory (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        pass
    return 0.0


def dir_mib(path: Path) -> float:
    """Bytes of the files under ``path`` (files removed while walking are skipped)."""
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            continue
    return total / 2**20


@dataclass
class Sample:
    """One look at the cluster after ``turns`` turns."""

    turns: int
    sessions: int
    t_s: float
    etcd_rss_mib: float
    etcd_db_mib: float  # the database file (never shrinks without a defrag; reused when freed)
    etcd_db_in_use_mib: float  # the pages holding live data
    checkpoints_mib: float
    etcd_keys: int  # live keys (membership, ring, one checkpoint entry per session copy)
    node_sessions: dict[str, int] = field(default_factory=dict)  # sessions each node serves
    node_rss_mib: dict[str, float] = field(default_factory=dict)
    coordinator_rss_mib: dict[str, float] = field(default_factory=dict)

    def series(self) -> dict[str, float]:
        """Every figure by name (nodes and coordinators one each)."""
        out = {"etcd_rss_mib": self.etcd_rss_mib, "etcd_db_mib": self.etcd_db_mib,
               "etcd_db_in_use_mib": self.etcd_db_in_use_mib,
               "checkpoints_mib": self.checkpoints_mib, "etcd_keys": self.etcd_keys}
        out.update({f"{n}_rss_mib": v for n, v in self.node_rss_mib.items()})
        out.update({f"{n}_rss_mib": v for n, v in self.coordinator_rss_mib.items()})
        return out


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


@dataclass
class SoakResult:
    """The samples and, per figure, its growth after the warm-up."""

    clients: int
    budget: SoakBudget
    warmup_turns: int
    samples: list[Sample]
    failed: int
    errors: list[str]
    sessions: int
    seconds: float

    @property
    def measured(self) -> list[Sample]:
        """The samples from the end of the warm-up on."""
        return [s for s in self.samples if s.turns >= self.warmup_turns]

    def slope_per_1000_turns(self) -> dict[str, float]:
        """Each figure's fitted growth (MiB per 1000 turns) after the warm-up."""
        ms = self.measured
        xs = [s.turns / 1000 for s in ms]
        return {name: round(slope(xs, [s.series()[name] for s in ms]), 3)
                for name in ms[0].series()}

    def rise(self) -> dict[str, float]:
        """Each figure's highest value after the warm-up less its value at the warm-up's end."""
        ms = self.measured
        return {name: round(max(s.series()[name] for s in ms) - ms[0].series()[name], 2)
                for name in ms[0].series()}

    def as_dict(self) -> dict:
        return {"clients": self.clients, "budget": asdict(self.budget),
                "warmup_turns": self.warmup_turns, "turns": self.samples[-1].turns,
                "sessions": self.sessions, "seconds": round(self.seconds, 1),
                "failed": self.failed, "errors": self.errors[:5],
                "slope_mib_per_1000_turns": self.slope_per_1000_turns(),
                "rise_after_warmup_mib": self.rise(),
                "samples": [asdict(s) for s in self.samples]}


async def _sample(cluster: LocalCluster, store: EtcdStore, client: AsyncClient, turns: int,
                  sessions: int, started: float) -> Sample:
    db, in_use = await store.db_size()
    keys, _ = await store.get_prefix()
    stats = await client.stats()
    return Sample(turns, sessions, round(time.monotonic() - started, 2),
                  round(rss_mib(cluster.etcd.pid), 2), round(db / 2**20, 3),
                  round(in_use / 2**20, 3),
                  round(dir_mib(cluster.spec.data_dir / "checkpoints"), 3), len(keys),
                  {n["node_id"]: int(n.get("sessions", 0)) for n in stats["nodes"]},
                  {n: round(rss_mib(p.pid), 2) for n, p in cluster.nodes.items()},
                  {n: round(rss_mib(p.pid), 2) for n, p in cluster.coordinators.items()})


async def soak(cluster: LocalCluster, budget: SoakBudget, clients: int, warmup_turns: int,
               turns: int, every_turns: int, timeout_s: float = 600.0) -> SoakResult:
    """Serve ``clients`` conversations (3 turns each, then a new session) until ``turns``
    turns are done, sampling every ``every_turns`` turns (from the first) on."""
    started = time.monotonic()
    samples: list[Sample] = []
    async with EtcdStore(cluster.etcd_endpoint) as store, \
            AsyncClient(cluster.addresses, timeout=30) as client, \
            ConversationLoad(cluster.addresses, "soak", clients, turns=3, think_s=0.05) as load:
        deadline = started + timeout_s
        due = every_turns
        while True:
            done = sum(len(c.turns) for c in load.conversations)
            if done >= due:
                samples.append(await _sample(cluster, store, client, done, len(load.conversations),
                                             started))
                due = done + every_turns
                if done >= turns:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the soak served {done} of {turns} turns in {timeout_s:.0f} s")
            await asyncio.sleep(0.05)
    failed = [t for c in load.conversations for t in c.turns if not t.ok]
    return SoakResult(clients, budget, warmup_turns, samples, len(failed),
                      [t.error for t in failed], len(load.conversations),
                      time.monotonic() - started)
