"""The Helm chart (helm/ultrakv), rendered with Go's text/template + sprig as Helm does:
every object valid for Kubernetes, values.schema.json rejecting bad values, and the
properties an operator relies on (helm-unittest style checks over the rendered objects)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from chart_render import (
    CHART,
    ROOT,
    container,
    find,
    helm_template,
    pod_spec,
    render,
    renderer_or_skip,
    workloads,
)

KUBE_VERSIONS = ("1.28.0", "1.34.0")  # the chart's kubeVersion floor and a current release
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def _renderer() -> None:
    renderer_or_skip()


@pytest.fixture(scope="module")
def default() -> list[dict]:
    return render()


@pytest.fixture(scope="module")
def cpu() -> list[dict]:
    return render(files=(CHART / "ci" / "cpu-values.yaml",))


# --- every rendered object is valid Kubernetes --------------------------------------------


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_rendered_objects_validate_against_kubernetes_schemas(values: Path | None) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    objects = render(files=(values,) if values else ())
    assert objects
    for obj in objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: kubernetes-validate has no schema; checked in test_monitoring_objects
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)
        assert "namespace" not in obj["metadata"]  # set by helm -n / a kustomize overlay


def test_notes_render() -> None:
    notes = helm_template.render(helm_template.load_values(), notes=True)
    assert "kubectl -n default get pods -l app.kubernetes.io/instance=ultrakv" in notes
    assert "2 x 1 nvidia.com/gpu" in notes


# --- values.schema.json -------------------------------------------------------------------


def test_schema_accepts_the_defaults_and_the_example_values() -> None:
    for f in CI_VALUES:
        helm_template.load_values([f])
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize(("overrides", "path"), [
    ({"coordinator": {"replicas": 0}}, "coordinator.replicas"),
    ({"node": {"gpu": {"count": -1}}}, "node.gpu.count"),
    ({"node": {"gpu": {"resourceName": "gpu"}}}, "node.gpu.resourceName"),
    ({"node": {"grpcPort": 70000}}, "node.grpcPort"),
    ({"node": {"shm": {"sizeLimit": "lots"}}}, "node.shm.sizeLimit"),
    ({"node": {"drainTimeoutSeconds": 0}}, "node.drainTimeoutSeconds"),
    ({"node": {"probes": {"startup": {"periodSeconds": 0}}}}, "node.probes.startup.periodSeconds"),
    ({"node": {"replica": 3}}, "node"),  # a typo is an error, not a silently ignored key
    ({"model": {"source": "s3"}}, "model.source"),
    ({"model": {"source": "hostPath", "hostPath": ""}}, "model.hostPath"),
    ({"etcd": {"replicas": 2}}, "etcd.replicas"),
    ({"etcd": {"external": {"endpoint": "etcd"}}}, "etcd.external.endpoint"),
    ({"clusterSecret": {"create": False}}, "clusterSecret"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "podSecurityContext.runAsNonRoot"),
    ({"securityContext": {"allowPrivilegeEscalation": True}},
     "securityContext.allowPrivilegeEscalation"),
    ({"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy"),
    ({"config": {"engin": {}}}, "config"),
])
def test_schema_rejects_bad_values(overrides: dict, path: str) -> None:
    with pytest.raises(helm_template.ValuesError) as err:
        helm_template.load_values(overrides=overrides)
    assert f"- {path}:" in str(err.value)


def test_grace_period_shorter_than_drain_is_refused() -> None:
    with pytest.raises(RuntimeError, match="terminationGracePeriodSeconds"):
        render({"node": {"drainTimeoutSeconds": 120, "terminationGracePeriodSeconds": 100}})


# --- workloads -------------------------------------------------------------------------------


def test_replicas(default: list[dict]) -> None:
    assert find(default, "Deployment", "coordinator")["spec"]["replicas"] >= 2
    assert find(default, "StatefulSet", "node")["spec"]["replicas"] == 2
    etcd = find(default, "StatefulSet", "etcd")
    assert etcd["spec"]["replicas"] == 3
    assert etcd["spec"]["podManagementPolicy"] == "Parallel"  # members bootstrap together
    assert "--initial-cluster=" + ",".join(
        f"ultrakv-etcd-{i}=http://ultrakv-etcd-{i}.ultrakv-etcd-peer.$(POD_NAMESPACE).svc.cluster.local:2380"
        for i in range(3)) in container(etcd, "etcd")["command"]


def test_gpu_requests_runtime_class_and_device(default: list[dict]) -> None:
    node = find(default, "StatefulSet", "node")
    c = container(node, "node")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert pod_spec(node)["runtimeClassName"] == "nvidia"
    assert "--device=cuda" in c["args"]
    assert c["image"].endswith("-cuda")
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        pod_spec(node)["tolerations"]

    other = find(render({"node": {"gpu": {"count": 4, "resourceName": "amd.com/gpu"},
                                  "runtimeClassName": ""}}), "StatefulSet", "node")
    limits = container(other, "node")["resources"]["limits"]
    assert limits["amd.com/gpu"] == 4 and "nvidia.com/gpu" not in limits
    assert "runtimeClassName" not in pod_spec(other)


def test_multi_gpu_node_pods_split_the_model_or_spread_sessions() -> None:
    tp = find(render({"node": {"gpu": {"count": 2}, "shm": {"sizeLimit": "16Gi"}}}), "StatefulSet", "node")
    c = container(tp, "node")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 and c["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert "--tensor-parallel-size=2" in c["args"] and not any(a.startswith("--gpus") for a in c["args"])
    shm = next(v for v in pod_spec(tp)["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    dp = container(find(render({"node": {"gpu": {"count": 4, "parallelism": "data"}}}), "StatefulSet", "node"), "node")
    assert "--gpus=all" in dp["args"] and not any(a.startswith("--tensor-parallel") for a in dp["args"])
    one = container(find(render(), "StatefulSet", "node"), "node")
    assert not any(a.startswith(("--gpus", "--tensor-parallel")) for a in one["args"])


def test_cpu_only_nodes(cpu: list[dict]) -> None:
    node = find(cpu, "StatefulSet", "node")
    c = container(node, "node")
    assert not any("gpu" in k for k in c["resources"].get("limits", {}))
    assert "runtimeClassName" not in pod_spec(node)
    assert "--device=cpu" in c["args"] and "--model=tiny" in c["args"]
    assert c["image"].endswith("-cpu")
    # Coordinators never need the CUDA image.
    assert container(find(cpu, "Deployment", "coordinator"), "coordinator")["image"].endswith("-cpu")


def test_probes_in_three_stages(default: list[dict]) -> None:
    node = container(find(default, "StatefulSet", "node"), "node")
    grpc_coord = container(find(render({"coordinator": {"http": {"enabled": False}}}),
                                "Deployment", "coordinator"), "coordinator")
    for c in (node, grpc_coord):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            command = c[probe]["exec"]["command"]
            assert command[:2] == ["ultrakv", "health"]
            port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
            assert f"--address=127.0.0.1:{port}" in command
            # ultrakv health's own deadline ends before the kubelet gives up on the probe
            timeout = int(next(a for a in command if a.startswith("--timeout=")).split("=")[1])
            assert timeout < c[probe]["timeoutSeconds"]
    # Loading weights and capturing graphs: the startup budget is long (>= 10 min)...
    startup = node["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    # ...liveness is the cheap plain check, readiness waits for the ring.
    assert not any(a.startswith("--service") for a in node["livenessProbe"]["exec"]["command"])
    assert "--service=ultrakv.ring" in node["readinessProbe"]["exec"]["command"]
    assert "--service=ultrakv.v1.UltraKV" in grpc_coord["readinessProbe"]["exec"]["command"]
    # With the HTTP port (the default), coordinators are probed with plain GETs.
    coord = container(find(default, "Deployment", "coordinator"), "coordinator")
    assert coord["startupProbe"]["httpGet"] == {"path": "/health/live", "port": "http",
                                                "scheme": "HTTP"}
    assert coord["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": "http",
                                                 "scheme": "HTTP"}
    assert coord["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http",
                                                  "scheme": "HTTP"}
    # TLS on the port: HTTPS probes; mutual TLS: the kubelet has no client certificate.
    tls = container(find(render({"tls": {"enabled": True}}), "Deployment", "coordinator"),
                    "coordinator")
    assert tls["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    mutual = container(find(render({"tls": {"enabled": True, "clientAuth": True}}),
                            "Deployment", "coordinator"), "coordinator")
    assert "--tls-cert=/etc/ultrakv/tls/tls.crt" in mutual["readinessProbe"]["exec"]["command"]


def test_drain_in_prestop_and_grace_period(default: list[dict]) -> None:
    node = find(default, "StatefulSet", "node")
    hook = container(node, "node")["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["/bin/sh", "-c"]
    assert re.fullmatch(r'exec ultrakv drain "\$POD_NAME" --etcd "\$ULTRAKV_ETCD" --timeout 120',
                        hook[2])
    assert pod_spec(node)["terminationGracePeriodSeconds"] == 180  # drain 120 + 60 to stop
    longer = find(render({"node": {"drainTimeoutSeconds": 600}}), "StatefulSet", "node")
    assert pod_spec(longer)["terminationGracePeriodSeconds"] == 660


def test_pod_name_is_node_id(default: list[dict]) -> None:
    node = find(default, "StatefulSet", "node")
    c = container(node, "node")
    assert "--node-id=$(POD_NAME)" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    # Peers dial the pod's stable DNS name, published before the pod is ready.
    headless = find(default, "Service", "-node")
    assert node["spec"]["serviceName"] == headless["metadata"]["name"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert ("--advertise-host=$(POD_NAME).ultrakv-node.$(POD_NAMESPACE).svc.cluster.local"
            in c["args"])


def test_dev_shm_is_a_sized_memory_volume(default: list[dict]) -> None:
    node = find(default, "StatefulSet", "node")
    mount = next(m for m in container(node, "node")["volumeMounts"] if m["mountPath"] == "/dev/shm")
    volume = next(v for v in pod_spec(node)["volumes"] if v["name"] == mount["name"])
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}


def test_security_context_is_restricted(default: list[dict]) -> None:
    for obj in workloads(default):
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]


def test_pod_disruption_budgets(default: list[dict]) -> None:
    node = find(default, "PodDisruptionBudget", "node")
    assert node["spec"]["maxUnavailable"] == 1
    assert node["spec"]["selector"]["matchLabels"] == \
        find(default, "StatefulSet", "node")["spec"]["selector"]["matchLabels"]
    assert find(default, "PodDisruptionBudget", "coordinator")["spec"]["minAvailable"] == 1
    assert find(default, "PodDisruptionBudget", "etcd")["spec"]["maxUnavailable"] == 1


def test_secrets_are_referenced_not_inlined(default: list[dict]) -> None:
    secret = find(default, "Secret", "cluster-secret")
    value = secret["data"]["cluster-secret"]
    text = yaml.safe_dump([o for o in default if o["kind"] != "Secret"])
    assert value not in text
    for obj in workloads(default):
        spec = pod_spec(obj)
        for c in spec["containers"] + spec.get("initContainers", []):
            for env in c.get("env", []):  # a secret's path, never its value
                if "secret" in env["name"].lower():
                    assert env["value"].startswith("/etc/ultrakv/cluster-secret/"), env
    node = find(default, "StatefulSet", "node")
    volume = next(v for v in pod_spec(node)["volumes"] if v["name"] == "cluster-secret")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    for obj in (node, find(default, "Deployment", "coordinator")):
        c = pod_spec(obj)["containers"][0]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "cluster-secret")
        assert {"name": "ULTRAKV_CLUSTER_SECRET_FILE",
                "value": mount["mountPath"] + "/cluster-secret"} in c["env"]

    existing = render({"clusterSecret": {"create": False, "existingSecret": "mine"},
                       "tls": {"enabled": True, "existingSecret": "my-tls"}})
    assert not [o for o in existing if o["kind"] == "Secret"]
    volumes = {v["name"]: v for v in pod_spec(find(existing, "StatefulSet", "node"))["volumes"]}
    assert volumes["cluster-secret"]["secret"]["secretName"] == "mine"
    volumes = {v["name"]: v for v in pod_spec(find(existing, "Deployment", "coordinator"))["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "my-tls"


def test_coordinator_tls_and_api_keys(default: list[dict]) -> None:
    args = container(find(default, "Deployment", "coordinator"), "coordinator")["args"]
    assert not [a for a in args if a.startswith(("--tls", "--keys-file"))]
    assert "--config=/etc/ultrakv/config/ultrakv.yaml" in args  # limits + security sections

    objects = render({"tls": {"enabled": True, "clientAuth": True},
                      "auth": {"keysSecret": "ultrakv-keys"},
                      "coordinator": {"http": {"enabled": False}}})
    coord = container(find(objects, "Deployment", "coordinator"), "coordinator")
    assert {"--tls-cert=/etc/ultrakv/tls/tls.crt", "--tls-key=/etc/ultrakv/tls/tls.key",
            "--tls-client-ca=/etc/ultrakv/tls/ca.crt",
            "--keys-file=/etc/ultrakv/keys/keys.yaml"} <= set(coord["args"])
    mounts = {m["name"]: m["mountPath"] for m in coord["volumeMounts"]}
    assert mounts["tls"] == "/etc/ultrakv/tls" and mounts["keys"] == "/etc/ultrakv/keys"
    volumes = {v["name"]: v for v in pod_spec(find(objects, "Deployment", "coordinator"))["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "ultrakv-keys"
    # gRPC probes then go over the same mutual TLS, checking the Service's name.
    probe = coord["readinessProbe"]["exec"]["command"]
    assert {"--tls-ca=/etc/ultrakv/tls/ca.crt", "--tls-server-name=ultrakv",
            "--tls-cert=/etc/ultrakv/tls/tls.crt"} <= set(probe)


PEER_FLAGS = {"--peer-ca-cert=/etc/ultrakv/peer-tls/ca.crt", "--peer-cert=/etc/ultrakv/peer-tls/tls.crt",
              "--peer-key=/etc/ultrakv/peer-tls/tls.key"}


def test_peer_mutual_tls(default: list[dict]) -> None:
    """peerTls: nodes, coordinators, the drain hook and the nodes' probes get the members'
    certificate and CA from one Secret, mounted read-only (off by default)."""
    from cryptography import x509

    for obj in workloads(default):
        for c in pod_spec(obj)["containers"]:
            assert not [a for a in c.get("args", []) if a.startswith("--peer")], c["name"]
    assert not [o for o in default if o["kind"] == "Secret" and "peer" in o["metadata"]["name"]]

    objects = render({"peerTls": {"enabled": True}})
    secret = find(objects, "Secret", "-peer-tls")
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    node_sts, coord_dep = find(objects, "StatefulSet", "node"), find(objects, "Deployment", "coordinator")
    node, coord = container(node_sts, "node"), container(coord_dep, "coordinator")
    for obj, c in ((node_sts, node), (coord_dep, coord)):
        assert PEER_FLAGS <= set(c["args"]), c["name"]
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["peer-tls"]["mountPath"] == "/etc/ultrakv/peer-tls" and mounts["peer-tls"]["readOnly"]
        volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
        assert volumes["peer-tls"]["secret"] == {"secretName": secret["metadata"]["name"], "defaultMode": 0o400}
    # preStop drains over the same mutual TLS; the kubelet's probes present the certificate.
    drain = node["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert all(f.replace("=", " ", 1) in drain for f in PEER_FLAGS), drain
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert {"--tls-ca=/etc/ultrakv/peer-tls/ca.crt", "--tls-cert=/etc/ultrakv/peer-tls/tls.crt",
                "--tls-key=/etc/ultrakv/peer-tls/tls.key", "--tls-server-name=localhost"} <= \
            set(node[probe]["exec"]["command"]), probe
    # One certificate, server and client, naming every node pod (peers dial those names)
    # and localhost (the probes), signed by the CA beside it.
    import base64

    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.crt"]))
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"*.ultrakv-node.default.svc.cluster.local", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert {x509.ExtendedKeyUsageOID.SERVER_AUTH, x509.ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usage)

    existing = render({"peerTls": {"enabled": True, "existingSecret": "cert-manager-peers"}})
    assert not [o for o in existing if o["kind"] == "Secret" and "peer" in o["metadata"]["name"]]
    volumes = {v["name"]: v for v in pod_spec(find(existing, "StatefulSet", "node"))["volumes"]}
    assert volumes["peer-tls"]["secret"]["secretName"] == "cert-manager-peers"


def test_nodes_need_no_api_keys_file() -> None:
    """Clients authenticate at the coordinators; a node's every gRPC service but health sits
    behind the cluster secret (it trusts the tenant the coordinator forwards), and its HTTP
    port stays off, so nodes get no keys file."""
    objects = render({"auth": {"keysSecret": "ultrakv-keys"}})
    node = container(find(objects, "StatefulSet", "node"), "node")
    assert not [a for a in node["args"] if a.startswith(("--keys-file", "--http-port"))]
    assert "ULTRAKV_CLUSTER_SECRET_FILE" in {e["name"] for e in node["env"]}
    assert "http" not in {p["name"] for p in node["ports"]}


def test_generated_tls_secret() -> None:
    objects = render({"tls": {"enabled": True}})
    tls = find(objects, "Secret", "-tls")
    assert tls["type"] == "kubernetes.io/tls"
    assert set(tls["data"]) == {"tls.crt", "tls.key", "ca.crt"}


def test_model_sources() -> None:
    created = render({"model": {"source": "pvc", "path": "llama"}})
    pvc = find(created, "PersistentVolumeClaim", "model")
    node = find(created, "StatefulSet", "node")
    volumes = {v["name"]: v for v in pod_spec(node)["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": pvc["metadata"]["name"],
                                                         "readOnly": True}
    assert "--model=/models/llama" in container(node, "node")["args"]

    existing = render({"model": {"source": "pvc", "path": "m.gguf",
                                 "pvc": {"existingClaim": "weights"}}})
    assert not [o for o in existing if o["kind"] == "PersistentVolumeClaim"]
    volumes = {v["name"]: v for v in pod_spec(find(existing, "StatefulSet", "node"))["volumes"]}
    assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "weights"

    host = find(render({"model": {"source": "hostPath", "hostPath": "/srv/models", "path": "q"}}),
                "StatefulSet", "node")
    volumes = {v["name"]: v for v in pod_spec(host)["volumes"]}
    assert volumes["model"]["hostPath"] == {"path": "/srv/models", "type": "Directory"}


def test_data_volume_claim_or_empty_dir(default: list[dict]) -> None:
    node = find(default, "StatefulSet", "node")
    (claim,) = node["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert node["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    mounts = {m["name"]: m["mountPath"] for m in container(node, "node")["volumeMounts"]}
    assert mounts["data"] == "/var/lib/ultrakv"
    assert "--checkpoint-dir=/var/lib/ultrakv/checkpoints" in container(node, "node")["args"]
    assert {"--kv-disk-dir=/var/lib/ultrakv/kv-tier", "--kv-disk-gib=50"} <= set(container(node, "node")["args"])
    off = find(render({"node": {"kvDiskTier": {"enabled": False}}}), "StatefulSet", "node")
    assert not [a for a in container(off, "node")["args"] if a.startswith("--kv-disk")]

    ephemeral = find(render({"node": {"persistence": {"enabled": False}}}), "StatefulSet", "node")
    assert "volumeClaimTemplates" not in ephemeral["spec"]
    assert {"name": "data", "emptyDir": {}} in pod_spec(ephemeral)["volumes"]


def test_coordinator_service_ports_and_ingress(default: list[dict]) -> None:
    service = find(default, "Service", "ultrakv")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == \
        {"grpc": 50051, "http": 8000, "metrics": 9090}
    args = container(find(default, "Deployment", "coordinator"), "coordinator")["args"]
    assert "--http-port=8000" in args
    assert not [o for o in default if o["kind"] == "Ingress"]

    grpc_only = render({"coordinator": {"http": {"enabled": False}}})
    ports = {p["name"] for p in find(grpc_only, "Service", "ultrakv")["spec"]["ports"]}
    assert ports == {"grpc", "metrics"}
    args = container(find(grpc_only, "Deployment", "coordinator"), "coordinator")["args"]
    assert "--http-port=0" in args  # the coordinator's own default would open 8000

    ingress = find(render({"coordinator": {"ingress": {"enabled": True}}}), "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "ultrakv", "port": {"name": "http"}}
    with pytest.raises(RuntimeError, match="needs coordinator.http.enabled"):
        render({"coordinator": {"http": {"enabled": False}, "ingress": {"enabled": True}}})


def test_external_etcd(default: list[dict]) -> None:
    objects = render({"etcd": {"external": {"endpoint": "etcd.infra:2379"}}})
    assert not [o for o in objects if "etcd" in o["metadata"]["name"]]
    for obj in workloads(objects):
        env = {e["name"]: e.get("value") for e in container(obj, obj["spec"]["template"]["spec"][
            "containers"][0]["name"])["env"]}
        assert env["ULTRAKV_ETCD"] == "etcd.infra:2379"
        init = pod_spec(obj)["initContainers"][0]
        assert "--endpoints=etcd.infra:2379" in init["command"]
    coordinator = find(default, "Deployment", "coordinator")
    assert {"name": "ULTRAKV_ETCD", "value": "ultrakv-etcd:2379"} in \
        container(coordinator, "coordinator")["env"]


def test_config_map_carries_the_config_block(default: list[dict]) -> None:
    from ultrakv.client.config_file import NodeConfig

    data = yaml.safe_load(find(default, "ConfigMap", "config")["data"]["ultrakv.yaml"])
    config = NodeConfig.from_dict(data)  # the node accepts it
    assert config.engine.num_scheduler_steps == 4
    assert "--config=/etc/ultrakv/config/ultrakv.yaml" in \
        container(find(default, "StatefulSet", "node"), "node")["args"]


def test_monitoring_objects() -> None:
    objects = render({"metrics": {"serviceMonitor": {"enabled": True},
                                  "prometheusRule": {"enabled": True}}})
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == 3  # coordinator, node, etcd
    services = [o for o in objects if o["kind"] == "Service"]
    for m in monitors:
        port = m["spec"]["endpoints"][0]["port"]
        selector = m["spec"]["selector"]
        selected = [s for s in services
                    if all(s["metadata"]["labels"].get(k) == v for k, v in selector["matchLabels"].items())
                    and all(e["key"] not in s["metadata"]["labels"] for e in selector.get("matchExpressions", ())
                            if e["operator"] == "DoesNotExist")]
        # Exactly one Service each: etcd's headless peer Service has its labels and a client
        # port, and every member was scraped twice.
        assert len(selected) == 1, [s["metadata"]["name"] for s in selected]
        assert port in {p["name"] for p in selected[0]["spec"]["ports"]}
    rule = find(objects, "PrometheusRule")
    alerts = {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert alerts == {"UltrakvNodeDown", "UltrakvRingUnstable", "UltrakvKVCacheFull",
                      "UltrakvTTFTHigh", "UltrakvErrorRatioHigh", "UltrakvEtcdUnreachable"}
    full = next(r for g in rule["spec"]["groups"] for r in g["rules"] if r["alert"] == "UltrakvKVCacheFull")
    assert "above 90% for 5 minutes" in full["annotations"]["summary"]  # was "above 0%" (integer mul)
    with pytest.raises(RuntimeError, match="Prometheus operator CRDs"):
        render({"metrics": {"serviceMonitor": {"enabled": True}}}, api_versions=())


@pytest.mark.parametrize(("values", "suffix"), [({"tls": {"enabled": True}}, "-tls"),
                                                ({"peerTls": {"enabled": True}}, "-peer-tls")])
def test_generated_certificates_survive_an_upgrade(values, suffix) -> None:
    """An upgrade renders against the Secrets an install made (``lookup``): the client TLS
    Secret got a new CA every time (clients told to trust the old one broke); the peer one
    kept its own."""
    first = find(render(values), "Secret", suffix)
    assert find(render(values), "Secret", suffix)["data"] != first["data"]  # a fresh install: new ones
    upgraded = find(render(values, existing=[first]), "Secret", suffix)
    assert upgraded["data"] == first["data"]
    assert upgraded["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


# --- the Kustomize base ---------------------------------------------------------------------


def test_kustomize_base_is_the_chart_rendered() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate", ROOT / "deploy/kustomize/generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for path, text in generate.generate().items():
        assert path.read_text() == text, f"{path} is stale: run `make kustomize-base`"


def test_kubectl_kustomize_builds_the_base(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed (.ci/run installs it where the package exists)")
    shutil.copytree(ROOT / "deploy/kustomize", tmp_path / "kustomize")
    overlay = tmp_path / "kustomize" / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: llm\n"
        "resources: [../base]\ncomponents: [../monitoring]\n")
    for target, kinds in ((tmp_path / "kustomize" / "base", 12), (overlay, 16)):
        out = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True,
                             check=True).stdout
        objects = [o for o in yaml.safe_load_all(out) if o]
        assert len(objects) == kinds
    assert all(o["metadata"]["namespace"] == "llm" for o in objects)
    assert not [o for o in objects if o["kind"] == "Secret"]  # created by the operator


# --- the renderer itself behaves as Helm's engine ----------------------------------------------


def test_renderer_implements_helms_functions_and_objects(tmp_path: Path) -> None:
    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 1.2.3\n"
                                      "appVersion: \"9.9\"\n")
    (chart / "values.yaml").write_text("")
    (chart / "values.schema.json").write_text("{}")
    (chart / "templates" / "_helpers.tpl").write_text(
        '{{- define "demo.name" -}}{{ .Release.Name }}-{{ .Chart.Name }}{{- end -}}')
    (chart / "templates" / "empty.yaml").write_text("{{- if false }}x: 1{{ end }}\n")
    (chart / "templates" / "cm.yaml").write_text("""\
