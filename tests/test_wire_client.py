"""Client transport behaviour: retries on UNAVAILABLE, API key metadata, TLS, and
AsyncClient's streams multiplexed on one GenerateMany call."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import threading
import time

import grpc
import pytest
from ultrakv.client import AsyncClient, Client, RetryPolicy, TLSConfig
from ultrakv.client.client import RequestError
from ultrakv.cluster.validation import Limits
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.server import BackgroundServer, ServerSettings
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2_grpc

FAST_RETRY = RetryPolicy(attempts=10, initial_s=0.05, max_s=0.5, jitter_s=0.05)


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=64))
    yield eng
    eng.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(port: int = 0, **kw) -> ServerSettings:
    return ServerSettings(**{"host": "127.0.0.1", "port": port, "grace_period_s": 0.2, **kw})


def test_retries_until_the_server_comes_up(engine):
    port = free_port()
    servers = []

    def start_late():
        time.sleep(0.6)
        servers.append(BackgroundServer(engine, settings(port)).start())

    starter = threading.Thread(target=start_late)
    starter.start()
    try:
        with Client(f"127.0.0.1:{port}", retry=FAST_RETRY, timeout=10) as c:
            started = time.monotonic()
            r = c.process_request({"text": "hi", "max_length": 2})
            assert r["success"], r
            assert time.monotonic() - started >= 0.5  # it did wait for the server
    finally:
        starter.join()
        for s in servers:
            s.stop()


def test_retries_are_bounded():
    policy = RetryPolicy(attempts=3, initial_s=0.05, max_s=0.1, jitter_s=0.0)
    with Client(f"127.0.0.1:{free_port()}", retry=policy, timeout=2) as c:
        started = time.monotonic()
        r = c.process_request({"text": "hi"})
        elapsed = time.monotonic() - started
    assert not r["success"] and r["error_code"] == "UNAVAILABLE"
    assert 0.1 <= elapsed < 60  # two backoff waits (0.05 + 0.1), then give up (not forever)


async def test_async_client_retries_are_bounded():
    policy = RetryPolicy(attempts=2, initial_s=0.05, max_s=0.05, jitter_s=0.0)
    async with AsyncClient(f"127.0.0.1:{free_port()}", retry=policy, timeout=2) as c:
        r = await c.process_request({"text": "hi"})
        health = await c.health()
    assert r["error_code"] == "UNAVAILABLE" and health["status"] == "UNREACHABLE"


class RecordMetadata(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self.seen: list[dict] = []

    async def intercept_service(self, continuation, details):
        self.seen.append(dict(details.invocation_metadata or ()))
        return await continuation(details)


def test_api_key_travels_as_metadata(engine):
    recorder = RecordMetadata()
    with BackgroundServer(engine, settings(), interceptors=(recorder,)) as srv:
        with Client(srv.address, api_key="k-123") as c:
            assert c.process_request({"text": "hi", "max_length": 2})["success"]
            list(c.stream({"text": "hi", "max_length": 2}))
            c.stats()
        with Client(srv.address) as c:
            c.stats()
    keys = [m.get("x-api-key") for m in recorder.seen]
    assert keys == ["k-123", "k-123", "k-123", None]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl to make a cert")
def test_tls_end_to_end(engine, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=ultrakv.test", "-addext",
                    "subjectAltName=DNS:ultrakv.test"], check=True, capture_output=True)
    with BackgroundServer(engine, settings(tls_cert=str(cert), tls_key=str(key))) as srv:
        tls = TLSConfig(ca_cert=str(cert), server_name="ultrakv.test")
        with Client(srv.address, tls=tls) as c:
            assert c.process_request({"text": "secure", "max_length": 2})["success"]
            assert c.health()["healthy"]
        no_retry = RetryPolicy(attempts=1)
        with Client(srv.address, retry=no_retry, timeout=2) as plain:
            assert not plain.process_request({"text": "x"})["success"]


def test_several_addresses_fail_over_to_the_one_that_serves(engine):
    dead = f"127.0.0.1:{free_port()}"
    no_wait = RetryPolicy(attempts=1, initial_s=120.0, max_s=120.0, jitter_s=0.0)
    with BackgroundServer(engine, settings()) as srv:
        # one round over both addresses: the dead one first, the live one at once after it
        with Client(f"{dead},{srv.address}", retry=no_wait, timeout=5) as c:
            started = time.monotonic()
            assert c.process_request({"text": "hi", "max_length": 2})["success"]
            assert time.monotonic() - started < 60  # no 120 s backoff wait between addresses
            assert c.address == srv.address  # it stays on the one that answered
            assert c.health()["healthy"]
        with Client([dead, dead], retry=no_wait, timeout=2) as c:
            assert c.process_request({"text": "hi"})["error_code"] == "UNAVAILABLE"
    with pytest.raises(ValueError, match="address must name at least one HOST:PORT"):
        Client(" , ")


async def test_async_client_fails_over_too(engine):
    dead = f"127.0.0.1:{free_port()}"
    with BackgroundServer(engine, settings()) as srv:
        async with AsyncClient([dead, srv.address], retry=RetryPolicy(attempts=1),
                               timeout=5) as c:
            r = await c.process_request({"text": "hi", "max_length": 2})
            chunks = [ch async for ch in c.stream({"text": "hi", "max_length": 2})]
        assert r["success"] and chunks[-1].finished and c.address == srv.address


async def test_a_retried_turn_is_answered_from_the_record_not_taken_twice(engine):
    spec = {"token_ids": [5, 6, 7, 8], "session_id": "retry-1", "request_id": "turn-1",
            "max_length": 4, "temperature": 0.0, "ignore_eos": True}
    with BackgroundServer(engine, settings()) as srv:
        async with AsyncClient(srv.address, timeout=10) as c:
            # the retry arrives while the first attempt runs, and again after it finished
            first, during = await asyncio.gather(c.process_request(spec),
                                                 c.process_request(spec))
            after = await c.process_request(spec)
            assert first["success"] and during["success"] and after["success"], (during, after)
            tokens = first["response"]["token_ids"]
            assert during["response"]["token_ids"] == tokens == after["response"]["token_ids"]
            assert (await c.get_session("retry-1"))["turns"] == 1
            second = await c.process_request({**spec, "request_id": "turn-2"})  # a new turn
            assert second["success"] and (await c.get_session("retry-1"))["turns"] == 2
            assert engine.export_session("retry-1").token_ids == [5, 6, 7, 8, *tokens, 5, 6, 7, 8,
                                                                  *second["response"]["token_ids"]]


class _RecordingProxy:
    """A TCP proxy in front of a server that keeps what each client connection sent, so a
    test can read the HTTP/2 frames a client wrote."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.sent: list[bytearray] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            host, port = self.target.rsplit(":", 1)
            upstream = socket.create_connection((host, int(port)))
            record = bytearray()
            self.sent.append(record)
            threading.Thread(target=self._pump, args=(client, upstream, record), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if record is not None:
                    record += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._listener.close()


def _request_data_frames(sent: bytes) -> list[tuple[int, int, int]]:
    """(stream id, payload length, END_STREAM) of each DATA frame a client sent."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert sent.startswith(preface)
    frames, at = [], len(preface)
    while at + 9 <= len(sent):
        length = int.from_bytes(sent[at:at + 3], "big")
        kind, flags = sent[at + 3], sent[at + 4]
        stream = int.from_bytes(sent[at + 5:at + 9], "big") & 0x7FFFFFFF
        if kind == 0:  # DATA
            frames.append((stream, length, flags & 0x1))
        at += 9 + length
    return frames


async def test_a_streamed_request_and_its_half_close_leave_in_one_frame(engine):
    # Opened as a bidirectional call, the request waited for the call's headers to be sent
    # and the half-close followed as an empty frame of its own: two more hops of the
    # client's event loop before the server could see the request complete.
    with BackgroundServer(engine, settings()) as srv:
        proxy = _RecordingProxy(srv.address)
        try:
            # A call of its own per request (multiplex=False; a multiplexing client sends its
            # requests as messages of one GenerateMany stream instead, tested below).
            async with AsyncClient(proxy.address, timeout=10, multiplex=False) as c:
                chunks = [ch async for ch in c.stream({"text": "hi", "max_length": 2})]
            with Client(proxy.address, timeout=10) as c:
                sync_chunks = list(c.stream({"text": "hi", "max_length": 2}))
        finally:
            proxy.close()
    assert chunks[-1].finished and sync_chunks[-1].finished
    assert len(proxy.sent) == 2
    for sent in proxy.sent:
        frames = _request_data_frames(bytes(sent))
        assert frames and all(end for _, _, end in frames), frames  # no empty closing frame
        assert all(length > 0 for _, length, _ in frames), frames


# --- AsyncClient's streams on one GenerateMany call ------------------------------------------


class RecordMethods(grpc.aio.ServerInterceptor):
    """Records each call's method; ``hide`` answers those methods UNIMPLEMENTED, as a server
    from before them would."""

    def __init__(self, hide: tuple[str, ...] = ()) -> None:
        self.methods: list[str] = []
        self.hide = hide

    async def intercept_service(self, continuation, details):
        method = details.method.rsplit("/", 1)[-1]
        self.methods.append(method)
        return None if method in self.hide else await continuation(details)


def _specs(n: int) -> list[dict]:
    return [{"token_ids": [3 + i, 9, 4 + i, 7], "max_length": 6, "temperature": 0.0,
             "ignore_eos": True} for i in range(n)]


async def _collect(c: AsyncClient, spec: dict) -> list:
    return [chunk async for chunk in c.stream(spec)]


async def test_concurrent_streams_share_one_generate_many_call_with_the_same_tokens(engine):
    """Eight concurrent streams of one AsyncClient are eight messages on one GenerateMany
    call (before: eight Generate calls), and each gets the tokens a call of its own gets."""
    recorder = RecordMethods()
    with BackgroundServer(engine, settings(), interceptors=(recorder,)) as srv:
        async with AsyncClient(srv.address, timeout=30) as c:
            shared = await asyncio.gather(*(_collect(c, spec) for spec in _specs(8)))
            again = await _collect(c, _specs(1)[0])  # the stream lingers: no new call
        assert recorder.methods == ["GenerateMany"]
        async with AsyncClient(srv.address, timeout=30, multiplex=False) as c:
            alone = await asyncio.gather(*(_collect(c, spec) for spec in _specs(8)))
    ids = [[t for ch in chunks for t in ch.token_ids] for chunks in shared]
    assert ids == [[t for ch in chunks for t in ch.token_ids] for chunks in alone]
    assert all(len(i) == 6 for i in ids)
    assert [ch.result["response"]["token_ids"] for ch in (s[-1] for s in shared)] == ids
    assert again[-1].result["response"]["token_ids"] == ids[0]


def test_a_generate_many_message_carries_the_events_of_several_requests(engine):
    """The public GenerateMany: requests by id as on Generate, and the server writes the
    events pending at a write as one GenerateBatch, so requests running together share
    messages; a bad request fails alone."""
    with BackgroundServer(engine, settings()) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = ultrakv_pb2_grpc.UltraKVStub(ch)
        requests = [pb.GenerateStreamRequest(generate=pb.GenerateRequest(
            request_id=f"r{i}", token_ids=pb.TokenIds(ids=[5, 6, 7, i + 1]),
            sampling=pb.SamplingOptions(max_length=8, ignore_eos=True))) for i in range(4)]
        requests.append(pb.GenerateStreamRequest(generate=pb.GenerateRequest(request_id="bad")))
        batches = list(stub.GenerateMany(iter(requests), timeout=60))
    events = [e for b in batches for e in b.events]
    ends = {e.request_id: e for e in events if e.WhichOneof("event") != "chunk"}
    assert {rid: len(ends[rid].result.token_ids) for rid in ("r0", "r1", "r2", "r3")} == \
        {"r0": 8, "r1": 8, "r2": 8, "r3": 8}
    assert ends["bad"].error.code == "INVALID_ARGUMENT"
    assert any(len({e.request_id for e in b.events}) > 1 for b in batches), \
        [[e.request_id for e in b.events] for b in batches]
    assert len(batches) < len(events)


async def test_a_server_without_generate_many_gets_a_call_per_request(engine):
    """A server from before GenerateMany (a rolling upgrade) answers it UNIMPLEMENTED: the
    client streams to it over a Generate call per request from then on."""
    recorder = RecordMethods(hide=("GenerateMany",))
    with BackgroundServer(engine, settings(), interceptors=(recorder,)) as srv:
        async with AsyncClient(srv.address, timeout=30) as c:
            first = await _collect(c, _specs(1)[0])
            both = await asyncio.gather(*(_collect(c, spec) for spec in _specs(2)))
    # Each request on a Generate call; GenerateMany tried first (again only where gRPC
    # reported the refusal as its own INTERNAL, which hides the server's UNIMPLEMENTED).
    assert recorder.methods[0] == "GenerateMany" and recorder.methods.count("Generate") == 3
    assert set(recorder.methods) == {"GenerateMany", "Generate"}
    assert first[-1].finished and all(s[-1].finished for s in both)
    assert [t for ch in first for t in ch.token_ids] == [t for ch in both[0] for t in ch.token_ids]


class _ScriptedGenerateMany(ultrakv_pb2_grpc.UltraKVServicer):
    """A server whose GenerateMany records what arrives and answers only the requests whose
    prompt text is "answer" (one chunk each, never a result); the first ``close_first``
    streams it ends at their first request as a server's idle limit would."""

    def __init__(self, close_first: int = 0, end_first: int = 0) -> None:
        self.received: list[pb.GenerateStreamRequest] = []
        self.streams = 0
        self.close_first = close_first
        self.end_first = end_first  # streams that end cleanly, unanswered, as a stopping server's

    async def GenerateMany(self, requests, context):
        self.streams += 1
        closing = self.streams <= self.close_first
        ending = self.streams <= self.end_first
        async for message in requests:
            self.received.append(message)
            if ending:
                return
            if closing:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "stream closed: idle")
            if message.WhichOneof("action") == "generate" and message.generate.text == "answer":
                yield pb.GenerateBatch(events=[pb.GenerateStreamResponse(
                    request_id=message.generate.request_id, chunk=pb.TokenChunk(text="a"))])


