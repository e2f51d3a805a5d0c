"""The client-facing service over a real loopback server and the real tiny engine."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from ultrakv.client import AsyncClient, Client, RequestError
from ultrakv.cluster.validation import Limits, validate_generate
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.server import BackgroundServer, ServerSettings
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2_grpc

MAX_PROMPT_BYTES = 4096
FLUSH_INTERVAL_S = 0.02
LONG = 3000  # tokens: still running when a cancel arrives, even on a loaded machine


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=256, max_num_seqs=16))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.5,
                              limits=Limits(max_prompt_bytes=MAX_PROMPT_BYTES),
                              stream_flush_interval_s=FLUSH_INTERVAL_S)
    with BackgroundServer(engine, settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.address)
    yield ultrakv_pb2_grpc.UltraKVStub(channel)
    channel.close()


def blocks_used(client: Client) -> int:
    return client.stats()["nodes"][0]["cache"]["blocks_used"]


def wait_blocks_free(client: Client, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    used = blocks_used(client)
    while used and time.monotonic() < deadline:
        time.sleep(0.02)
        used = blocks_used(client)
    return used


def greedy(text: str, n: int = 12, **extra) -> dict:
    return {"text": text, "max_length": n, "temperature": 0.0, **extra}


def long_request(rid: str) -> pb.GenerateStreamRequest:
    return pb.GenerateStreamRequest(generate=pb.GenerateRequest(
        request_id=rid, text="count to a thousand",
        sampling=pb.SamplingOptions(max_length=LONG, temperature=0.0, ignore_eos=True)))


# --- happy paths -----------------------------------------------------------------------------


def test_stream_and_unary_give_the_same_greedy_text(client):
    unary = client.process_request(greedy("The quick brown fox"))
    chunks = list(client.stream(greedy("The quick brown fox")))
    assert unary["success"], unary
    assert chunks[-1].finished and chunks[-1].result["success"]
    streamed_ids = [t for c in chunks for t in c.token_ids]
    assert streamed_ids == unary["response"]["token_ids"]
    assert "".join(c.text for c in chunks) == unary["response"]["text"]
    assert chunks[-1].result["response"]["token_ids"] == unary["response"]["token_ids"]
    assert unary["usage"]["completion_tokens"] == len(unary["response"]["token_ids"]) > 0


def test_process_request_dict_shape_and_session_cache_hit(client):
    first = client.process_request(greedy("A long opening turn of a conversation. " * 2,
                                          session_id="user_123"))
    second = client.process_request(greedy(" And a follow-up.", session_id="user_123"))
    for key in ("success", "response", "cache_hit", "cached_tokens", "usage", "latency", "ttft",
                "session_id", "node", "error"):
        assert key in second
    assert first["success"] and second["success"]
    assert first["session_id"] == second["session_id"] == "user_123"
    assert second["cache_hit"] and second["cached_tokens"] >= 16
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]
    assert second["node"] and second["error"] is None
    assert second["latency"] >= second["ttft"] > 0
    info = client.get_session("user_123")
    assert info["turns"] == 2 and info["num_tokens"] > first["usage"]["prompt_tokens"]


def test_batch_of_forty(client):
    specs = [greedy(f"request number {i}", 6) for i in range(40)]
    results = client.process_batch(specs, concurrency=8)
    assert len(results) == 40
    assert all(r["success"] for r in results), [r["error"] for r in results if not r["success"]]
    assert all(r["usage"]["completion_tokens"] == 6 for r in results)
    solo = client.process_request(specs[7])
    assert results[7]["response"]["token_ids"] == solo["response"]["token_ids"]


def test_bad_item_fails_alone_in_a_batch(client):
    specs = [greedy("fine"), greedy("bad", max_length=0), greedy("also fine", session_id="a/b")]
    results = client.process_batch(specs)
    assert [r["success"] for r in results] == [True, False, False]
    assert results[1]["error_code"] == "INVALID_ARGUMENT"
    assert results[1]["error_field"] == "sampling.max_length"
    assert results[2]["error_field"] == "session_id"


@pytest.mark.parametrize(("spec", "field", "fragment"), [
    ({"stop": 5}, "stop", "stop must be a string or a list of strings"),  # was a TypeError raised
    ({"temperature": "hot"}, "temperature", "temperature must be a number"),  # named no field
    ({"max_length": 4.7}, "max_length", "max_length must be an integer"),  # was rounded down
    ({"max_length": "4"}, "max_length", "max_length must be an integer"),
    ({"max_length": True}, "max_length", "max_length must be an integer"),
    ({"session_id": 5}, "session_id", "session_id must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages", "give one prompt"),  # with text
    ({"text": None, "messages": [{"role": "user"}]}, "messages[0].content", "must be a string"),
    ({"text": None, "messages": [{"role": "user", "content": None}]}, "messages[0].content", "must be a string"),
    ({"ignore_eos": "yes"}, "ignore_eos", "ignore_eos must be true or false"),
])
def test_the_dict_api_refuses_what_the_wire_cannot_carry_naming_the_key(client, spec, field, fragment):
    result = client.process_request({"text": "hello", **spec})
    assert not result["success"] and result["error_code"] == "INVALID_ARGUMENT"
    assert result["error_field"] == field and fragment in result["error"]
    assert client.process_batch([greedy("fine"), {"text": "hello", **spec}])[1]["error_field"] == field


def test_the_dict_api_takes_numpy_numbers_and_arrays(client):
    import numpy as np

    result = client.process_request({"token_ids": np.array([5, 6, 7]), "max_length": np.int64(2),
                                     "temperature": np.float32(0.0), "stop_token_ids": [np.int32(1)]})
    assert result["success"], result["error"]
    assert result["usage"]["prompt_tokens"] == 3


async def test_async_client_backs_up_and_restores_sessions(server):
    # The README says AsyncClient has Client's methods as coroutines; it lacked these two.
    async with AsyncClient(server.address, timeout=30) as c:
        first = await c.process_request({**greedy("remember me"), "session_id": "async-backup"})
        assert first["success"]
        parts = [p async for p in c.export_sessions()]
        assert parts[0].HasField("header") and parts[0].header.num_sessions >= 1
        await c.delete_session("async-backup")
        chunks = [p.session for p in parts if p.HasField("session")]
        done = await c.import_sessions(chunks)
        assert done.sessions == parts[0].header.num_sessions
        assert (await c.get_session("async-backup"))["turns"] == 1


async def test_async_client(server):
    async with AsyncClient(server.address, timeout=30) as c:
        r = await c.process_request(greedy("async hello"))
        chunks = [chunk async for chunk in c.stream(greedy("async hello"))]
        batch = await c.process_batch([greedy("x"), greedy("y", top_p=0.0)])
        health = await c.health()
    assert r["success"]
    assert [t for ch in chunks for t in ch.token_ids] == r["response"]["token_ids"]
    assert batch[0]["success"] and batch[1]["error_field"] == "sampling.top_p"
    assert health["status"] == "SERVING"


def test_stats_lists_the_node(client, server):
    stats = client.stats()
    node = stats["nodes"][0]
    assert node["address"] == server.address and int(node["pid"]) > 0
    assert node["node_id"].startswith("node-")
    assert int(node["cache"]["blocks_total"]) == 256
    assert int(node["completion_tokens"]) > 0
    assert stats["totals"]["requests_total"] >= 1


def test_cleanup_sessions_and_clear_cache(client):
    client.process_request(greedy("to be cleaned up " * 3, session_id="old-session"))
    assert client.cleanup_sessions(3600)["removed"] == 0
    time.sleep(0.05)
    assert client.cleanup_sessions(0.01)["removed"] >= 1
    with pytest.raises(RequestError) as err:
        client.get_session("old-session")
    assert err.value.code == "NOT_FOUND"
    assert client.clear_cache()["success"]
    assert client.stats()["nodes"][0]["cache"]["blocks_used"] == 0


def test_health_and_reflection(server, client):
    assert client.health() == {"status": "SERVING", "healthy": True, "address": server.address}
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "ultrakv.v1.UltraKV", "ultrakv.v1.NodeService"):
        resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=5))
    names = {s.name for s in answer.list_services_response.service}
    assert {"ultrakv.v1.UltraKV", "ultrakv.v1.NodeService", "grpc.health.v1.Health"} <= names
    channel.close()


# --- streams: multiplexing, cancel, disconnect, deadlines -------------------------------------


def test_one_stream_carries_several_requests(stub, client):
    expected = {p: client.process_request(greedy(p, 8))["response"]["token_ids"]
                for p in ("alpha", "beta", "gamma")}
    messages = [pb.GenerateStreamRequest(generate=pb.GenerateRequest(
        request_id=p, text=p, sampling=pb.SamplingOptions(max_length=8, temperature=0.0)))
        for p in expected]
    got: dict[str, list[int]] = {p: [] for p in expected}
    results = {}
    for m in stub.Generate(iter(messages), timeout=30):
        if m.WhichOneof("event") == "chunk":
            got[m.request_id].extend(m.chunk.token_ids)
        else:
            results[m.request_id] = m.result
    assert got == expected
    assert {r: list(v.token_ids) for r, v in results.items()} == expected


def test_cancel_frees_blocks(stub, client):
    requests: list[pb.GenerateStreamRequest] = [long_request("long")]
    cancel_sent = threading.Event()

    def outgoing():
        yield requests[0]
        cancel_sent.wait(30)
        yield pb.GenerateStreamRequest(cancel=pb.CancelRequest(request_id="long"))

    final = None
    chunks = 0
    for m in stub.Generate(outgoing(), timeout=30):
        if m.WhichOneof("event") == "chunk":
            chunks += 1
            if not cancel_sent.is_set():
                assert blocks_used(client) > 0  # the running sequence holds blocks
                cancel_sent.set()
        else:
            final = m
    assert final is not None and final.WhichOneof("event") == "result"
    assert final.result.finish_reason == pb.FINISH_REASON_ABORT
    assert 0 < len(final.result.token_ids) < LONG
    assert wait_blocks_free(client) == 0


def test_client_disconnect_frees_blocks(client):
    for chunk in client.stream({"text": "go on forever", "max_length": LONG,
                                "temperature": 0.0, "ignore_eos": True}):
        assert not chunk.finished
        break  # leaving the loop cancels the call
    assert wait_blocks_free(client) == 0


def test_request_deadline_is_honoured(client, stub):
    r = client.process_request({"text": "slow", "max_length": 4000, "temperature": 0.0,
                                "ignore_eos": True, "timeout": 0.2})
    assert r["finish_reason"] == "abort" and r["usage"]["completion_tokens"] < 4000
    # The RPC deadline reaches the engine too: the server stops at it, whichever of the
    # abort result and DEADLINE_EXCEEDED reaches the client first.
    try:
        result = stub.Process(pb.GenerateRequest(text="slow", sampling=pb.SamplingOptions(
            max_length=4000, temperature=0.0, ignore_eos=True)), timeout=0.2)
        assert result.finish_reason == pb.FINISH_REASON_ABORT
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_blocks_free(client) == 0


def test_fast_tokens_are_coalesced_into_fewer_chunks(stub):
    n = 200
    request = pb.GenerateStreamRequest(generate=pb.GenerateRequest(
        request_id="coalesce", text="coalesce",
        sampling=pb.SamplingOptions(max_length=n, temperature=0.0, ignore_eos=True)))
    messages = list(stub.Generate(iter([request]), timeout=30))
    chunks = [m.chunk for m in messages if m.WhichOneof("event") == "chunk"]
    assert [t for c in chunks for t in c.token_ids] == list(messages[-1].result.token_ids)
    assert len(messages[-1].result.token_ids) == n
    assert len(chunks) < 0.8 * n  # several tokens per message, not one message per token


def test_a_servers_stream_budget_sets_its_messages_per_token(engine):
    """A node configured for 1 message/s with a 1 s cap: after a stream's first chunk its
    tokens wait up to a second for company, on the client-facing service and on the
    NodeService a coordinator reads, so a request gets at most one chunk message per second
    it ran plus its first and last (the defaults give about one per engine step here)."""
    from ultrakv.v1 import node_pb2_grpc

    n = 48
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.5,
                              stream_messages_per_s=1, stream_max_wait_ms=1000)
    with BackgroundServer(engine, settings) as srv, grpc.insecure_channel(srv.address) as channel:
        for stub in (ultrakv_pb2_grpc.UltraKVStub(channel), node_pb2_grpc.NodeServiceStub(channel)):
            request = pb.GenerateStreamRequest(generate=pb.GenerateRequest(
                request_id="paced", text="paced",
                sampling=pb.SamplingOptions(max_length=n, temperature=0.0, ignore_eos=True)))
            started = time.monotonic()
            messages = list(stub.Generate(iter([request]), timeout=120))
            took_s = time.monotonic() - started
            chunks = [m.chunk for m in messages if m.WhichOneof("event") == "chunk"]
            assert [t for c in chunks for t in c.token_ids] == list(messages[-1].result.token_ids)
            assert len(messages[-1].result.token_ids) == n
            assert len(chunks) <= 2 + took_s, (len(chunks), took_s)


class _Collected:
    """A TokenSink that keeps what it was pushed."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.texts: list[str] = []

    def chunk(self, token_ids, text: str) -> None:
        self.token_ids.extend(token_ids)
        self.texts.append(text)


