"""A whole cluster on one machine: embedded etcd, one coordinator, N node processes.

``ultrakv serve --nodes N`` runs it until Ctrl-C; tests and benchmarks drive it directly
(kill a node, add one, restart the coordinator or etcd). Every child is an ``ultrakv``
process of its own, started with the parent-death signal so none outlives the supervisor.
That signal fires when the *thread* that started the child exits, so start children from a
long-lived thread (the main thread), never from a worker pool.

    with LocalCluster(ClusterSpec(nodes=3, data_dir=tmp)) as cluster:
        Client(cluster.address).process_request({...})
        cluster.kill_node("node-1")
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ultrakv.cluster.etcd_server import EmbeddedEtcd, _die_with_parent, free_port
from ultrakv.cluster.store import EtcdStore

log = logging.getLogger("ultrakv.client.local_cluster")


@dataclass
class ClusterSpec:
    """What to start. ``etcd`` "" starts an embedded one under ``data_dir/etcd``."""

    nodes: int = 1
    data_dir: Path = Path("ultrakv-data")
    model: str = "tiny"
    device: str = "auto"  # auto: one node per GPU (round robin) when there are GPUs, else CPU
    port: int = 50051  # the coordinator's; 0 picks a free one
    etcd: str = ""
    num_blocks: int | None = None
    num_scheduler_steps: int | None = None
    fused_kernels: bool | None = None
    lease_ttl_s: int = 5
    checkpoint_interval_s: float = 10.0
    log_dir: Path | None = None  # None: children write to this process's stdout/stderr
    node_args: list[str] = field(default_factory=list)  # extra `ultrakv node` flags
    startup_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        self.data_dir = Path(self.data_dir)


async def _check_etcd(endpoint: str) -> None:
    async with EtcdStore(endpoint):
        pass


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ultrakv.client.cli", *args]


class LocalCluster:
    """The processes of one cluster; see the module docstring."""

    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.etcd: EmbeddedEtcd | None = None
        self.etcd_endpoint = spec.etcd
        self.port = spec.port or free_port()
        self.nodes: dict[str, subprocess.Popen] = {}
        self.node_ports: dict[str, int] = {}
        self.coordinator: subprocess.Popen | None = None
        self._next_node = 1

    @property
    def address(self) -> str:
        """The coordinator's client-facing address."""
        return f"127.0.0.1:{self.port}"

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        out = None
        if self.spec.log_dir is not None:
            self.spec.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.spec.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (child owns it)
        try:
            return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT if out
                                    else None, preexec_fn=_die_with_parent)
        finally:
            if out is not None:
                out.close()

    def start(self) -> LocalCluster:
        """Start etcd (unless given), the nodes and the coordinator; wait until every node
        serves through the coordinator."""
        if not self.etcd_endpoint:
            self.etcd = EmbeddedEtcd(self.spec.data_dir / "etcd").start()
            self.etcd_endpoint = self.etcd.endpoint
        else:  # a clear error naming the endpoint now, not N node logs later
            asyncio.run(_check_etcd(self.etcd_endpoint))
        for _ in range(self.spec.nodes):
            self.start_node()
        self.start_coordinator()
        self.wait_ready(self.spec.nodes)
        return self

    def start_node(self, node_id: str | None = None, port: int | None = None) -> str:
        """Start one node process (a new id unless given); returns its id."""
        if node_id is None:
            while f"node-{self._next_node}" in self.nodes:
                self._next_node += 1
            node_id = f"node-{self._next_node}"
            self._next_node += 1
        port = port or self.node_ports.get(node_id) or free_port()
        self.node_ports[node_id] = port
        argv = _cli("node", "--etcd", self.etcd_endpoint, "--node-id", node_id,
                    "--host", "127.0.0.1", "--port", str(port), "--model", self.spec.model,
                    "--device", self._device(list(self.node_ports).index(node_id)),
                    "--checkpoint-dir", str(self.spec.data_dir / "checkpoints"),
                    "--checkpoint-interval", str(self.spec.checkpoint_interval_s),
                    "--lease-ttl", str(self.spec.lease_ttl_s), *self.spec.node_args)
        if self.spec.num_blocks is not None:
            argv += ["--num-blocks", str(self.spec.num_blocks)]
        if self.spec.num_scheduler_steps is not None:
            argv += ["--num-scheduler-steps", str(self.spec.num_scheduler_steps)]
        if self.spec.fused_kernels is not None:
            argv += ["--fused-kernels" if self.spec.fused_kernels else "--no-fused-kernels"]
        self.nodes[node_id] = self._spawn(node_id, argv)
        return node_id

    def _device(self, ordinal: int) -> str:
        if self.spec.device != "auto":
            return self.spec.device
        import torch

        gpus = torch.cuda.device_count()
        return f"cuda:{ordinal % gpus}" if gpus else "cpu"

    def start_coordinator(self) -> None:
        self.coordinator = self._spawn("coordinator", _cli(
            "coordinator", "--etcd", self.etcd_endpoint, "--host", "127.0.0.1",
            "--port", str(self.port)))

    def wait_ready(self, nodes: int, timeout_s: float | None = None) -> None:
        """Wait until the coordinator answers and lists ``nodes`` nodes."""
        from ultrakv.client.client import Client, RequestError

        deadline = time.monotonic() + (timeout_s or self.spec.startup_timeout_s)
        with Client(self.address, timeout=5) as client:
            while True:
                self._check_alive()
                try:
                    if len(client.stats()["nodes"]) >= nodes:
                        return
                except RequestError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster not ready with {nodes} nodes within "
                                       f"{timeout_s or self.spec.startup_timeout_s:.0f} s")
                time.sleep(0.2)

    def _check_alive(self) -> None:
        for name, proc in [*self.nodes.items(), ("coordinator", self.coordinator)]:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} while starting")

    def kill_node(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Signal a node (SIGKILL by default: a crash) and reap it."""
        proc = self.nodes.pop(node_id)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def stop_coordinator(self, sig: int = signal.SIGTERM) -> None:
        if self.coordinator is not None:
            self.coordinator.send_signal(sig)
            self.coordinator.wait(timeout=30)
            self.coordinator = None

    def stop(self) -> None:
        """SIGTERM every child (nodes checkpoint and leave), then etcd; SIGKILL stragglers."""
        procs = [p for p in [self.coordinator, *self.nodes.values()] if p is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.nodes.clear()
        self.coordinator = None
        if self.etcd is not None:
            self.etcd.stop()

    def __enter__(self) -> LocalCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def serve_cluster(spec: ClusterSpec) -> int:
    """``ultrakv serve --nodes N``: run the cluster until Ctrl-C or SIGTERM, then stop all."""
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster = LocalCluster(spec)
    try:
        cluster.start()
        log.info("cluster serving on %s: %d nodes, etcd %s", cluster.address,
                 len(cluster.nodes), cluster.etcd_endpoint)
        while not stopping:
            cluster._check_alive()
            time.sleep(0.2)
        log.info("stopping the cluster")
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        cluster.stop()
        log.info("stopped")
