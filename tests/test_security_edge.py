"""The client-facing edge over real gRPC on loopback: API keys, tenants, roles, signatures,
IP rules, rate limits and quotas (issue 10, findings 1, 4, 5, 6, 11, 12).

One engine serves every test; each test starts its own server with the security settings it
needs (a server starts in milliseconds, the engine does not)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpcurl import grpcurl
from ultrakv.client import AsyncClient, Client
from ultrakv.client.cli import main as cli_main
from ultrakv.client.client import RequestError, RetryPolicy
from ultrakv.cluster.security import keys as keyfile
from ultrakv.cluster.security.settings import SecuritySettings
from ultrakv.cluster.security.signing import signature_headers
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.server import BackgroundServer, ServerSettings
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2_grpc

# Several full blocks (16 tokens each, byte-level tokenizer), so a prefix hit is visible.
PROMPT = "The quarterly numbers of tenant acme are confidential, do not share them. " * 2
NO_RETRY = RetryPolicy(attempts=1)


@pytest.fixture(scope="module")
def engine():
    e = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=256, max_sessions=6))
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, str]:
    """A keys file with users of two tenants, an admin and a signing key: name -> key."""
    path = tmp_path_factory.mktemp("keys") / "keys.jsonl"
    made = {name: keyfile.create_key(path, tenant, role, signing=(name == "signer"))
            for name, tenant, role in (("acme", "acme", "user"), ("globex", "globex", "user"),
                                       ("acme2", "acme", "user"), ("admin", "ops", "admin"),
                                       ("signer", "initech", "user"))}
    out = {name: key for name, (key, _) in made.items()}
    out["signing_secret"] = made["signer"][1].signing_secret
    out["path"] = str(path)
    return out


def serve(engine, http_port: int = 0, grace_period_s: float = 0.2, **security) -> BackgroundServer:
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=grace_period_s,
                              http_port=http_port, security=SecuritySettings(**security))
    return BackgroundServer(engine, settings)


@pytest.fixture(scope="module")
def server(engine, keys):
    with serve(engine, keys_file=keys["path"]) as srv:
        yield srv


def client(srv, key: str | None, **kw) -> Client:
    return Client(srv.address, api_key=key, retry=NO_RETRY, timeout=30, **kw)


def process(srv, key: str | None, **spec) -> dict:
    with client(srv, key) as c:
        return c.process_request({"max_length": 2, "temperature": 0.0, **spec})


def stub_call(srv, method: str, request, metadata=()):
    """One raw call (a stream's responses as a list)."""
    with grpc.insecure_channel(srv.address) as channel:
        reply = getattr(ultrakv_pb2_grpc.UltraKVStub(channel), method)(
            request, metadata=metadata, timeout=30)
        return list(reply) if method == "Generate" else reply


def rpc_code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


# --- finding 1: authentication ---------------------------------------------------------------


def test_finding_1_a_missing_or_wrong_key_is_refused_and_a_valid_one_accepted(server, keys):
    request = pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(max_length=1))
    before = dict(server.server.security.events.counts)
    assert rpc_code(lambda: stub_call(server, "Process", request)) == grpc.StatusCode.UNAUTHENTICATED
    forged = "ukv_" + keys["acme"][4:16] + "_" + "x" * 43  # a real key id, a wrong secret
    for metadata in ((("x-api-key", "nope"),), (("x-api-key", forged),),
                     (("authorization", "Bearer " + forged),)):
        code = rpc_code(lambda m=metadata: stub_call(server, "Process", request, m))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    # The stream and every other method are guarded too.
    assert rpc_code(lambda: stub_call(server, "Generate", iter([pb.GenerateStreamRequest(
        generate=pb.GenerateRequest(request_id="r", text="hi"))]))) == grpc.StatusCode.UNAUTHENTICATED
    assert rpc_code(lambda: stub_call(server, "Stats", pb.StatsRequest())) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert server.server.security.events.counts["auth_failed"] - before["auth_failed"] == 6
    # Both header forms of a valid key work.
    assert stub_call(server, "Process", request, (("x-api-key", keys["acme"]),)).token_ids
    assert stub_call(server, "Process", request,
                     (("authorization", "Bearer " + keys["acme"]),)).token_ids