async def test_a_pushed_request_gives_its_sink_every_token_once_in_order(engine):
    from ultrakv.node.server import LocalBackend

    backend = LocalBackend(engine)
    request = validate_generate(pb.GenerateRequest(
        request_id="pushed", token_ids=pb.TokenIds(ids=[5, 9, 13, 21]),
        sampling=pb.SamplingOptions(max_length=40, temperature=0.0, ignore_eos=True)), Limits())
    sink = _Collected()
    result = await backend.generate_into(request, None, sink)
    want = engine.generate([[5, 9, 13, 21]], SamplingParams(max_tokens=40, temperature=0.0,
                                                            ignore_eos=True))[0]
    assert sink.token_ids == list(result.token_ids) == want.token_ids
    assert "".join(sink.texts) == result.text
    assert result.usage.completion_tokens == 40
    # The pulled form (unary calls, the OpenAI API) yields the same chunks, then the result.
    request.request_id = "pulled"
    events = [e async for e in backend.generate(request, None)]
    assert isinstance(events[-1], pb.GenerateResult)
    assert [t for e in events[:-1] for t in e.token_ids] == want.token_ids


async def test_a_pulled_request_left_early_is_aborted(engine):
    from ultrakv.node.server import LocalBackend

    backend = LocalBackend(engine)
    request = validate_generate(pb.GenerateRequest(
        request_id="left", text="count to a thousand",
        sampling=pb.SamplingOptions(max_length=LONG, temperature=0.0, ignore_eos=True)), Limits())
    events = backend.generate(request, None)
    first = await anext(events)
    assert isinstance(first, pb.TokenChunk) and first.token_ids
    await events.aclose()  # the caller goes away: the request must leave the engine

    def in_engine() -> int:
        requests = engine.stats()["requests"]
        return requests["running"] + requests["waiting"]

    deadline = time.monotonic() + 60
    while in_engine() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert in_engine() == 0  # aborted, not generating its LONG tokens for nobody


