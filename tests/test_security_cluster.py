"""The edge in front of a cluster: a real coordinator (in-process, on loopback gRPC, over a
real etcd) routing to two real node servers. The coordinator takes the tenant from the key;
session ids are each tenant's own whatever node the ring routes them to (issue 10, findings
1, 4, 5, 6 through the coordinator); request ids are each tenant's own (one node behind a
coordinator, so both tenants' requests meet on it)."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import uuid

import grpc
import pytest
from grpcurl import grpcurl
from h2.errors import ErrorCodes
from http2_client import RawHttp2, ping_flood
from ultrakv.client import Client
from ultrakv.client.client import RequestError, RetryPolicy
from ultrakv.cluster.membership import NODES_PREFIX, NodeRecord, NodeState
from ultrakv.cluster.security.keys import create_key
from ultrakv.cluster.security.settings import SecuritySettings
from ultrakv.cluster.store import EtcdStore
from ultrakv.coordinator.server import (
    CLIENT_STREAMS_PER_CONNECTION,
    CoordinatorServer,
    CoordinatorSettings,
)
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.server import BackgroundServer
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2_grpc

PROMPT = "Tenant acme's board minutes, not for anyone else's eyes, block after block. " * 2


class BackgroundCoordinator:
    """A CoordinatorServer on its own event-loop thread."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self.server = CoordinatorServer(settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> BackgroundCoordinator:
        self.thread.start()
        self.run(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def register(etcd_endpoint: str, prefix: str, nodes: dict[str, str]) -> None:
    async with EtcdStore(etcd_endpoint, prefix=prefix) as store:
        for node_id, address in nodes.items():
            record = NodeRecord(id=node_id, address=address, pid=1, state=NodeState.SERVING)
            await store.put(NODES_PREFIX + node_id, record.to_json())


@pytest.fixture(scope="module")
def cluster(etcd, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("keys") / "keys.jsonl"
    keys = {name: create_key(keys_file, tenant, role)[0]
            for name, tenant, role in (("acme", "acme", "user"), ("globex", "globex", "user"),
                                       ("admin", "ops", "admin"))}
    engines = [Engine(EngineConfig(model="tiny", device="cpu", num_blocks=128)) for _ in range(2)]
    nodes = [BackgroundServer(e).start() for e in engines]
    prefix = f"/sec-{uuid.uuid4().hex[:8]}/"
    asyncio.run(register(etcd.endpoint, prefix, {f"n{i}": n.address for i, n in enumerate(nodes)}))
    settings = CoordinatorSettings(etcd=etcd.endpoint, prefix=prefix, host="127.0.0.1", port=0,
                                   grace_period_s=0.2,
                                   security=SecuritySettings(keys_file=str(keys_file)))
    try:
        with BackgroundCoordinator(settings) as coordinator:
            address = coordinator.server.address
            deadline = time.monotonic() + 60
            while len(coordinator.server.backend.ring.nodes) < 2:
                assert time.monotonic() < deadline, "the coordinator never routed to both nodes"
                time.sleep(0.1)
            yield address, keys
    finally:
        for n in nodes:
            n.stop()
        for e in engines:
            e.shutdown()


def client(cluster, key):
    address, _ = cluster
    return Client(address, api_key=key, timeout=60, retry=RetryPolicy(attempts=1))


def test_coordinator_refuses_calls_without_a_key(cluster):
    _, keys = cluster
    with client(cluster, None) as anonymous:
        assert anonymous.process_request({"text": "hi"})["error_code"] == "UNAUTHENTICATED"
        assert anonymous.health()["healthy"]  # probes stay open
    with client(cluster, keys["acme"]) as acme:
        with pytest.raises(RequestError) as err:
            acme.clear_cache()
        assert err.value.code == "PERMISSION_DENIED"
        assert acme.stats()["nodes"][0]["address"] == ""  # no detail for a user
    with client(cluster, keys["admin"]) as admin:
        assert len(admin.stats()["nodes"]) == 2 and admin.clear_cache()["success"]


def test_coordinator_reflection_is_admin_only(cluster):
    """Finding 17 on the coordinator: grpcurl lists its services for an admin key only."""
    address, keys = cluster
    anonymous = grpcurl(address, "list")
    assert anonymous.returncode != 0 and "Unauthenticated" in anonymous.stderr, anonymous
    user = grpcurl(address, "list", headers={"x-api-key": keys["globex"]})
    assert user.returncode != 0 and "PermissionDenied" in user.stderr, user
    assert "ultrakv.v1.UltraKV" not in anonymous.stdout + user.stdout
    admin = grpcurl(address, "list", headers={"x-api-key": keys["admin"]})
    assert admin.returncode == 0, admin.stderr
    assert {"ultrakv.v1.UltraKV", "grpc.health.v1.Health"} <= set(admin.stdout.split())


def test_coordinator_caps_streams_and_sends_ping_floods_away(cluster):
    """Finding 15 on the client port: the stream cap is advertised to every connection, and
    a connection pinging without calls is closed with GOAWAY ENHANCE_YOUR_CALM."""
    address, _ = cluster
    with RawHttp2(address) as raw:
        assert raw.server_max_concurrent_streams == CLIENT_STREAMS_PER_CONNECTION
    _, goaway = ping_flood(address)
    assert goaway is not None and goaway.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_sessions_and_cache_stay_with_their_tenant_through_the_coordinator(cluster):
    """Session ids are each tenant's own: globex naming acme's sessions gets exactly what an
    unused id gets (NOT_FOUND to read or delete, a new session of its own to run a turn in),
    never a sign of acme's; acme's sessions go on as if globex had never named them."""
    address, keys = cluster
    sessions = [f"acme-room-{i}" for i in range(4)]  # spread over both nodes by the ring
    turn = {"max_length": 4, "temperature": 0, "ignore_eos": True}
    with client(cluster, keys["acme"]) as acme:
        for sid in sessions:
            assert acme.process_request({"text": PROMPT, "session_id": sid, **turn})["success"]
        # The reference acme's second turns are held to: a session globex never named.
        acme.process_request({"text": PROMPT, "session_id": "acme-reference", **turn})
        reference = acme.process_request({"text": " go on", "session_id": "acme-reference", **turn})
    with client(cluster, keys["globex"]) as globex:
        unused = globex.process_request({"text": " go on", "session_id": "globex-unused", **turn})
        assert unused["success"], unused
        for sid in sessions:
            for call in (globex.get_session, globex.delete_session):
                with pytest.raises(RequestError) as err:
                    call(sid)
                assert err.value.code == "NOT_FOUND"  # as for any id globex never used
                assert repr(sid) in str(err.value) and "~" not in str(err.value)
            taken = globex.process_request({"text": " go on", "session_id": sid, **turn})
            assert taken["success"], taken  # globex's own new session: no probe, no block
            assert taken["session_id"] == sid
            assert taken["cached_tokens"] == 0  # none of acme's history
            assert taken["response"]["token_ids"] == unused["response"]["token_ids"]
            info = globex.get_session(sid)
            assert (info["session_id"], info["turns"]) == (sid, 1)
        with pytest.raises(RequestError) as err:
            list(globex.export_sessions())  # nor can a backup show another tenant's
        assert err.value.code == "PERMISSION_DENIED"
    # globex claims acme's tenant on the wire: the coordinator overwrites it.
    with grpc.insecure_channel(address) as channel:
        result = ultrakv_pb2_grpc.UltraKVStub(channel).Process(pb.GenerateRequest(
            text=PROMPT, tenant="acme", sampling=pb.SamplingOptions(max_length=2)),
            metadata=(("x-api-key", keys["globex"]),), timeout=60)
    assert result.usage.cached_tokens == 0
    with client(cluster, keys["acme"]) as acme:
        assert [acme.get_session(sid)["turns"] for sid in sessions] == [1, 1, 1, 1]
        for sid in sessions:  # acme's next turn continues acme's history
            again = acme.process_request({"text": " go on", "session_id": sid, **turn})
            assert again["cached_tokens"] >= 32, again
            assert again["response"]["token_ids"] == reference["response"]["token_ids"]
            assert acme.get_session(sid)["turns"] == 2
        shared = acme.process_request({"text": PROMPT, "max_length": 2, "temperature": 0})
        assert shared["cached_tokens"] >= 32  # acme's own prefix is still shared with acme
    with client(cluster, keys["globex"]) as globex:
        for sid in sessions:  # globex deletes its own session of that id, not acme's
            globex.delete_session(sid)
            with pytest.raises(RequestError) as err:
                globex.get_session(sid)
            assert err.value.code == "NOT_FOUND"
    with client(cluster, keys["admin"]) as admin:  # the sessions live on both nodes
        infos = [admin.get_session(f"acme~{sid}") for sid in sessions]  # any tenant's, by key
        assert [i["turns"] for i in infos] == [2, 2, 2, 2]
        assert len({i["node_id"] for i in infos}) == 2


def test_coordinator_client_port_speaks_mutual_tls(etcd, tmp_path):
    from certs import make_pki  # tests/certs.py

    pki = make_pki(tmp_path)
    settings = CoordinatorSettings(
        etcd=etcd.endpoint, host="127.0.0.1", port=0, grace_period_s=0.2,
        prefix=f"/tls-{uuid.uuid4().hex[:8]}/",
        security=SecuritySettings(tls_cert=pki.server_cert, tls_key=pki.server_key,
                                  tls_client_ca=pki.ca_cert))
    with BackgroundCoordinator(settings) as coordinator:
        tls_address = coordinator.server.address
        with Client(tls_address, tls=pki.client_tls(), retry=RetryPolicy(attempts=1)) as c:
            assert c.health()["healthy"]
        for tls in (None, pki.client_tls(with_cert=False)):  # plaintext; TLS without a cert
            with Client(tls_address, tls=tls, timeout=5, retry=RetryPolicy(attempts=1)) as c:
                assert not c.health()["healthy"]


def test_a_coordinators_stream_budget_sets_its_messages_per_token(etcd):
    """A coordinator configured for 1 message/s with a 1 s cap: after a stream's first chunk
    its tokens wait up to a second for company, so a request relayed through it gets at most
    one chunk message per second it ran plus its first and last."""
    from ultrakv.cluster.service import StreamPacing

    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=128))
    node = BackgroundServer(engine).start()
    prefix = f"/pace-{uuid.uuid4().hex[:8]}/"
    try:
        asyncio.run(register(etcd.endpoint, prefix, {"n0": node.address}))
        settings = CoordinatorSettings(etcd=etcd.endpoint, prefix=prefix, host="127.0.0.1", port=0,
                                       grace_period_s=0.2,
                                       stream_pacing=StreamPacing(messages_per_s=1, max_wait_ms=1000))
        with BackgroundCoordinator(settings) as coordinator:
            deadline = time.monotonic() + 60
            while not coordinator.server.backend.ring.nodes:
                assert time.monotonic() < deadline, "the coordinator never routed to the node"
                time.sleep(0.1)
            n = 48
            request = pb.GenerateStreamRequest(generate=pb.GenerateRequest(
                request_id="paced", text=PROMPT,
                sampling=pb.SamplingOptions(max_length=n, temperature=0.0, ignore_eos=True)))
            with grpc.insecure_channel(coordinator.server.address) as channel:
                started = time.monotonic()
                messages = list(ultrakv_pb2_grpc.UltraKVStub(channel).Generate(iter([request]), timeout=120))
                took_s = time.monotonic() - started
        chunks = [m.chunk for m in messages if m.WhichOneof("event") == "chunk"]
        assert [t for c in chunks for t in c.token_ids] == list(messages[-1].result.token_ids)
        assert len(messages[-1].result.token_ids) == n
        assert len(chunks) <= 2 + took_s, (len(chunks), took_s)
    finally:
        node.stop()
        engine.shutdown()