def test_the_seed_api_works_with_a_key(server, keys):
    with client(server, keys["acme"]) as c:
        r = c.process_request({"text": "Hello", "max_length": 4, "session_id": "seed-1"})
        assert r["success"] and r["response"]["token_ids"]
        chunks = list(c.stream({"text": " again", "max_length": 3, "session_id": "seed-1"}))
        assert chunks[-1].finished and chunks[-1].result["success"]
        assert c.get_session("seed-1")["turns"] == 2
        assert c.process_batch([{"text": "a", "max_length": 1}, {"text": "b", "max_length": 1}])
        assert c.stats()["nodes"] and c.health()["healthy"]
    with client(server, None) as anonymous:
        refused = anonymous.process_request({"text": "Hello"})
        assert not refused["success"] and refused["error_code"] == "UNAUTHENTICATED"


def test_cli_test_command_with_an_api_key(server, keys, capsys):
    argv = ["test", "--address", server.address, "--text", "Hi", "--max-length", "3",
            "--timeout", "30"]
    assert cli_main([*argv, "--api-key", keys["acme"]]) == 0
    assert "3 tokens" in capsys.readouterr().out
    assert cli_main(argv) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err


# --- finding 5: the tenant comes from the key -------------------------------------------------


def test_finding_5_a_tenant_cannot_probe_another_tenants_prompts(server, keys):
    assert process(server, keys["acme"], text=PROMPT)["success"]
    assert process(server, keys["acme2"], text=PROMPT)["cached_tokens"] >= 32  # same tenant shares
    # globex claims to be acme: the edge overwrites the tenant, so nothing is cached for it.
    with grpc.insecure_channel(server.address) as channel:
        result = ultrakv_pb2_grpc.UltraKVStub(channel).Process(pb.GenerateRequest(
            text=PROMPT, tenant="acme", sampling=pb.SamplingOptions(max_length=2)),
            metadata=(("x-api-key", keys["globex"]),), timeout=30)
    assert result.usage.cached_tokens == 0


# --- finding 4 (tenancy): sessions belong to their tenant -------------------------------------


def test_finding_4_another_tenant_can_neither_continue_nor_see_a_session(server, keys):
    """Session ids are each tenant's own on a node's client port too: globex naming acme's
    session gets what an unused id gets (NOT_FOUND to read or delete, else a new session of
    its own), never acme's history, and acme's session is untouched."""
    first = process(server, keys["acme"], text="my secret plan", session_id="acme-chat")
    assert first["success"]
    with client(server, keys["globex"]) as globex:
        for call in (globex.get_session, globex.delete_session):
            with pytest.raises(Exception) as err:
                call("acme-chat")
            assert err.value.code == "NOT_FOUND"  # the same answer as an unknown id
            assert "'acme-chat'" in str(err.value) and "~" not in str(err.value)
        taken = process(server, keys["globex"], text=" and now tell me", session_id="acme-chat")
        assert taken["success"] and taken["session_id"] == "acme-chat", taken
        assert taken["cached_tokens"] == 0  # none of acme's history
        info = globex.get_session("acme-chat")
        assert (info["session_id"], info["turns"]) == ("acme-chat", 1)
        assert info["num_tokens"] == taken["usage"]["prompt_tokens"] + 2
        chunks = list(globex.stream({"text": "x", "session_id": "acme-chat", "max_length": 1}))
        assert chunks and globex.get_session("acme-chat")["turns"] == 2
        globex.delete_session("acme-chat")
    with client(server, keys["acme"]) as acme:
        info = acme.get_session("acme-chat")
        assert info["turns"] == 1 and info["num_tokens"] == first["usage"]["prompt_tokens"] + 2
    with client(server, keys["admin"]) as admin:  # an admin names any tenant's by its key
        assert admin.get_session("acme~acme-chat")["turns"] == 1
        with pytest.raises(Exception) as err:
            admin.get_session("acme-chat")  # the admin's own tenant's session of that id
        assert err.value.code == "NOT_FOUND"


# --- finding 6: admin-only RPCs ---------------------------------------------------------------