def test_stream_pacer_waits_longer_with_many_streams_and_never_past_its_cap():
    from ultrakv.cluster.service import StreamPacer

    pacer = StreamPacer(floor_s=0.005, messages_per_s=2000, max_s=0.04)
    pacer.streams = 1
    assert pacer.interval_s() == 0.005  # one stream: the configured interval
    pacer.streams = 64  # 64 streams share 2000 messages/s: 32 ms each
    assert abs(pacer.interval_s() - 0.032) < 1e-9
    pacer.streams = 1000
    assert pacer.interval_s() == 0.04
    assert StreamPacer(floor_s=0.0).interval_s() == 0.0  # coalescing off stays off


async def test_outbox_gather_ends_when_a_final_message_comes():
    from ultrakv.cluster.service import Outbox

    box = Outbox()
    box.put_chunk("a", [1], "x")
    box.pop()  # written: the stream now lets tokens gather
    gathering = asyncio.create_task(box.gather(3600.0))
    await asyncio.sleep(0)  # it waits now
    box.put_final(pb.GenerateStreamResponse(request_id="a", result=pb.GenerateResult()))
    await asyncio.wait_for(gathering, timeout=60)  # the result is not held back an hour
    assert box.pop().WhichOneof("event") == "result"
    box.put_chunk("b", [2], "y")
    await asyncio.wait_for(box.gather(0.01), timeout=60)  # no final queued: the interval passes
    assert box.pop().chunk.token_ids == [2]