@pytest.fixture(scope="module")
def one_node(etcd, tmp_path_factory):
    """A coordinator with acme's and globex's keys in front of one node: every request of
    both tenants runs on the same engine."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.jsonl"
    keys = {tenant: create_key(keys_file, tenant, "user")[0] for tenant in ("acme", "globex")}
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=256))
    node = BackgroundServer(engine).start()
    prefix = f"/ids-{uuid.uuid4().hex[:8]}/"
    try:
        asyncio.run(register(etcd.endpoint, prefix, {"n0": node.address}))
        settings = CoordinatorSettings(etcd=etcd.endpoint, prefix=prefix, host="127.0.0.1",
                                       port=0, grace_period_s=0.2,
                                       security=SecuritySettings(keys_file=str(keys_file)))
        with BackgroundCoordinator(settings) as coordinator:
            deadline = time.monotonic() + 60
            while not coordinator.server.backend.ring.nodes:
                assert time.monotonic() < deadline, "the coordinator never routed to the node"
                time.sleep(0.1)
            yield coordinator.server.address, keys
    finally:
        node.stop()
        engine.shutdown()


class GenerateStream:
    """One client's Generate stream: requests and cancels sent as they come, events read on a
    thread of their own, each with the moment it arrived."""

    def __init__(self, channel: grpc.Channel, key: str) -> None:
        self._out: queue.Queue = queue.Queue()
        self._events: queue.Queue = queue.Queue()
        self._call = ultrakv_pb2_grpc.UltraKVStub(channel).Generate(
            iter(self._out.get, None), metadata=(("x-api-key", key),), timeout=120)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for message in self._call:
                self._events.put((time.monotonic(), message))

    def send(self, **action) -> None:
        self._out.put(pb.GenerateStreamRequest(**action))

    def next(self) -> tuple[float, pb.GenerateStreamResponse]:
        return self._events.get(timeout=60)

    def finish(self) -> tuple[float, list[int], pb.GenerateStreamResponse]:
        """Read to the request's last event: when it came, the tokens streamed, the event."""
        streamed: list[int] = []
        while True:
            at, message = self.next()
            if message.WhichOneof("event") != "chunk":
                return at, streamed, message
            streamed.extend(message.chunk.token_ids)

    def close(self) -> None:
        self._out.put(None)