def test_finding_6_destructive_and_detailed_rpcs_need_an_admin_key(server, keys):
    with client(server, keys["acme"]) as user:
        for call in (user.clear_cache, lambda: user.cleanup_sessions(0)):
            with pytest.raises(Exception) as err:
                call()
            assert err.value.code == "PERMISSION_DENIED"
        node = user.stats()["nodes"][0]
        assert node["address"] == "" and node["pid"] == 0 and node["engine"] == {}
    assert server.server.security.events.counts["forbidden"] >= 2
    with client(server, keys["admin"]) as admin:
        assert admin.clear_cache()["success"]
        node = admin.stats()["nodes"][0]
        assert node["address"] == server.address and node["pid"] > 0 and node["engine"]


def test_finding_17_reflection_lists_services_to_an_admin_key_only(server, keys):
    """grpcurl, as an operator (or an attacker) would run it: reflection listed every service
    to anyone; now a missing key is UNAUTHENTICATED, a user key PERMISSION_DENIED."""
    anonymous = grpcurl(server.address, "list")
    assert anonymous.returncode != 0 and "Unauthenticated" in anonymous.stderr, anonymous
    assert "ultrakv.v1.UltraKV" not in anonymous.stdout
    user = grpcurl(server.address, "list", headers={"x-api-key": keys["acme"]})
    assert user.returncode != 0 and "PermissionDenied" in user.stderr, user
    assert "needs an admin key" in user.stderr and "ultrakv.v1.UltraKV" not in user.stdout
    admin = grpcurl(server.address, "list", headers={"authorization": f"Bearer {keys['admin']}"})
    assert admin.returncode == 0, admin.stderr
    assert "ultrakv.v1.UltraKV" in admin.stdout.split()
    described = grpcurl(server.address, "describe", "ultrakv.v1.UltraKV",
                        headers={"x-api-key": keys["admin"]})
    assert described.returncode == 0 and "rpc Process" in described.stdout, described.stderr


# --- findings 11, 12: rate limits and quotas --------------------------------------------------


def test_finding_11_a_flooding_key_is_limited_and_another_tenant_still_served(engine, keys):
    with serve(engine, keys_file=keys["path"], key_requests_per_s=2.0, burst_s=1.0) as srv:
        flood = [process(srv, keys["acme"], text="flood") for _ in range(8)]
        limited = [r for r in flood if not r["success"]]
        assert limited and all(r["error_code"] == "RESOURCE_EXHAUSTED" for r in limited)
        assert all(r["retry_after_s"] > 0 for r in limited)
        # globex has its own bucket: none of its requests is refused while acme is limited.
        assert all(process(srv, keys["globex"], text="fair")["success"] for _ in range(2))
        assert srv.server.security.events.counts["rate_limited"] == len(limited)


def test_address_and_token_rates_and_the_session_token_quota(engine, keys):
    """The other buckets and quota of the security section over gRPC: requests/s per client
    address (no key at all), tokens/s per key (a request's prompt + max_length), and
    history tokens per tenant on a node, each RESOURCE_EXHAUSTED with a retry hint."""
    with serve(engine, ip_requests_per_s=0.1, burst_s=20.0) as srv:  # 2 now, 1 per 10 s
        flood = [process(srv, None, text="x") for _ in range(5)]
    assert [r["success"] for r in flood][:2] == [True, True]
    assert {r["error_code"] for r in flood[2:]} == {"RESOURCE_EXHAUSTED"}
    assert "requests per second of this address" in flood[-1]["error"]
    with serve(engine, keys_file=keys["path"], key_tokens_per_s=1.0, burst_s=20.0) as srv:
        big = process(srv, keys["acme"], text="x" * 40, max_length=8)  # ~19 tokens: fits
        over = process(srv, keys["acme"], text="x" * 40, max_length=8)
        other = process(srv, keys["globex"], text="x" * 40, max_length=8)
    assert big["success"] and other["success"]
    assert over["error_code"] == "RESOURCE_EXHAUSTED" and over["retry_after_s"] > 0
    assert "tokens per second of this key" in over["error"]
    engine.cleanup_sessions(0)
    with serve(engine, keys_file=keys["path"], tenant_max_session_tokens=40) as srv:
        assert process(srv, keys["acme"], text="y" * 50, session_id="acme-long")["success"]
        full = process(srv, keys["acme"], text="more", session_id="acme-long-2")
        assert full["error_code"] == "RESOURCE_EXHAUSTED" and "tenant_max_session_tokens" in full["error"]
        assert process(srv, keys["globex"], text="z" * 30, session_id="globex-short")["success"]
    engine.sessions.quota = type(engine.sessions.quota)()
    engine.cleanup_sessions(0)