def test_a_batch_takes_queued_messages_up_to_its_size_and_leaves_the_rest_in_order():
    from ultrakv.cluster.service import Outbox

    box = Outbox()
    for i in range(10):
        box.put_chunk(f"r{i}", list(range(100)), "x" * 100)
    first, second = pb.GenerateBatch(), pb.GenerateBatch()
    assert box.pop_into(first.events, 1000) and box.pop_into(second.events, 1 << 20)
    assert 1 <= len(first.events) < 10 and first.ByteSize() < 1000 + 400
    assert [e.request_id for e in (*first.events, *second.events)] == [f"r{i}" for i in range(10)]
    assert box.pop() is None


async def test_outbox_gather_does_not_wait_when_a_final_came_during_the_last_write():
    """A request's result queued while the stream was writing its last chunk (the write
    awaits the transport) leaves at once, not after the stream's gathering interval."""
    from ultrakv.cluster.service import Outbox

    box = Outbox()
    box.put_chunk("a", [1], "x")
    box.pop()  # being written...
    box.put_final(pb.GenerateStreamResponse(request_id="a", result=pb.GenerateResult()))
    await asyncio.wait_for(box.gather(3600.0), timeout=60)  # ...then the stream gathers
    assert box.pop().WhichOneof("event") == "result"
    assert box.pop() is None


