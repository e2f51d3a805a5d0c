"""A whole cluster on one machine: embedded etcd, K coordinators, N node processes.

``ultrakv serve --nodes N`` runs it until Ctrl-C or SIGTERM, restarting any child that
crashes (with backoff and a restart budget, see ``supervision.py``) while the others keep
serving. Tests and benchmarks drive it directly (kill a node, add one, restart a coordinator
or etcd). Every child is an ``ultrakv`` process of its own, started with the parent-death
signal so none outlives the supervisor. That signal fires when the *thread* that started the
child exits, so children are started only from long-lived threads: the main thread, and the
supervisor thread (which lives until ``stop()``); never from a worker pool.

    with LocalCluster(ClusterSpec(nodes=3, data_dir=tmp)) as cluster:
        Client(cluster.addresses).process_request({...})
        cluster.kill_node("node-1")             # a node the supervisor lets go
        cluster.crash("node-2")                 # a crash the supervisor repairs (with restart)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from ultrakv.client.supervision import RestartBudget, RestartPolicy
from ultrakv.cluster.addresses import MAX_PORT, ensure_port_free, validate_port
from ultrakv.cluster.etcd_server import EmbeddedEtcd, EtcdStartError, free_port, with_parent_death
from ultrakv.cluster.peer_auth import ensure_cluster_secret
from ultrakv.cluster.store import EtcdStore, EtcdUnavailableError
from ultrakv.cluster.tasks import SUPERVISED_ENV

log = logging.getLogger("ultrakv.client.local_cluster")

ETCD = "etcd"


@dataclass
class ClusterSpec:
    """What to start. ``etcd`` "" starts an embedded one under ``data_dir/etcd``.
    ``restart`` None leaves crashed children down (tests that stage faults by hand)."""

    nodes: int = 1
    coordinators: int = 2  # two by default: a client given both survives losing one
    data_dir: Path = Path("ultrakv-data")
    model: str = "tiny"
    device: str = "auto"  # auto: one node per GPU (round robin) when there are GPUs, else CPU
    port: int = 50051  # the first coordinator's; the i-th listens on port + i; 0 picks free ones
    http_port: int = 0  # the first coordinator's OpenAI-compatible API, the i-th's http_port + i; 0 = off
    etcd: str = ""
    num_blocks: int | None = None
    num_scheduler_steps: int | None = None
    fused_kernels: bool | None = None
    lease_ttl_s: int = 5
    checkpoint_interval_s: float = 10.0
    log_dir: Path | None = None  # None: children write to this process's stdout/stderr
    node_args: list[str] = field(default_factory=list)  # extra `ultrakv node` flags
    # extra `ultrakv coordinator` flags: the client-facing edge (--keys-file, --tls-*, --config)
    coordinator_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 300.0  # generous: CI machines are shared and loaded
    restart: RestartPolicy | None = None
    cluster_secret_file: str = ""  # "" = generate data_dir/cluster-secret (0600) once

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        if self.coordinators < 1:
            raise ValueError(f"coordinators must be >= 1, got {self.coordinators}")
        validate_port(self.port)
        if self.port and self.port + self.coordinators - 1 > MAX_PORT:
            raise ValueError(f"port must leave room for {self.coordinators} coordinators "
                             f"(port..port+{self.coordinators - 1} <= {MAX_PORT}), got {self.port}")
        self.data_dir = Path(self.data_dir)


@dataclass
class Child:
    """One supervised process: how to start it and its restart state."""

    name: str
    argv: list[str]
    proc: subprocess.Popen
    budget: RestartBudget | None
    restart_at: float | None = None  # a crash seen, the restart is due then
    given_up: bool = False


async def _check_etcd(endpoint: str) -> None:
    async with EtcdStore(endpoint):
        pass


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ultrakv.client.cli", *args]


class LocalCluster:
    """The processes of one cluster; see the module docstring."""

    def __init__(self, spec: ClusterSpec, closing: threading.Event | None = None) -> None:
        """``closing``, once set, ends supervision and any wait for readiness (a signal
        handler sets it while the cluster is still starting)."""
        self.spec = spec
        self.etcd: EmbeddedEtcd | None = None
        self.etcd_endpoint = spec.etcd
        self.coordinator_ports = [
            spec.port + i if spec.port else free_port() for i in range(spec.coordinators)]
        self.children: dict[str, Child] = {}
        self.node_ports: dict[str, int] = {}
        self.restarts: list[tuple[str, int | None]] = []  # (child, exit status) per restart
        self._etcd_budget = RestartBudget(spec.restart) if spec.restart else None
        self._etcd_given_up = False
        self._next_node = 1
        self._cluster_secret_file: Path | None = None
        self._lock = threading.RLock()  # children: the supervisor thread vs. the caller
        self._closing = closing or threading.Event()
        self._supervisor: threading.Thread | None = None

    # -- views ------------------------------------------------------------------------------

    @property
    def cluster_secret_file(self) -> Path:
        """The secret nodes demand of their callers (the coordinators and each other):
        the spec's file, or data_dir/cluster-secret, generated (0600) on first use."""
        if self._cluster_secret_file is None:
            self._cluster_secret_file = Path(self.spec.cluster_secret_file or ensure_cluster_secret(
                self.spec.data_dir / "cluster-secret"))
        return self._cluster_secret_file

    @property
    def address(self) -> str:
        """The first coordinator's client-facing address."""
        return f"127.0.0.1:{self.coordinator_ports[0]}"

    @property
    def addresses(self) -> list[str]:
        """Every coordinator's address: give them all to a client so it fails over."""
        return [f"127.0.0.1:{p}" for p in self.coordinator_ports]

    @property
    def nodes(self) -> dict[str, subprocess.Popen]:
        """Node id -> process, for every node under supervision."""
        with self._lock:
            return {n: c.proc for n, c in self.children.items() if n in self.node_ports}

    @property
    def coordinators(self) -> dict[str, subprocess.Popen]:
        with self._lock:
            return {n: c.proc for n, c in self.children.items() if n.startswith("coordinator-")}

    @property
    def coordinator(self) -> subprocess.Popen | None:
        """The first coordinator's process (None while it is stopped)."""
        return self.coordinators.get("coordinator-1")

    # -- starting ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        # SUPERVISED: a Ctrl-C reaches the whole group and this supervisor's SIGTERM follows,
        # which the child must not take for a second Ctrl-C (it still drains and checkpoints).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", SUPERVISED_ENV: "1"}
        out = None
        if self.spec.log_dir is not None:
            self.spec.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.spec.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (child owns it)
        argv, preexec = with_parent_death(argv)
        try:
            return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT if out
                                    else None, preexec_fn=preexec)
        finally:
            if out is not None:
                out.close()

    def _add(self, name: str, argv: list[str]) -> None:
        with self._lock:
            budget = RestartBudget(self.spec.restart) if self.spec.restart else None
            self.children[name] = Child(name, argv, self._spawn(name, argv), budget)

    def start(self) -> LocalCluster:
        """Start etcd (unless given), the nodes and the coordinators; wait until every node
        serves through the first coordinator; then supervise (with ``spec.restart``)."""
        for i, port in enumerate(self.coordinator_ports):  # before anything starts
            ensure_port_free("127.0.0.1", port, f"coordinator-{i + 1}")
        if not self.etcd_endpoint:
            self.etcd = EmbeddedEtcd(self.spec.data_dir / "etcd").start()
            self.etcd_endpoint = self.etcd.endpoint
        else:  # a clear error naming the endpoint now, not N node logs later
            asyncio.run(_check_etcd(self.etcd_endpoint))
        for _ in range(self.spec.nodes):
            self.start_node()
        for i in range(self.spec.coordinators):
            self.start_coordinator(f"coordinator-{i + 1}")
        if self.spec.restart is not None:
            self._supervisor = threading.Thread(target=self._supervise_loop,
                                                name="ultrakv-supervisor", daemon=True)
            self._supervisor.start()
        self.wait_ready(self.spec.nodes)
        return self

    def start_node(self, node_id: str | None = None, port: int | None = None,
                   num_blocks: int | None = None) -> str:
        """Start one node process (a new id unless given; ``num_blocks`` overrides the
        spec's for this node); returns its id."""
        with self._lock:
            if node_id is None:
                while f"node-{self._next_node}" in self.node_ports:
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
                        "--lease-ttl", str(self.spec.lease_ttl_s),
                        "--cluster-secret-file", str(self.cluster_secret_file),
                        *self.spec.node_args)
            num_blocks = num_blocks or self.spec.num_blocks
            if num_blocks is not None:
                argv += ["--num-blocks", str(num_blocks)]
            if self.spec.num_scheduler_steps is not None:
                argv += ["--num-scheduler-steps", str(self.spec.num_scheduler_steps)]
            if self.spec.fused_kernels is not None:
                argv += ["--fused-kernels" if self.spec.fused_kernels else "--no-fused-kernels"]
            self._add(node_id, argv)
            return node_id

    def _device(self, ordinal: int) -> str:
        if self.spec.device != "auto":
            return self.spec.device
        import torch

        gpus = torch.cuda.device_count()
        return f"cuda:{ordinal % gpus}" if gpus else "cpu"

    def start_coordinator(self, name: str = "coordinator-1") -> None:
        """Start (or start again) coordinator ``coordinator-<i>`` on its port."""
        index = int(name.removeprefix("coordinator-")) - 1
        if not 0 <= index < len(self.coordinator_ports):
            raise ValueError(f"coordinator must be coordinator-1..coordinator-"
                             f"{len(self.coordinator_ports)}, got {name!r}")
        self._add(name, _cli("coordinator", "--etcd", self.etcd_endpoint, "--host", "127.0.0.1",
                             "--port", str(self.coordinator_ports[index]),
                             "--http-port", str(self.spec.http_port + index if self.spec.http_port else 0),
                             "--cluster-secret-file", str(self.cluster_secret_file),
                             *self.spec.coordinator_args))

    def wait_ready(self, nodes: int, timeout_s: float | None = None, api_key: str | None = None) -> None:
        """Wait until every running coordinator answers and lists ``nodes`` nodes. A
        coordinator with a keys file lists its members only to a key (``api_key``); without
        one, etcd's count of serving nodes stands in, which a coordinator may not have seen
        yet."""
        from ultrakv.client.client import Client, RequestError, RetryPolicy

        deadline = time.monotonic() + (timeout_s or self.spec.startup_timeout_s)
        ports = dict(zip([f"coordinator-{i + 1}" for i in range(len(self.coordinator_ports))],
                         self.coordinator_ports, strict=True))
        pending = [f"127.0.0.1:{ports[name]}" for name in self.coordinators]
        while pending and not self._closing.is_set():
            if self.spec.restart is None:
                self._check_alive()
            with Client(pending[0], timeout=5, retry=RetryPolicy(attempts=1), api_key=api_key) as client:
                try:
                    if len(client.stats()["nodes"]) >= nodes:
                        pending.pop(0)
                        continue
                except RequestError as exc:
                    # A coordinator with a keys file answers the supervisor (no key) only
                    # with its health; the members come from etcd then (a slow answer from
                    # etcd on a loaded machine is a later try, not a failed start).
                    try:
                        if (exc.code == "UNAUTHENTICATED" and client.health()["healthy"]
                                and asyncio.run(self._serving_nodes()) >= nodes):
                            pending.pop(0)
                            continue
                    except EtcdUnavailableError as slow:
                        log.info("cluster not ready yet: %s", slow)
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster not ready with {nodes} nodes within "
                                   f"{timeout_s or self.spec.startup_timeout_s:.0f} s "
                                   f"(waiting for {pending[0]})")
            time.sleep(0.2)

    async def _serving_nodes(self) -> int:
        from ultrakv.cluster.membership import NODES_PREFIX, NodeRecord, NodeState

        async with EtcdStore(self.etcd_endpoint) as store:
            kvs, _ = await store.get_prefix(NODES_PREFIX)
        return sum(NodeRecord.from_json(kv.value).state is NodeState.SERVING for kv in kvs)

    def _check_alive(self) -> None:
        with self._lock:
            for name, child in self.children.items():
                if child.proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {child.proc.returncode} "
                                       "while starting")

    # -- faults -----------------------------------------------------------------------------

    def kill_node(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        """Signal a node (SIGKILL by default: a crash) and reap it; it is not restarted."""
        with self._lock:
            child = self.children.pop(node_id)
        child.proc.send_signal(sig)
        child.proc.wait(timeout=30)

    def crash(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Signal a supervised child (a node or ``coordinator-<i>``) and reap it, leaving it
        under supervision: with ``spec.restart`` the supervisor starts it again. Returns the
        pid that was killed."""
        with self._lock:
            proc = self.children[name].proc
        proc.send_signal(sig)
        proc.wait(timeout=30)
        return proc.pid

    def send_signal(self, name: str, sig: int) -> None:
        """Send ``sig`` (SIGSTOP, SIGCONT...) to a child without waiting for anything."""
        with self._lock:
            self.children[name].proc.send_signal(sig)

    def stop_coordinator(self, sig: int = signal.SIGTERM, name: str = "coordinator-1") -> None:
        """Stop one coordinator; it stays down until ``start_coordinator(name)``."""
        with self._lock:
            child = self.children.pop(name, None)
        if child is not None:
            child.proc.send_signal(sig)
            child.proc.wait(timeout=30)

    # -- supervision ------------------------------------------------------------------------

    def supervise(self, now: float | None = None) -> None:
        """One pass: notice children that exited on their own and restart them when due
        (or give up on one whose restart budget is spent)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for child in list(self.children.values()):
                self._supervise_child(child, now)
            self._supervise_etcd(now)

    def _supervise_child(self, child: Child, now: float) -> None:
        if child.given_up or child.budget is None:
            return
        status = child.proc.poll()
        if status is None:
            return
        if child.restart_at is None:
            delay = child.budget.next_delay(now)
            if delay is None:
                child.given_up = True
                log.error("%s exited with status %s; it crashed %d times within %.0f s, "
                          "giving up on it", child.name, status, child.budget.used,
                          child.budget.policy.window_s)
                return
            child.restart_at = now + delay
            log.warning("%s exited with status %s; restarting it in %.1f s (restart %d of %d "
                        "within %.0f s)", child.name, status, delay, child.budget.used,
                        child.budget.policy.max_restarts, child.budget.policy.window_s)
        if now >= child.restart_at:
            child.proc = self._spawn(child.name, child.argv)
            child.restart_at = None
            self.restarts.append((child.name, status))
            log.info("%s restarted (pid %d)", child.name, child.proc.pid)

    def _supervise_etcd(self, now: float) -> None:
        if self.etcd is None or self._etcd_budget is None or self._etcd_given_up:
            return
        if not self.etcd.crashed:
            return
        delay = self._etcd_budget.next_delay(now)
        if delay is None:
            self._etcd_given_up = True
            log.error("embedded etcd crashed %d times within %.0f s, giving up on it",
                      self._etcd_budget.used, self._etcd_budget.policy.window_s)
            return
        log.warning("embedded etcd exited; restarting it in %.1f s", delay)
        time.sleep(delay)  # etcd first: nothing else makes progress without it
        try:
            self.etcd.start()
            self.restarts.append((ETCD, None))
            log.info("embedded etcd restarted (pid %s)", self.etcd.pid)
        except EtcdStartError as exc:
            log.error("restarting etcd failed: %s", exc)

    def _supervise_loop(self) -> None:
        while not self._closing.wait(0.2):
            try:
                self.supervise()
            except Exception:  # one bad pass must not end supervision
                log.exception("supervisor pass failed")

    @property
    def failed(self) -> str:
        """Why the cluster cannot serve any more ("" while it can): the supervisor gave up
        on etcd or on every coordinator."""
        with self._lock:
            if self._etcd_given_up:
                return "embedded etcd keeps crashing"
            coordinators = [c for n, c in self.children.items() if n.startswith("coordinator-")]
            if coordinators and all(c.given_up for c in coordinators):
                return "every coordinator keeps crashing"
        return ""

    # -- stopping ---------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM every child (nodes checkpoint and leave), then etcd; SIGKILL stragglers."""
        self._closing.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=30)
            self._supervisor = None
        with self._lock:
            procs = [c.proc for c in self.children.values()]
            self.children.clear()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stopped child cannot act on SIGTERM
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
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
    """``ultrakv serve --nodes N``: run the cluster until Ctrl-C or SIGTERM, then stop all.
    Crashed children are restarted meanwhile; exits 1 if etcd or every coordinator keeps
    crashing."""
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster = LocalCluster(spec, closing=stop)
    status = 0
    try:
        cluster.start()
        if not stop.is_set():
            log.info("cluster serving on %s: %d nodes, %d coordinators, etcd %s",
                     ",".join(cluster.addresses), len(cluster.nodes), spec.coordinators,
                     cluster.etcd_endpoint)
        while not stop.wait(0.5):
            if cluster.failed:
                log.error("the cluster cannot serve: %s", cluster.failed)
                status = 1
                break
        log.info("stopping the cluster")
        return status
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        cluster.stop()
        log.info("stopped")