def test_unauthenticated_calls_are_refused_before_their_bytes_are_parsed(server, keys):
    """A body that is not a message at all: without a key UNAUTHENTICATED (nothing was
    parsed), with a key the parser's INVALID_ARGUMENT."""
    garbage = b"\xff\xff\xff\xff\x0f not protobuf"
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/ultrakv.v1.UltraKV/Process")
        codes = []
        for metadata in ((), (("x-api-key", keys["acme"]),)):
            with pytest.raises(grpc.RpcError) as err:
                call(garbage, metadata=metadata, timeout=30)
            codes.append(err.value.code())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT]


def test_tenant_running_slots_refuse_a_second_request_without_queue(engine, keys):
    with serve(engine, keys_file=keys["path"], tenant_max_running=1, tenant_max_queued=0) as srv:
        started = threading.Event()
        results: list[dict] = []

        def long_request() -> None:
            with client(srv, keys["acme"]) as c:
                for chunk in c.stream({"text": "long", "max_length": 200, "ignore_eos": True}):
                    started.set()
                    if chunk.finished:
                        results.append(chunk.result)

        worker = threading.Thread(target=long_request)
        worker.start()
        assert started.wait(60)
        second = process(srv, keys["acme2"], text="second")  # same tenant, other key
        other = process(srv, keys["globex"], text="other tenant")
        worker.join(120)
        assert not second["success"] and second["error_code"] == "RESOURCE_EXHAUSTED"
        assert second["retry_after_s"] > 0
        assert other["success"] and results and results[0]["success"]
        assert process(srv, keys["acme"], text="after")["success"]  # the slot came back
        # On one Generate stream the refused request fails alone; the stream carries on.
        stream = [pb.GenerateStreamRequest(generate=pb.GenerateRequest(
            request_id=rid, text="stream", sampling=pb.SamplingOptions(max_length=n, ignore_eos=True)))
            for rid, n in (("first", 100), ("second", 1))]
        replies = stub_call(srv, "Generate", iter(stream), (("x-api-key", keys["acme"]),))
        ends = {m.request_id: m for m in replies if m.WhichOneof("event") in ("result", "error")}
        assert ends["first"].WhichOneof("event") == "result"
        assert ends["second"].error.code == "RESOURCE_EXHAUSTED" and ends["second"].error.retry_after_s > 0
        assert process(srv, keys["acme"], text="after the stream")["success"]


def test_finding_12_a_tenant_flooding_sessions_does_not_evict_another_tenants(engine, keys):
    # The engine holds 6 sessions; acme opens 2, then globex opens 10.
    engine.cleanup_sessions(0)
    with serve(engine, keys_file=keys["path"]) as srv:
        for i in range(2):
            assert process(srv, keys["acme"], text="keep me", session_id=f"acme-keep-{i}")["success"]
        for i in range(10):
            assert process(srv, keys["globex"], text="flood", session_id=f"globex-{i}")["success"]
        with client(srv, keys["acme"]) as acme:
            assert [acme.get_session(f"acme-keep-{i}")["turns"] for i in range(2)] == [1, 1]
    engine.cleanup_sessions(0)
    with serve(engine, keys_file=keys["path"], tenant_max_sessions=2) as srv:
        for i in range(2):
            assert process(srv, keys["globex"], text="q", session_id=f"globex-q-{i}")["success"]
        over = process(srv, keys["globex"], text="q", session_id="globex-q-2")
        assert not over["success"] and over["error_code"] == "RESOURCE_EXHAUSTED"
        assert "tenant_max_sessions" in over["error"] and over["retry_after_s"] > 0
        assert process(srv, keys["acme"], text="q", session_id="acme-q-0")["success"]
    engine.sessions.quota = type(engine.sessions.quota)()
    engine.cleanup_sessions(0)


# --- signatures, IP rules, key reload ---------------------------------------------------------