async def _scripted(servicer: _ScriptedGenerateMany) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    ultrakv_pb2_grpc.add_UltraKVServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_a_multiplexed_request_keeps_its_deadline_and_is_cancelled_when_left():
    """On a shared stream a request's deadline is its own: it travels as timeout_ms, and the
    client ends the request there itself (the server may never answer) with a cancel on the
    stream; a stream its reader leaves early is cancelled on the stream too."""
    servicer = _ScriptedGenerateMany()
    server, address = await _scripted(servicer)
    try:
        async with AsyncClient(address, timeout=30) as c:
            started = time.monotonic()
            with pytest.raises(RequestError) as err:
                [ch async for ch in c.stream({"text": "silence", "request_id": "slow"}, timeout=0.5)]
            assert err.value.code == "DEADLINE_EXCEEDED"
            assert time.monotonic() - started < 20
            async for chunk in c.stream({"text": "answer", "request_id": "left"}):
                assert chunk.text == "a"
                break
            for _ in range(1200):  # up to 60 s: wait for it, not for a fixed time
                if len(servicer.received) >= 4:
                    break
                await asyncio.sleep(0.05)
    finally:
        await server.stop(None)
    actions = [(m.WhichOneof("action"), m.generate.request_id or m.cancel.request_id)
               for m in servicer.received]
    assert actions == [("generate", "slow"), ("cancel", "slow"), ("generate", "left"),
                       ("cancel", "left")]
    assert 0 < servicer.received[0].generate.timeout_ms <= 500
    assert servicer.streams == 1