def test_outbox_merges_unsent_chunks_of_a_request():
    from ultrakv.cluster.service import Outbox

    box = Outbox()
    box.put_chunk("a", [1], "x")
    box.put_chunk("b", [7], "p")
    box.put_chunk("a", [2], "y")
    box.put_final(pb.GenerateStreamResponse(request_id="a", result=pb.GenerateResult()))
    box.put_chunk("b", [8], "q")
    out = [box.pop() for _ in range(3)]
    assert (out[0].request_id, out[0].chunk.text, list(out[0].chunk.token_ids)) == ("a", "xy",
                                                                                   [1, 2])
    assert (out[1].request_id, out[1].chunk.text, list(out[1].chunk.token_ids)) == ("b", "pq",
                                                                                   [7, 8])
    assert out[2].WhichOneof("event") == "result" and box.pop() is None
    box.put_chunk("a", [3], "z")  # after a pop: a new message
    assert box.pop().chunk.text == "z"


# --- bad input -------------------------------------------------------------------------------


BAD_SAMPLING = [
    ({"max_length": 0}, "sampling.max_length"),
    ({"max_length": -3}, "sampling.max_length"),
    ({"max_length": 4097}, "sampling.max_length"),
    ({"temperature": -0.5}, "sampling.temperature"),
    ({"temperature": math.nan}, "sampling.temperature"),
    ({"top_p": 0.0}, "sampling.top_p"),
    ({"top_p": 1.5}, "sampling.top_p"),
    ({"top_p": math.nan}, "sampling.top_p"),
    ({"top_k": -1}, "sampling.top_k"),
]
BAD_SESSIONS = ["", "x" * 129, "a/b", "..\\etc", "ünïcode", "white space"]