def test_signed_requests_replayed_or_outside_the_window_are_rejected(server, keys):
    method = "/ultrakv.v1.UltraKV/Process"
    request = pb.GenerateRequest(text="signed", sampling=pb.SamplingOptions(max_length=1))
    body = request.SerializeToString()
    key = (("x-api-key", keys["signer"]),)
    counts = server.server.security.events.counts
    # The client library signs when given the secret; without it the key is refused.
    with client(server, keys["signer"], signing_secret=keys["signing_secret"]) as c:
        assert c.process_request({"text": "signed", "max_length": 1})["success"]
        assert list(c.stream({"text": "signed stream", "max_length": 2}))[-1].finished

    async def signed_async_stream() -> list:
        async with AsyncClient(server.address, api_key=keys["signer"], retry=NO_RETRY,
                               timeout=30, signing_secret=keys["signing_secret"]) as c:
            return [chunk async for chunk in c.stream({"text": "signed", "max_length": 2})]

    # A stream opened as a unary-stream call is signed as the stream it is (an empty body).
    assert asyncio.run(signed_async_stream())[-1].finished
    assert rpc_code(lambda: stub_call(server, "Process", request, key)) == \
        grpc.StatusCode.UNAUTHENTICATED
    headers = tuple(signature_headers(keys["signing_secret"], method, body))
    assert stub_call(server, "Process", request, key + headers).token_ids
    replays = counts["replay_rejected"]
    assert rpc_code(lambda: stub_call(server, "Process", request, key + headers)) == \
        grpc.StatusCode.UNAUTHENTICATED  # the same nonce again
    stale = tuple(signature_headers(keys["signing_secret"], method, body, now=time.time() - 600))
    assert rpc_code(lambda: stub_call(server, "Process", request, key + stale)) == \
        grpc.StatusCode.UNAUTHENTICATED  # signed 10 minutes ago: outside the 5-minute window
    assert counts["replay_rejected"] - replays == 2
    other = pb.GenerateRequest(text="tampered", sampling=pb.SamplingOptions(max_length=1))
    assert rpc_code(lambda: stub_call(server, "Process", other, key + tuple(
        signature_headers(keys["signing_secret"], method, body)))) == grpc.StatusCode.UNAUTHENTICATED


def test_ip_deny_list_refuses_before_authentication(engine, keys):
    with serve(engine, keys_file=keys["path"], ip_deny=["127.0.0.0/8"]) as srv:
        refused = process(srv, keys["acme"], text="x")
        assert refused["error_code"] == "PERMISSION_DENIED"
        assert srv.server.security.events.counts["ip_denied"] == 1
    with serve(engine, ip_allow=["10.0.0.0/8"]) as srv:
        assert process(srv, None, text="x")["error_code"] == "PERMISSION_DENIED"
    with serve(engine, ip_allow=["127.0.0.1/32"], ip_deny=["10.0.0.0/8"]) as srv:
        assert process(srv, None, text="x")["success"]


def test_keys_are_added_and_revoked_without_a_restart(engine, tmp_path):
    path = tmp_path / "keys.jsonl"
    first, _ = keyfile.create_key(path, "acme")
    assert (path.stat().st_mode & 0o777) == 0o600
    assert keyfile.hash_key(first) in path.read_text() and first not in path.read_text()
    with serve(engine, keys_file=str(path)) as srv:
        assert process(srv, first, text="x")["success"]
        second, record = keyfile.create_key(path, "globex")
        deadline = time.monotonic() + 30
        while not process(srv, second, text="x")["success"]:
            assert time.monotonic() < deadline, "new key never accepted"
            time.sleep(0.2)
        keyfile.revoke_key(path, record.key_id)
        srv.server.security.reload_keys()  # what SIGHUP does
        assert process(srv, second, text="x")["error_code"] == "UNAUTHENTICATED"
        assert process(srv, first, text="x")["success"]


