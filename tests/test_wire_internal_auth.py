"""Issue 10, internal RPCs over real gRPC on loopback: a cluster member answers only callers
with the cluster secret; KV imported by anyone else never reaches the shared prefix cache;
single-process `ultrakv serve` exposes no NodeService and binds loopback. (Real node
processes authenticating each other: tests/test_cluster_serving.py.)"""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from h2.errors import ErrorCodes
from h2.events import StreamReset
from http2_client import RawHttp2, ping_flood
from peer_auth_helpers import secret_channel
from ultrakv.client import Client
from ultrakv.cluster.checkpoint import write_session
from ultrakv.cluster.etcd_server import free_port
from ultrakv.cluster.peer_auth import (
    ensure_cluster_secret,
    read_cluster_secret,
    require_cluster_secret,
)
from ultrakv.cluster.peers import PeerChannels, PeerTLS
from ultrakv.cluster.session_state import SessionState
from ultrakv.cluster.session_transfer import state_to_chunks
from ultrakv.cluster.transport import exposure_warnings
from ultrakv.cluster.validation import Limits
from ultrakv.coordinator.health import HealthChecker, HealthPolicy
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.server import BackgroundServer, ServerSettings
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import node_pb2_grpc, ultrakv_pb2_grpc
from ultrakv.v1 import types_pb2 as pb

VICTIM = [(i * 37) % 300 + 1 for i in range(40)]  # two full blocks and a bit


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=64))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory):
    return ensure_cluster_secret(tmp_path_factory.mktemp("s") / "cluster-secret")


def greedy(stub, tokens: list[int], session_id: str | None = None) -> pb.GenerateResult:
    request = pb.GenerateStreamRequest(generate=pb.GenerateRequest(
        request_id=f"r-{time.monotonic_ns()}", token_ids=pb.TokenIds(ids=tokens),
        session_id=session_id,
        sampling=pb.SamplingOptions(max_length=8, temperature=0.0, ignore_eos=True)))
    last = list(stub.Generate(iter([request]), timeout=30))[-1]
    assert last.WhichOneof("event") == "result", last
    return last.result


def test_the_secret_file_is_private_and_random(secret_file, tmp_path):
    """Finding 16 (the secret half): the generated secret is 0600."""
    assert stat.S_IMODE(os.stat(secret_file).st_mode) == 0o600
    other = ensure_cluster_secret(tmp_path / "other")
    assert read_cluster_secret(secret_file) != read_cluster_secret(other)
    assert ensure_cluster_secret(secret_file) == secret_file  # kept, not regenerated


def test_a_member_answers_only_callers_with_the_cluster_secret(engine, secret_file):
    """Findings 2, 4 (import part) and 17 (node Health, reflection): without the secret,
    ListSessions/ExportSession, ImportSession, ReplicateHistory, PromoteReplica, Stats, Health
    and reflection are refused; with it they work. Health probes stay open."""
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.5,
                              cluster_secret_file=str(secret_file))
    secret = read_cluster_secret(secret_file)
    with BackgroundServer(engine, settings) as srv:
        with secret_channel(srv.address, secret) as peer_channel:
            peer = node_pb2_grpc.NodeServiceStub(peer_channel)
            greedy(peer, VICTIM[:20], session_id="victim")  # a live session to go after
        victim_history = list(engine.sessions.history("victim"))
        replicas = engine.sessions.num_replicas
        history = list(state_to_chunks(SessionState("victim", [1, 2, 3], 1,
                                                    engine.model_fingerprint)))
        calls = {
            "ListSessions": lambda s: s.ListSessions(npb.ListSessionsRequest(), timeout=10),
            "ExportSession": lambda s: list(s.ExportSession(
                npb.ExportSessionRequest(session_id="victim"), timeout=10)),
            "ImportSession": lambda s: s.ImportSession(iter(history), timeout=10),
            # A newer copy than the one served here (an older one is refused: fencing).
            "ReplicateHistory": lambda s: s.ReplicateHistory(npb.ReplicateHistoryRequest(
                session_id="victim", token_ids=[1, 2], turns=2), timeout=10),
            "PromoteReplica": lambda s: s.PromoteReplica(
                npb.PromoteReplicaRequest(session_id="victim"), timeout=10),
            "Stats": lambda s: s.Stats(pb.StatsRequest(), timeout=10),
            "Health": lambda s: s.Health(npb.NodeHealthRequest(), timeout=10),
            "Generate": lambda s: greedy(s, [1, 2, 3]),
        }
        wrong = secret_channel(srv.address, "x" * len(secret))
        anonymous = grpc.insecure_channel(srv.address)
        with wrong, anonymous:
            for channel in (anonymous, wrong):
                stub = node_pb2_grpc.NodeServiceStub(channel)
                for name, call in calls.items():
                    with pytest.raises(grpc.RpcError) as err:
                        call(stub)
                    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
                with pytest.raises(grpc.RpcError) as err:  # the client API of a member, too
                    greedy(ultrakv_pb2_grpc.UltraKVStub(channel), [1, 2, 3])
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.RpcError) as err:
                    list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                        iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                        timeout=10))
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            probe = health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(),
                                                                timeout=10)
            assert probe.status == health_pb2.HealthCheckResponse.SERVING
        assert engine.sessions.history("victim") == victim_history  # not overwritten
        assert engine.sessions.num_replicas == replicas  # nothing planted
        with secret_channel(srv.address, secret) as peer_channel:
            peer = node_pb2_grpc.NodeServiceStub(peer_channel)
            for call in calls.values():
                call(peer)  # a peer may do all of it