@pytest.mark.parametrize(("fields", "field"), BAD_SAMPLING)
def test_bad_sampling_is_invalid_argument(stub, fields, field):
    request = pb.GenerateRequest(text="hi", sampling=pb.SamplingOptions(**fields))
    with pytest.raises(grpc.RpcError) as err:
        stub.Process(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    name = field.split(".")[-1]
    assert err.value.details().startswith(f"{name} must")
    assert dict(err.value.trailing_metadata())["ultrakv-field"] == field


def test_unknown_priority_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Process(pb.GenerateRequest(text="hi", priority=9), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority must be one of CRITICAL, HIGH, NORMAL, LOW, got 9" in err.value.details()


@pytest.mark.parametrize("session_id", BAD_SESSIONS)
def test_bad_session_id_is_invalid_argument(stub, session_id):
    with pytest.raises(grpc.RpcError) as err:
        stub.Process(pb.GenerateRequest(text="hi", session_id=session_id), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(err.value.trailing_metadata())["ultrakv-field"] == "session_id"


def test_invalid_utf8_is_invalid_argument(server):
    good = pb.GenerateRequest(text="ok\u00e9", sampling=pb.SamplingOptions(max_length=2))
    raw = good.SerializeToString().replace("ok\u00e9".encode(), b"ok\xc3(")
    channel = grpc.insecure_channel(server.address)
    process = channel.unary_unary("/ultrakv.v1.UltraKV/Process")  # raw bytes both ways
    with pytest.raises(grpc.RpcError) as err:
        process(raw, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "text must be valid UTF-8"
    assert dict(err.value.trailing_metadata())["ultrakv-field"] == "text"
    channel.close()


def test_prompt_over_the_size_limit_is_resource_exhausted(stub):
    with pytest.raises(grpc.RpcError) as err:
        stub.Process(pb.GenerateRequest(text="x" * (MAX_PROMPT_BYTES + 1)), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"at most {MAX_PROMPT_BYTES} bytes" in err.value.details()
    assert "retry with a shorter prompt" in err.value.details()
    # Under the byte limit but over the context window: the engine's limit, same status.
    with pytest.raises(grpc.RpcError) as err:
        stub.Process(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[65] * 5000)), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_unknown_session_is_not_found(client):
    for call in (client.get_session, client.delete_session):
        with pytest.raises(RequestError) as err:
            call("no-such-session")
        assert err.value.code == "NOT_FOUND" and "no-such-session" in err.value.message


def test_bad_requests_do_not_disturb_others_on_the_stream(server, client):
    expected = client.process_request(greedy("steady", 10))["response"]["token_ids"]
    good = pb.GenerateStreamRequest(generate=pb.GenerateRequest(
        request_id="good", text="steady", sampling=pb.SamplingOptions(max_length=10,
                                                                      temperature=0.0)))
    bad = [
        pb.GenerateStreamRequest(generate=pb.GenerateRequest(
            request_id="bad-len", text="x", sampling=pb.SamplingOptions(max_length=0))),
        pb.GenerateStreamRequest(generate=pb.GenerateRequest(
            request_id="bad-session", text="x", session_id="../etc/passwd")),
        pb.GenerateStreamRequest(generate=pb.GenerateRequest(request_id="no-prompt")),
        pb.GenerateStreamRequest(generate=pb.GenerateRequest(text="no request id")),
        pb.GenerateStreamRequest(generate=pb.GenerateRequest(
            request_id="too-long", text="y" * (MAX_PROMPT_BYTES + 1))),
    ]
    utf8 = pb.GenerateStreamRequest(generate=pb.GenerateRequest(
        request_id="bad-utf8", text="ab")).SerializeToString().replace(b"ab", b"\xff\xfe")
    outgoing = [good.SerializeToString(), *(b.SerializeToString() for b in bad[:2]), utf8,
                *(b.SerializeToString() for b in bad[2:])]
    channel = grpc.insecure_channel(server.address)
    generate = channel.stream_stream("/ultrakv.v1.UltraKV/Generate",
                                     response_deserializer=pb.GenerateStreamResponse.FromString)
    errors, tokens, result = {}, [], None
    for m in generate(iter(outgoing), timeout=30):
        kind = m.WhichOneof("event")
        if kind == "error":
            errors[m.request_id] = m.error
        elif kind == "chunk":
            tokens.extend(m.chunk.token_ids)
        else:
            result = m.result
    channel.close()
    assert result is not None and result.request_id == "good"
    assert tokens == list(result.token_ids) == expected
    assert errors["bad-len"].field == "sampling.max_length"
    assert errors["bad-session"].field == "session_id"
    assert errors["no-prompt"].field == "prompt"
    assert errors[""].field == "request_id"
    assert errors["too-long"].code == "RESOURCE_EXHAUSTED"
    assert errors["bad-utf8"].code == "INVALID_ARGUMENT" and errors["bad-utf8"].field == "text"
    assert all(e.code == "INVALID_ARGUMENT" for k, e in errors.items() if k != "too-long")


def test_full_queue_is_resource_exhausted_with_a_retry_hint():
    # A node of its own: one running sequence, so the admission queue fills quickly.
    eng = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=256, max_num_seqs=1))
    try:
        with BackgroundServer(eng) as srv, Client(srv.address) as c:
            channel = grpc.insecure_channel(srv.address)
            stub = ultrakv_pb2_grpc.UltraKVStub(channel)
            n = eng.max_waiting + 4  # 1 running + max_waiting queued; the rest are refused
            queue_full = threading.Event()

            def outgoing():
                for i in range(n):
                    yield long_request(f"q{i}")
                queue_full.wait(30)
                for i in range(n):
                    yield pb.GenerateStreamRequest(cancel=pb.CancelRequest(request_id=f"q{i}"))

            errors, aborted = [], 0
            for m in stub.Generate(outgoing(), timeout=60):
                if m.WhichOneof("event") == "error":
                    errors.append(m.error)
                    if len(errors) == 1:
                        with pytest.raises(grpc.RpcError) as err:
                            stub.Process(pb.GenerateRequest(text="one more"), timeout=10)
                        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 0
                        queue_full.set()
                elif m.WhichOneof("event") == "result":
                    aborted += m.result.finish_reason == pb.FINISH_REASON_ABORT
            assert errors and all(e.code == "RESOURCE_EXHAUSTED" for e in errors)
            assert all(e.retry_after_s > 0 for e in errors)
            assert aborted == n - len(errors)  # one terminal message each; the rest cancelled
            assert wait_blocks_free(c) == 0
            channel.close()
    finally:
        eng.shutdown()


class _DeadlineBackend:
    """A ServingBackend that answers every request at once and records the deadline the
    stream gave it (seconds from then)."""

    def __init__(self) -> None:
        self.deadlines: list[float | None] = []

    async def generate_into(self, request, deadline, sink):
        self.deadlines.append(None if deadline is None else deadline - time.monotonic())
        return pb.GenerateResult(request_id=request.request_id)


async def test_a_stream_requests_timeout_ms_is_its_deadline_at_the_edge():
    """On a stream without a call deadline (GenerateMany: a multiplexing client's), the
    request's own timeout_ms is the deadline its backend gets. Before, only a node applied
    it, to each attempt: a coordinator (no call deadline) resumed a request on another node
    with the whole timeout again."""
    from ultrakv.cluster.service import ULTRAKV_SERVICE, UltraKVServicer, add_servicer

    backend = _DeadlineBackend()
    server = grpc.aio.server()
    add_servicer(server, UltraKVServicer(backend, Limits(), edge=False), ULTRAKV_SERVICE)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = ultrakv_pb2_grpc.UltraKVStub(channel)
            requests = [pb.GenerateStreamRequest(generate=pb.GenerateRequest(
                request_id=rid, text="hi", timeout_ms=ms)) for rid, ms in (("a", 1500), ("b", 0))]

            async def read() -> list:
                return [b async for b in stub.GenerateMany(iter(requests))]  # no call deadline

            batches = await asyncio.wait_for(read(), timeout=60)
    finally:
        await server.stop(None)
    assert sorted(e.request_id for b in batches for e in b.events) == ["a", "b"]
    with_timeout, without = backend.deadlines
    assert with_timeout is not None and 0 < with_timeout <= 1.5 and without is None