@pytest.mark.parametrize("how", ["idle limit", "stop"])
async def test_a_request_sent_as_the_server_ended_its_idle_stream_goes_on_a_new_one(how):
    """The server closed the stream for idleness (DEADLINE_EXCEEDED) or ended it at its
    stop (OK) as the request went out, unread: the request goes again on a new stream."""
    servicer = _ScriptedGenerateMany(close_first=1) if how == "idle limit" else \
        _ScriptedGenerateMany(end_first=1)
    server, address = await _scripted(servicer)
    try:
        async with AsyncClient(address, timeout=30) as c:
            async for chunk in c.stream({"text": "answer", "request_id": "r1"}):
                assert chunk.text == "a"
                break
    finally:
        await server.stop(None)
    assert servicer.streams == 2
    if how == "idle limit":
        assert [m.generate.request_id for m in servicer.received if m.generate.request_id] == ["r1", "r1"]


async def test_a_servers_stop_ends_idle_streams_at_once_and_lets_running_requests_finish(
        engine, monkeypatch):
    """A multiplexing client's stream lingers with nothing in flight; a server's graceful
    stop ends it at once instead of waiting out its grace period for it (before: the whole
    grace, or the client's linger), while a request running on such a stream still
    finishes within the grace."""
    monkeypatch.setattr("ultrakv.client.client.LINK_LINGER_S", 60.0)
    grace = 10.0
    srv = BackgroundServer(engine, settings(grace_period_s=grace)).start()
    async with AsyncClient(srv.address, timeout=30) as c:
        await _collect(c, _specs(1)[0])  # the stream now lingers
        started = time.monotonic()
        await asyncio.to_thread(srv.stop)
        assert time.monotonic() - started < grace * 0.8
    srv = BackgroundServer(engine, settings(grace_period_s=grace)).start()
    async with AsyncClient(srv.address, timeout=60) as c:
        chunks = []
        async for chunk in c.stream({"token_ids": [5, 6, 7], "max_length": 40, "ignore_eos": True}):
            chunks.append(chunk)
            if len(chunks) == 1:
                stopping = asyncio.create_task(asyncio.to_thread(srv.stop))
        await stopping
    assert chunks[-1].finished and chunks[-1].result["success"]
    assert sum(len(ch.token_ids) for ch in chunks[:-1]) == 40