def test_another_tenant_runs_cancels_and_retries_a_running_request_id_apart(one_node):
    """Request ids are each tenant's own, through the coordinator to one node: globex starts
    a request under the id of acme's running session turn and it runs (no "already
    running": neither a probe nor a block), cancels its own without touching acme's, which
    streams exactly the tokens it has alone; acme's retry of its finished turn is answered
    from the turn ledger, globex's use of that id and session is not."""
    address, keys = one_node
    acme_text = "acme's quarterly plan, token by token, for acme alone. " * 2
    sampling = pb.SamplingOptions(max_length=400, temperature=0, ignore_eos=True)
    turn = pb.GenerateRequest(request_id="turn-1", session_id="acme-desk", text=acme_text,
                              sampling=sampling)
    with grpc.insecure_channel(address) as channel:
        stub = ultrakv_pb2_grpc.UltraKVStub(channel)
        alone = stub.Process(pb.GenerateRequest(request_id="alone", text=acme_text, sampling=sampling),
                             metadata=(("x-api-key", keys["acme"]),), timeout=60)
        acme, globex = GenerateStream(channel, keys["acme"]), GenerateStream(channel, keys["globex"])
        try:
            acme.send(generate=turn)
            assert acme.next()[1].WhichOneof("event") == "chunk"  # acme's turn runs now
            globex.send(generate=pb.GenerateRequest(
                request_id="turn-1", session_id="globex-desk", text="globex's own words",
                sampling=sampling))
            first = globex.next()[1]
            assert first.WhichOneof("event") == "chunk", first  # not refused "already running"
            globex.send(cancel=pb.CancelRequest(request_id="turn-1"))
            cancelled_at, _, cancelled = globex.finish()
            assert cancelled.result.finish_reason == pb.FINISH_REASON_ABORT, cancelled
            acme_at, _, acme_end = acme.finish()
        finally:
            acme.close()
            globex.close()
    assert acme_at > cancelled_at  # acme's turn ran all along globex's request
    assert acme_end.result.finish_reason == pb.FINISH_REASON_LENGTH, acme_end
    assert list(acme_end.result.token_ids) == list(alone.token_ids)
    with client(one_node, keys["acme"]) as acme_client:
        retried = acme_client.process_request(
            {"request_id": "turn-1", "session_id": "acme-desk", "text": acme_text,
             "max_length": 400, "temperature": 0, "ignore_eos": True})
        assert retried["success"] and retried["response"]["token_ids"] == list(alone.token_ids)
        assert acme_client.get_session("acme-desk")["turns"] == 1  # answered, not taken again
    with client(one_node, keys["globex"]) as globex_client:
        replay = {"request_id": "turn-1", "text": acme_text, "max_length": 400,
                  "temperature": 0, "ignore_eos": True}
        taken = globex_client.process_request({**replay, "session_id": "acme-desk"})
        assert taken["success"], taken  # a new session of globex's: never acme's recorded answer
        assert globex_client.get_session("acme-desk")["turns"] == 1
        own = globex_client.process_request({**replay, "session_id": "globex-desk"})
        assert own["success"], own
        assert globex_client.get_session("globex-desk")["turns"] == 1  # taken, not replayed