def test_keys_cli_creates_lists_and_revokes(tmp_path, capsys):
    path = str(tmp_path / "keys.jsonl")
    assert cli_main(["keys", "create", "--tenant", "acme", "--role", "admin",
                     "--keys-file", path]) == 0
    key = capsys.readouterr().out.strip()
    assert re.fullmatch(r"ukv_[0-9a-f]{12}_\S+", key) and key not in Path(path).read_text()
    key_id = key[4:16]
    assert cli_main(["keys", "list", "--keys-file", path]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and "acme" in listed and "admin" in listed and key not in listed
    assert cli_main(["keys", "revoke", key_id, "--keys-file", path]) == 0
    assert keyfile.read_keys_file(path) == []
    assert cli_main(["keys", "create", "--tenant", "a/b", "--keys-file", path]) == 2
    assert "tenant must be" in capsys.readouterr().err


def test_no_keys_file_leaves_loopback_open(engine):
    with serve(engine) as srv:
        assert process(srv, None, text="open")["success"]
        with client(srv, None) as c:
            assert c.clear_cache()["success"]
        # Every caller is the open edge's admin: reflection answers (grpcurl works as usual).
        assert "ultrakv.v1.UltraKV" in grpcurl(srv.address, "list").stdout.split()


def test_security_section_of_the_config_file(tmp_path):
    from ultrakv.client.config_file import generate_config, load_config

    text = generate_config("development")
    assert "security:" in text and "keys_file" in text
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("keys_file: ''", "keys_file: /etc/ultrakv/keys")
                    .replace("key_requests_per_s: 0.0", "key_requests_per_s: 5.0"))
    security = load_config(path).server.security
    assert security.keys_file == "/etc/ultrakv/keys" and security.key_requests_per_s == 5.0
    path.write_text("security:\n  key_requests_per_s: -1\n")
    with pytest.raises(ValueError, match="key_requests_per_s must be >= 0"):
        load_config(path)


# --- the OpenAI HTTP API passes the same edge -------------------------------------------------


def test_http_api_needs_a_key_and_runs_as_its_tenant(engine, keys):
    import httpx
    from ultrakv.cluster.etcd_server import free_port

    port = free_port()
    with serve(engine, http_port=port, keys_file=keys["path"], key_requests_per_s=1.0,
               burst_s=3.0) as srv:
        url = f"http://127.0.0.1:{port}"
        body = {"prompt": "Over http: " + PROMPT, "max_tokens": 2, "temperature": 0}  # new to globex
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.get("/health").status_code == 200  # probes stay open
            missing = http.post("/v1/completions", json=body)
            assert missing.status_code == 401
            assert missing.json()["error"]["type"] == "authentication_error"
            assert http.get("/v1/models", headers={"x-api-key": "bad"}).status_code == 401
            acme = {"authorization": f"Bearer {keys['acme']}"}
            session = {"x-session-id": "acme-board"}
            assert http.post("/v1/completions", json=body,
                             headers={**acme, **session}).status_code == 200
            # globex names acme's session and claims its prefix: neither is acme's for it (a
            # new session of globex's, not NOT_FOUND: no probe of acme's ids).
            globex = {"x-api-key": keys["globex"], **session}
            other = http.post("/v1/completions", json=body, headers=globex)
            assert other.status_code == 200 and other.json()["usage"].get(
                "prompt_tokens_details", {}).get("cached_tokens", 0) == 0
            # acme's key has 1 request/s with a 3-request burst: the fourth is 429.
            statuses = [http.get("/v1/models", headers=acme).status_code for _ in range(3)]
            assert statuses[-1] == 429
            limited = http.get("/v1/models", headers=acme)
            assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
            assert limited.json()["error"]["type"] == "rate_limit_error"
        counts = srv.server.security.events.counts
        assert counts["auth_failed"] == 2 and counts["rate_limited"] >= 2


def test_single_process_serve_speaks_mutual_tls_with_keys(engine, keys, tmp_path):
    from certs import make_pki  # tests/certs.py

    pki = make_pki(tmp_path)
    with serve(engine, keys_file=keys["path"], tls_cert=pki.server_cert, tls_key=pki.server_key,
               tls_client_ca=pki.ca_cert) as srv:
        with Client(srv.address, api_key=keys["acme"], tls=pki.client_tls(), retry=NO_RETRY) as c:
            assert c.process_request({"text": "over tls", "max_length": 1})["success"]
        for tls in (None, pki.client_tls(with_cert=False)):
            with Client(srv.address, api_key=keys["acme"], tls=tls, timeout=5, retry=NO_RETRY) as c:
                assert c.process_request({"text": "x", "max_length": 1})["error_code"] == "UNAVAILABLE"