@pytest.mark.parametrize("argv", [["node", "--model", "tiny", "--device", "cpu", "--port", "0"],
                                  ["coordinator", "--etcd", "127.0.0.1:1", "--port", "0"]])
def test_hand_started_members_refuse_to_start_without_a_cluster_secret(argv, monkeypatch, capsys):
    """A node or coordinator started by hand had no secret unless the operator thought of
    one: every node then served NodeService to anyone. Now it refuses (before loading the
    model or dialing etcd), naming the flag to give and the explicit insecure opt-out."""
    from ultrakv.client.cli import main

    monkeypatch.delenv("ULTRAKV_CLUSTER_SECRET_FILE", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no cluster secret" in err and "--cluster-secret-file" in err
    assert "--insecure-no-cluster-secret" in err and "cannot reach etcd" not in err


def test_node_peer_tls_flags_map_to_the_server_section_and_go_together(capsys):
    from ultrakv.client.cli import _node_config, build_parser, main

    args = build_parser().parse_args(["node", "--peer-ca-cert", "ca.pem", "--peer-cert",
                                      "node.pem", "--peer-key", "node-key.pem"])
    server = _node_config(args, "cpu").server
    assert (server.peer_ca_cert, server.tls_cert, server.tls_key) == \
        ("ca.pem", "node.pem", "node-key.pem")
    assert server.peer_tls() is not None  # serves and dials its peers with mutual TLS
    assert main(["node", "--peer-cert", "node.pem", "--insecure-no-cluster-secret"]) == 2
    assert "go together" in capsys.readouterr().err


def test_the_insecure_opt_out_is_explicit_and_loud(caplog):
    require_cluster_secret("/run/secrets/ultrakv", False, "ultrakv node")  # a secret: fine
    with pytest.raises(ValueError, match="ultrakv coordinator: no cluster secret"):
        require_cluster_secret("", False, "ultrakv coordinator")
    with caplog.at_level(logging.WARNING, logger="ultrakv.cluster.peer_auth"):
        require_cluster_secret("", True, "ultrakv node")
    assert "WITHOUT a cluster secret" in caplog.text


def test_kv_from_an_unauthenticated_caller_never_reaches_the_shared_prefix_cache(engine):
    """Finding 3: ImportSession stored caller-supplied KV as shared prefix blocks, changing
    another user's next greedy output for the same tokens."""
    with BackgroundServer(engine) as srv, grpc.insecure_channel(srv.address) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        honest = greedy(stub, VICTIM)
        stub.ClearCache(pb.ClearCacheRequest(), timeout=10)
        layout = engine.session_layout
        poison = torch.randn(*layout.kv_shape(32)) * 50
        chunks = state_to_chunks(SessionState("evil", VICTIM[:32], 1, engine.model_fingerprint,
                                              32, poison), 4096)
        answer = stub.ImportSession(chunks, timeout=30)
        assert answer.kv_tokens == 0  # history only: its KV was not computed here
        again = greedy(stub, VICTIM)
        assert again.usage.cached_tokens == 0 and list(again.token_ids) == list(honest.token_ids)


def test_a_public_bind_without_a_secret_warns_loudly(engine, caplog):
    """Finding 10: a node binding a non-loopback address without auth or TLS says so."""
    settings = ServerSettings(host="0.0.0.0", port=0, grace_period_s=0.5)
    with caplog.at_level(logging.WARNING, logger="ultrakv.node.server"), \
            BackgroundServer(engine, settings):
        pass
    text = caplog.text
    assert "SECURITY" in text and "no cluster secret" in text and "without TLS" in text
    assert exposure_warnings("127.0.0.1", 1, clients_authenticated=False, tls=False) == []
    coordinator = exposure_warnings("0.0.0.0", 1, clients_authenticated=False, tls=True)
    assert len(coordinator) == 1 and "without authentication" in coordinator[0]


# /proc/net/tcp* spellings of 127.0.0.1, ::ffff:127.0.0.1 and ::1.
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp*)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hexport = local.split(":")
                if state == "0A" and int(hexport, 16) == port:  # 0A = LISTEN
                    found.add(address)
    return found