kind: ConfigMap
metadata:
  name: {{ include "demo.name" . | upper }}
data:
  ns: {{ .Release.Namespace }}
  chart: "{{ .Chart.Version }}/{{ .Chart.AppVersion }}"
  kube: "{{ .Capabilities.KubeVersion.Major }}.{{ .Capabilities.KubeVersion.Minor }}"
  crd: "{{ .Capabilities.APIVersions.Has "example.com/v1" }}"
  tpl: {{ tpl .Values.greeting . | quote }}
  missing: "{{ .Values.nothing.here }}"
  number: "{{ .Values.big }}"
  yaml: |
    {{- toYaml .Values.nested | nindent 4 }}
""")
    values = {"greeting": "hi {{ .Release.Name }}", "big": 2, "nested": {"b": [1, "x"], "a": True},
              "nothing": {}}
    out = helm_template.render(values, name="rel", namespace="ns1", chart=chart,
                               api_versions=("example.com/v1",), kube_version="v1.31.2")
    assert out.count("# Source: demo/templates/") == 1  # the empty template is left out
    data = yaml.safe_load(out.split("\n", 2)[2])["data"]
    assert yaml.safe_load(out.split("\n", 2)[2])["metadata"]["name"] == "REL-DEMO"
    assert data == {"ns": "ns1", "chart": "1.2.3/9.9", "kube": "1.31", "crd": "true",
                    "tpl": "hi rel", "missing": "", "number": "2",
                    "yaml": "a: true\nb:\n- 1\n- x\n"}

    (chart / "templates" / "req.yaml").write_text('x: {{ required "x.y is required" .Values.y }}')
    with pytest.raises(RuntimeError, match="x.y is required"):
        helm_template.render(values, chart=chart)