async def test_streams_go_on_after_a_server_closed_the_idle_stream(engine):
    """A server's idle limit below the client's linger ends the shared stream between
    requests; the next request opens a new one."""
    recorder = RecordMethods()
    quick = settings(limits=Limits(stream_idle_timeout_s=0.2))
    with BackgroundServer(engine, quick, interceptors=(recorder,)) as srv:
        async with AsyncClient(srv.address, timeout=30) as c:
            first = await _collect(c, _specs(1)[0])
            for _ in range(1200):  # the server closes the idle stream (up to 60 s)
                if not c._links.get(0):
                    break
                await asyncio.sleep(0.05)
            second = await _collect(c, _specs(1)[0])
    assert recorder.methods == ["GenerateMany", "GenerateMany"]
    assert first[-1].result["response"]["token_ids"] == second[-1].result["response"]["token_ids"]


async def test_closing_the_client_fails_its_running_streams_instead_of_ending_them(engine):
    """close() while a multiplexed stream runs: the stream raises (before: it just stopped,
    with no result and no error, as if complete)."""
    with BackgroundServer(engine, settings()) as srv:
        c = AsyncClient(srv.address, timeout=30)
        got: list = []
        with pytest.raises(RequestError) as err:
            async for chunk in c.stream({"token_ids": [5, 6, 7], "max_length": 2000, "ignore_eos": True}):
                got.append(chunk)
                if len(got) == 1:
                    await c.close()
        assert err.value.code == "CANCELLED" and not any(ch.finished for ch in got)


async def test_a_stopping_server_refuses_new_requests_on_a_busy_stream_and_they_fail_over(engine):
    """A server that begins to stop lets its running requests finish; a new request on the
    same (busy) stream is refused UNAVAILABLE and goes to the next address (before: it was
    accepted, then cut off mid-stream when the grace ran out)."""
    first = BackgroundServer(engine, settings(grace_period_s=30.0)).start()
    with BackgroundServer(engine, settings()) as second:
        async with AsyncClient([first.address, second.address], timeout=60,
                               retry=RetryPolicy(attempts=2, initial_s=0.05, max_s=0.1)) as c:
            long = c.stream({"token_ids": [5, 6, 7], "max_length": 300, "ignore_eos": True})
            await anext(long)  # running on the first server
            stopping = asyncio.create_task(asyncio.to_thread(first.stop))
            for _ in range(6000):  # until the stop has begun (a loaded machine takes its time)
                if first.server._stream_servicers[0].pacer.stopping:
                    break
                await asyncio.sleep(0.01)
            new = await _collect(c, _specs(1)[0])
            assert c.address == second.address  # it failed over
            rest = [chunk async for chunk in long]
            await stopping
    assert new[-1].result["success"]
    assert rest[-1].finished and rest[-1].result["success"]