async def test_a_multiplexed_stream_runs_each_request_as_its_tenant_and_gives_slots_back(engine, keys):
    """AsyncClient's requests share one GenerateMany stream: each still takes and gives back
    its tenant's running slot (one here, no queue: a slot kept would refuse the next), runs
    as the key's tenant, and keeps its session from another tenant's of the same id."""
    with serve(engine, keys_file=keys["path"], tenant_max_running=1, tenant_max_queued=0) as srv:
        async with AsyncClient(srv.address, api_key=keys["acme"], retry=NO_RETRY, timeout=30) as c:
            for turn in range(3):
                chunks = [ch async for ch in c.stream({"text": f"turn {turn}", "max_length": 2,
                                                       "session_id": "mux-shared"})]
                assert chunks[-1].finished and chunks[-1].result["success"], chunks[-1].result
            assert (await c.get_session("mux-shared"))["turns"] == 3
        async with AsyncClient(srv.address, api_key=keys["globex"], retry=NO_RETRY, timeout=30) as g:
            with pytest.raises(RequestError) as err:
                await g.get_session("mux-shared")
            assert err.value.code == "NOT_FOUND"
            chunks = [ch async for ch in g.stream({"text": "turn 0", "max_length": 2,
                                                   "session_id": "mux-shared"})]
            assert chunks[-1].result["success"] and chunks[-1].result["cache_hit"] is False
            assert (await g.get_session("mux-shared"))["turns"] == 1


async def test_a_cancel_on_a_multiplexed_stream_passes_a_request_queued_for_a_slot(engine, keys):
    """One running slot, room to queue: A runs, B waits for the slot on the same stream. The
    reader leaving A sends a cancel, which reaches the server at once and frees the slot for
    B (before: the edge took B's slot inline, so the cancel waited behind B until A had
    generated all its tokens)."""
    with serve(engine, keys_file=keys["path"], tenant_max_running=1, tenant_max_queued=4) as srv:
        async with AsyncClient(srv.address, api_key=keys["acme"], retry=NO_RETRY, timeout=120) as c:
            generated = engine.stats()["tokens"]["generated"]
            a = c.stream({"token_ids": [5, 6, 7], "max_length": 3000, "ignore_eos": True})
            await anext(a)
            b = asyncio.create_task(anext(c.stream({"text": "queued", "max_length": 2})))
            await _queued_for_a_slot(srv, "acme")  # B is on the stream, waiting for A's slot
            await a.aclose()  # A's cancel goes out
            first_of_b = await asyncio.wait_for(b, timeout=120)
            assert first_of_b.text or first_of_b.token_ids
            a_and_b = engine.stats()["tokens"]["generated"] - generated
    assert a_and_b < 1500, a_and_b  # A was cancelled, not run to its 3000 tokens


async def test_a_stop_still_runs_a_generate_call_request_queued_for_a_slot(engine, keys):
    """A request on a Generate call of its own, read but waiting for its tenant's slot when
    the server begins to stop, still runs within the grace period (the early end of idle
    streams at a stop is for GenerateMany streams, whose callers send again)."""
    srv = serve(engine, grace_period_s=30.0, keys_file=keys["path"], tenant_max_running=1,
                tenant_max_queued=4).start()
    stopping = None
    try:
        async with AsyncClient(srv.address, api_key=keys["acme"], retry=NO_RETRY, timeout=120,
                               multiplex=False) as c:
            a = c.stream({"token_ids": [5, 6, 7], "max_length": 200, "ignore_eos": True})
            await anext(a)
            b = asyncio.create_task(_collect_stream(c, {"text": "queued", "max_length": 2}))
            await _queued_for_a_slot(srv, "acme")  # B's call is open, its request waiting
            stopping = asyncio.create_task(asyncio.to_thread(srv.stop))
            rest = [chunk async for chunk in a]
            chunks = await asyncio.wait_for(b, timeout=120)
    finally:
        if stopping is None:
            srv.stop()
        else:
            await stopping
    assert rest[-1].finished and chunks[-1].finished and chunks[-1].result["success"]


async def _collect_stream(c, spec: dict) -> list:
    return [chunk async for chunk in c.stream(spec)]


async def _queued_for_a_slot(srv, tenant: str) -> None:
    """Until a request of ``tenant`` waits in the edge's queue for a running slot."""
    slots = srv.server.security.slots
    for _ in range(6000):
        if slots._queued.get(tenant, 0) >= 1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no request of {tenant} queued for a slot within 60 s")