@pytest.mark.cluster
def test_single_process_serve_binds_loopback_and_exposes_no_node_service(tmp_path):
    """Findings 2 and 10: `ultrakv serve` exposed NodeService on the client port and bound
    0.0.0.0 by default."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ultrakv.client.cli", "serve", "--model", "tiny", "--device",
         "cpu", "--port", str(port), "--http-port", "0", "--num-blocks", "64",
         "--data-dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with Client(f"127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 120
            while not client.health()["healthy"]:
                assert proc.poll() is None and time.monotonic() < deadline, "serve did not start"
                time.sleep(0.3)
            assert client.process_request({"text": "hi", "max_length": 2})["success"]
        listening = _listening_addresses(port)
        assert listening and listening <= LOOPBACK, listening  # never 0.0.0.0 / ::
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError) as err:
                node_pb2_grpc.NodeServiceStub(channel).ListSessions(npb.ListSessionsRequest(),
                                                                    timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
            listed = list(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            names = {s.name for s in listed[0].list_services_response.service}
            assert "ultrakv.v1.NodeService" not in names and "ultrakv.v1.UltraKV" in names
    finally:
        proc.terminate()
        proc.wait(timeout=30)



def test_an_idle_stream_is_closed(engine):
    """Finding 15: idle streams were never closed."""
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.5,
                              limits=Limits(stream_idle_timeout_s=1.0))
    release = threading.Event()

    def quiet():  # one request, then an open stream that sends nothing more
        yield pb.GenerateStreamRequest(generate=pb.GenerateRequest(
            request_id="one", text="hi", sampling=pb.SamplingOptions(max_length=2)))
        release.wait(60)

    with BackgroundServer(engine, settings) as srv, grpc.insecure_channel(srv.address) as ch:
        responses = ultrakv_pb2_grpc.UltraKVStub(ch).Generate(quiet(), timeout=60)
        with pytest.raises(grpc.RpcError) as err:
            for message in responses:
                assert message.WhichOneof("event") in ("chunk", "result")
        release.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "idle for 1 s with no request" in err.value.details()


def test_a_client_pinging_too_often_is_sent_away(engine):
    """Finding 15 (keepalive abuse): a client pinging a connection with no call more often
    than every 10 s gets GOAWAY ENHANCE_YOUR_CALM ("too_many_pings") after 2 strikes,
    instead of keeping the server answering pings for ever."""
    with BackgroundServer(engine) as srv:
        answered, goaway = ping_flood(srv.address)
    assert goaway is not None, f"{answered} pings answered and no GOAWAY"
    assert goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert goaway.additional_data == b"too_many_pings"
    assert 1 <= answered <= 4  # the first ping is fine; the strikes are few


def test_streams_beyond_the_per_connection_cap_are_refused_or_queued(engine):
    """Finding 15 (streams per connection): the server advertises its cap
    (SETTINGS_MAX_CONCURRENT_STREAMS) and refuses streams over it (RST_STREAM
    REFUSED_STREAM) from a client that ignores it; a gRPC client queues them instead, so the
    extra call runs once a stream ends, or ends DEADLINE_EXCEEDED."""
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.5,
                              max_streams_per_connection=2)
    with BackgroundServer(engine, settings) as srv:
        with RawHttp2(srv.address) as raw:
            assert raw.server_max_concurrent_streams == 2
            ids = raw.open_streams("/ultrakv.v1.UltraKV/Generate", 4)
            raw.read_until(lambda _: raw.count(StreamReset) >= 2, timeout_s=30)
            refused = {e.stream_id: e.error_code for e in raw.events if isinstance(e, StreamReset)}
            assert refused == {ids[2]: ErrorCodes.REFUSED_STREAM, ids[3]: ErrorCodes.REFUSED_STREAM}
            assert raw.terminated() is None  # the connection and its first two streams live on
        with grpc.insecure_channel(srv.address) as channel:
            stub = ultrakv_pb2_grpc.UltraKVStub(channel)
            release = [threading.Event(), threading.Event()]

            def held(i: int):  # one answered request, then an open stream sending nothing
                yield pb.GenerateStreamRequest(generate=pb.GenerateRequest(
                    request_id=f"held-{i}", token_ids=pb.TokenIds(ids=[1, 2]),
                    sampling=pb.SamplingOptions(max_length=1)))
                release[i].wait(60)

            streams = [stub.Generate(held(i), timeout=120) for i in range(2)]
            for stream in streams:  # both streams are open on the server
                assert next(stream).WhichOneof("event") in ("chunk", "result")
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[3]),
                                         sampling=pb.SamplingOptions(max_length=1))
            with pytest.raises(grpc.RpcError) as err:
                stub.Process(request, timeout=2)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            queued = stub.Process.future(request, timeout=60)
            release[0].set()
            list(streams[0])  # the first stream ends: the queued call takes its place
            assert queued.result().token_ids
            release[1].set()
            list(streams[1])


def test_checkpoint_files_are_private(tmp_path):
    """Finding 16: checkpoints held plaintext histories world-readable (0644)."""
    directory = tmp_path / "checkpoints" / "node-1"
    state = SessionState("s-1", [1, 2, 3] * 6, 1, "fp", 16, torch.zeros(2, 2, 16, 2, 16))
    entry = write_session(directory, state)
    for name in (entry.history_file, entry.kv_file):
        assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


def _openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def cluster_ca(tmp_path_factory):
    """A CA and one member certificate for 127.0.0.1 (EC keys: fast), made with openssl."""
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=ultrakv-test-ca", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("req", *ec, "-keyout", "member.key", "-out", "member.csr", "-subj", "/CN=member",
             cwd=d)
    _openssl("x509", "-req", "-in", "member.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "member.pem", "-days", "1", "-extfile", "san.ext", cwd=d)
    return PeerTLS(str(d / "ca.pem"), str(d / "member.pem"), str(d / "member.key"))


async def test_members_speak_mutual_tls(engine, cluster_ca):
    """Finding 10: coordinator<->node and node<->node channels were plaintext and
    unauthenticated. With certificates, a node requires a client certificate of the cluster
    CA; peers (and the coordinator's health probes) dial with theirs; KV imported over mTLS
    is trusted."""
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.5,
                              tls_cert=cluster_ca.cert, tls_key=cluster_ca.key,
                              peer_ca_cert=cluster_ca.ca_cert)
    with BackgroundServer(engine, settings) as srv:
        peers = PeerChannels(tls=cluster_ca)
        try:
            stub = peers.stub(srv.address)
            assert (await stub.Stats(pb.StatsRequest(), timeout=10)).node_id
            kv = torch.zeros(*engine.session_layout.kv_shape(32))
            answer = await stub.ImportSession(state_to_chunks(SessionState(
                "mtls", VICTIM[:33], 1, engine.model_fingerprint, 32, kv), 4096), timeout=30)
            assert answer.kv_tokens == 32  # an authenticated peer's KV is kept
            checker = HealthChecker(HealthPolicy(interval_s=5, timeout_s=5), tls=cluster_ca)
            assert await checker.probe(srv.address)
            await checker.stop()
        finally:
            await peers.close()
        with open(cluster_ca.ca_cert, "rb") as f:
            ca = f.read()
        strangers = (grpc.insecure_channel(srv.address),  # plaintext
                     grpc.secure_channel(srv.address,  # TLS without a client certificate
                                         grpc.ssl_channel_credentials(root_certificates=ca)))
        for channel in strangers:
            with channel, pytest.raises(grpc.RpcError) as err:
                node_pb2_grpc.NodeServiceStub(channel).ListSessions(npb.ListSessionsRequest(),
                                                                    timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
