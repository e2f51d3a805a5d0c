"""The engine's Python API on the `tiny` preset: bad input, streaming, abort, sampling,
stop conditions, sessions and their export/import, stats."""

from __future__ import annotations

import asyncio
import math
import time

import grpc
import pytest
import torch
from ultrakv.cluster.errors import (
    InvalidRequestError,
    PromptTooLongError,
    SessionFencedError,
    SessionNotFoundError,
)
from ultrakv.cluster.validation import rejection_from_error
from ultrakv.node import Engine, EngineConfig, GenerateRequest, SamplingParams
from ultrakv.node.sessions import SessionOwnedError

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    eng = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=128, max_model_len=512))
    yield eng
    eng.shutdown()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
    ],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_requests_raise_and_engine_keeps_serving(engine):
    good = engine.generate([[5, 6, 7]], GREEDY)[0]
    with pytest.raises(InvalidRequestError, match="prompt must be non-empty"):
        engine.generate([[]], GREEDY)
    with pytest.raises(InvalidRequestError, match="prompt must be non-empty"):
        engine.generate([""], GREEDY)
    with pytest.raises(PromptTooLongError, match=r"at most 511 tokens .* got 600"):
        engine.generate([[1] * 600], GREEDY)
    with pytest.raises(InvalidRequestError, match=r"max_tokens must be in \[1, 4096\], got 5000"):
        engine.generate([[1, 2]], SamplingParams(max_tokens=5000))
    with pytest.raises(InvalidRequestError, match="token ids must be in"):
        engine.generate([[1, 10**6]], GREEDY)
    with pytest.raises(SessionNotFoundError, match="nope"):
        engine.get_session("nope")
    with pytest.raises(SessionNotFoundError):
        engine.delete_session("nope")
    with pytest.raises(SessionNotFoundError):
        engine.export_session("nope")
    assert engine.generate([[5, 6, 7]], GREEDY)[0].token_ids == good.token_ids
    assert engine.stats()["requests"]["running"] == 0


def test_stream_deltas_add_up_to_the_output(engine):
    async def run():
        deltas = []
        async for d in engine.stream(GenerateRequest(prompt="Hello there", sampling=GREEDY)):
            deltas.append(d)
        return deltas

    deltas = asyncio.run(run())
    final = deltas[-1]
    assert final.finished and final.output is not None
    assert [t for d in deltas for t in d.token_ids] == final.output.token_ids
    assert "".join(d.text for d in deltas) == final.output.text
    assert final.output.token_ids == engine.generate(["Hello there"], GREEDY)[0].token_ids


def test_abort_mid_stream_frees_blocks_at_once(engine):
    free_before = engine.pool.num_free

    async def run():
        req = GenerateRequest(prompt=list(range(1, 200)), sampling=SamplingParams(max_tokens=400, ignore_eos=True))
        got = 0
        async for _ in engine.stream(req):  # leaving the loop early aborts the request
            got += 1
            if got == 3:
                break
        await asyncio.sleep(0)
        return req.request_id

    rid = asyncio.run(run())
    # An abort takes effect at once, or at the end of the step computing the sequence then.
    deadline = time.monotonic() + 2.0
    while engine.stats()["requests"]["running"] and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not engine.abort(rid)  # already gone
    assert engine.stats()["requests"]["running"] == 0
    assert engine.pool.num_used == 0 and engine.pool.num_free == free_before


async def test_two_tenants_run_and_abort_the_same_request_id_apart(engine):
    """Request ids are the tenant's own (RequestKey): another tenant's request under a running
    id runs beside it (not refused "already running"), aborting it leaves the first one
    whole, and only the same tenant's second request of that id is refused. Run again over an
    engine core process in test_engine_process.py (its proxy's table)."""
    loop = asyncio.get_running_loop()
    prompt = [7, 8, 9, 10, 11]
    short = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    want = engine.generate([prompt], short)[0].token_ids
    tokens: dict[str, list[int]] = {"acme": [], "globex": []}
    ended: dict[str, asyncio.Future] = {tenant: loop.create_future() for tenant in tokens}

    def listener(tenant: str):
        def on_delta(delta):
            tokens[tenant].extend(delta.token_ids)
            if delta.finished:
                ended[tenant].set_result(delta.output)
        return on_delta

    engine.stream_to(GenerateRequest(prompt=prompt, sampling=short, request_id="shared",
                                     tenant="acme"), listener("acme"))
    with pytest.raises(InvalidRequestError, match="already running"):  # acme's own id: refused
        engine.stream_to(GenerateRequest(prompt=[1], sampling=short, request_id="shared",
                                         tenant="acme"), lambda delta: None)
    engine.stream_to(GenerateRequest(prompt=[3, 1, 4, 1, 5], request_id="shared", tenant="globex",
                                     sampling=SamplingParams(max_tokens=400, ignore_eos=True)),
                     listener("globex"))
    assert not engine.abort("shared", "initech")  # no such request of that tenant
    assert engine.abort("shared", "globex")
    globex = await asyncio.wait_for(ended["globex"], 30)
    acme = await asyncio.wait_for(ended["acme"], 30)
    assert globex.finish_reason == "abort" and len(globex.token_ids) < 400
    assert acme.finish_reason == "length" and acme.token_ids == tokens["acme"] == want


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(engine):
    sp = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    a, b = engine.generate([[3, 4, 5], [3, 4, 5]], [sp, sp])
    assert a.token_ids == b.token_ids
    other = engine.generate([[3, 4, 5]], SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True))[0]
    assert other.token_ids != a.token_ids
    greedy = engine.generate([[3, 4, 5]], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    top1 = engine.generate([[3, 4, 5]], SamplingParams(max_tokens=12, temperature=2.0, top_k=1, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_top_p_and_top_k_restrict_the_support():
    from ultrakv.node.sampler import SamplingTensors, sample

    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]]).repeat(2000, 1)
    params = SamplingTensors(
        temperature=torch.full((2000,), 1.0),
        top_k=torch.tensor([2] * 1000 + [0] * 1000),
        top_p=torch.tensor([1.0] * 1000 + [0.5] * 1000),
        generators=[None] * 2000,
        max_top_k=5,
        any_top_p=True,
    )
    tokens = sample(logits, params)
    assert set(tokens[:1000].tolist()) == {0, 1}  # top-k 2: only the two best
    assert set(tokens[1000:].tolist()) == {0}  # p(0) = 0.73 > 0.5: the nucleus is token 0 alone


def test_stop_token_ids_and_stop_strings(engine):
    free = engine.generate([[9, 9, 9]], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))[0]
    stop_tok = free.token_ids[4]
    first = free.token_ids.index(stop_tok)
    out = engine.generate([[9, 9, 9]], SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[stop_tok]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]

    text = free.text
    needle = next((text[i : i + 2] for i in range(1, len(text) - 2) if "\ufffd" not in text[i : i + 2]), None)
    if needle is None:
        pytest.skip("generated text has no printable pair to stop on")
    out = engine.generate([[9, 9, 9]], SamplingParams(max_tokens=16, temperature=0.0, stop=[needle], ignore_eos=True))[
        0
    ]
    assert out.finish_reason == "stop"
    assert out.text == text[: text.index(needle)]


def test_sessions_export_import_roundtrip_keeps_kv_and_output():
    cfg = EngineConfig(model="tiny", device="cpu", num_blocks=64)
    a, b = Engine(cfg), Engine(cfg)
    a.generate(["The first turn of a conversation that spans a few blocks."], GREEDY, session_ids=["s1"])
    state = a.export_session("s1")
    assert state.kv is not None and state.kv_tokens == (len(state.token_ids) // 16) * 16
    assert b.import_session(state) == state.kv_tokens
    # The imported KV is bit-identical to the exporter's.
    assert torch.equal(b.export_session("s1").kv, state.kv)
    out_a = a.generate([" And the next."], GREEDY, session_ids=["s1"])[0]
    out_b = b.generate([" And the next."], GREEDY, session_ids=["s1"])[0]
    assert out_b.token_ids == out_a.token_ids
    assert out_b.cached_tokens == out_a.cached_tokens >= state.kv_tokens
    assert b.get_session("s1").turns == 2


def test_import_refuses_kv_from_another_model():
    from ultrakv.cluster.errors import IncompatibleSessionError

    a = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=32, seed=0))
    b = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=32, seed=1))
    a.generate(["x" * 40], GREEDY, session_ids=["s"])
    with pytest.raises(IncompatibleSessionError, match="another model|comes from model"):
        b.import_session(a.export_session("s"))


def test_cleanup_and_clear_cache(engine):
    engine.generate(["cleanup me" * 5], GREEDY, session_ids=["old"])
    assert engine.get_session("old").num_cached_blocks > 0
    assert engine.clear_cache() > 0
    assert engine.get_session("old").num_cached_blocks == 0
    assert engine.cleanup_sessions(3600) == 0  # still young
    assert engine.cleanup_sessions(0) >= 1
    with pytest.raises(SessionNotFoundError):
        engine.get_session("old")
    with pytest.raises(InvalidRequestError, match="max_age"):
        engine.cleanup_sessions(-1)


def test_replica_becomes_the_session_on_first_request(engine):
    history = engine.tokenizer.encode("a conversation replicated from a neighbour", add_bos=True)
    engine.store_replica("rep-1", history, turns=2)
    out = engine.generate([" next"], GREEDY, session_ids=["rep-1"])[0]
    assert out.prompt_token_ids[: len(history)] == history
    assert engine.get_session("rep-1").turns == 3


def test_a_replica_of_a_session_served_here_is_refused_unless_newer(engine):
    """Fencing: a node that serves a session (it was handed over here) refuses a replica of
    it from a node with no more turns: that sender's copy is stale, its turn must not be
    acknowledged. A replica with more turns (the session's owner is elsewhere and moved on)
    is held as before."""
    engine.generate(["served here"], GREEDY, session_ids=["own"])
    history = engine.sessions.get("own").token_ids
    with pytest.raises(SessionOwnedError, match="serves it with 1 turns"):
        engine.store_replica("own", history + [5, 6], turns=1)
    engine.store_replica("own", history + [5, 6], turns=2)
    assert engine.get_session("own").replica and engine.get_session("own").turns == 2


def test_a_demoted_session_loses_a_tie_but_keeps_its_turns(engine):
    """A turn that was not acknowledged leaves its session held as a replica: it still
    counts by its turns (a re-sharding plan restores it where it is the newest copy), a copy
    served elsewhere with as many turns wins over it, and the next turn here promotes it."""
    engine.generate(["kept but not acknowledged"], GREEDY, session_ids=["demoted"])
    history = list(engine.sessions.get("demoted").token_ids)
    assert engine.demote_session("demoted")
    info = engine.get_session("demoted")
    assert info.replica and info.turns == 1 and info.num_tokens == len(history)
    out = engine.generate([" again"], GREEDY, session_ids=["demoted"])[0]
    assert out.prompt_token_ids[: len(history)] == history
    assert not engine.get_session("demoted").replica and engine.get_session("demoted").turns == 2


def test_a_node_that_lost_its_lease_fences_its_sessions_until_they_are_settled(engine):
    """Self-fencing: the sessions held when the lease was lost become replicas and take no
    turn (UNAVAILABLE, SessionFencedError) until a coordinator settles them (here a promote,
    as a re-sharding restore does) or the bound passes."""
    engine.generate(["held when the lease went"], GREEDY, session_ids=["fenced-a"])
    engine.generate(["also held"], GREEDY, session_ids=["fenced-b"])
    fenced = engine.fence_sessions(time.time() + 60)
    assert {"fenced-a", "fenced-b"} <= set(fenced)
    assert engine.get_session("fenced-a").replica and engine.session_fenced("fenced-a")
    with pytest.raises(SessionFencedError, match="lost its cluster lease"):
        engine.generate([" stale"], GREEDY, session_ids=["fenced-a"])
    assert rejection_from_error(SessionFencedError("fenced-a")).code == grpc.StatusCode.UNAVAILABLE
    assert engine.promote_replica("fenced-a") and not engine.session_fenced("fenced-a")
    assert engine.generate([" settled"], GREEDY, session_ids=["fenced-a"])[0].finish_reason
    # The owner's newer replica, pushed since, settles the copy held here too.
    newer = list(engine.export_session("fenced-b").token_ids) + [5, 6]
    engine.store_replica("fenced-b", newer, turns=2)
    assert not engine.session_fenced("fenced-b")
    engine.generate(["held past the bound"], GREEDY, session_ids=["fenced-c"])
    engine.sessions.fence(time.time() - 1)  # the bound passed: no coordinator looked at it
    assert not engine.session_fenced("fenced-c")
    engine.generate([" after the bound"], GREEDY, session_ids=["fenced-c"])


def test_a_turn_hashes_only_its_new_blocks(monkeypatch):
    from ultrakv.cluster import block_hashing as hashing

    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=128, max_model_len=1024))
    bs = engine.config.block_size
    for turn in range(3):
        engine.generate([list(range(5 + turn, 105))], GREEDY, session_ids=["chain"])
    session = engine.sessions.get("chain")
    # The session keeps the chain of its history's full blocks (all but the last, uncomputed token).
    assert len(session.block_hashes) == (len(session.token_ids) - 1) // bs
    assert session.block_hashes == hashing.hash_token_blocks(session.token_ids, bs)[: len(session.block_hashes)]

    calls = []
    real = hashing._digest  # one call per block hashed, whichever function hashes it
    monkeypatch.setattr(hashing, "_digest", lambda *a, **k: calls.append(1) or real(*a, **k))
    history, known = len(session.token_ids), len(session.block_hashes)
    out = engine.generate([list(range(7, 47))], GREEDY, session_ids=["chain"])[0]
    assert out.cached_tokens == (history - 1) // bs * bs
    n = len(engine.sessions.get("chain").token_ids)
    # The turn hashed each block past the known chain (prompt and reply: 3) once, not all 20-odd.
    assert len(calls) == (n - 1) // bs - known == 3, (len(calls), known)
    assert engine.get_session("chain").num_cached_blocks == (n - 1) // bs  # the last token has no KV yet


def test_stats_report_cache_and_latency(engine):
    engine.generate([[1, 2, 3] * 20, [1, 2, 3] * 20 + [4]], GREEDY)
    s = engine.stats()
    assert s["cache"]["policy"] == "lru" and s["cache"]["num_blocks"] == 128
    assert s["tokens"]["generated"] > 0 and s["latency"]["ttft_p50_s"] > 0
    assert set(s["requests"]) >= {"total", "running", "waiting", "finished", "preemptions"}


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "arc", "s3fifo"])
def test_every_eviction_policy_serves_under_memory_pressure(policy):
    """A pool far smaller than the traffic: blocks are evicted through the policy and the
    output is the same as with a roomy pool."""
    prompts = [[i % 200 + 1] * 40 + list(range(1, 30)) for i in range(24)]
    roomy = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=512))
    tight = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=24, eviction_policy=policy))
    want = [o.token_ids for o in roomy.generate(prompts, GREEDY)]
    for chunk in range(0, len(prompts), 4):  # several rounds, so earlier blocks must be evicted
        got = tight.generate(prompts[chunk : chunk + 4], GREEDY)
        assert [o.token_ids for o in got] == want[chunk : chunk + 4]
    cache = tight.stats()["cache"]
    assert cache["policy"] == policy and cache["evictions"] > 0


def test_concurrent_streams_aborts_and_admin_calls_keep_outputs_and_blocks_right():
    """The model runs outside the state lock: while the background loop steps, other threads
    stream, abort mid-flight, export sessions, clear the cache and read stats. Every request
    that ran to its end matches a quiet engine's output, and no block leaks."""
    import random
    import threading

    cfg = EngineConfig(model="tiny", device="cpu", num_blocks=256, max_num_batched_tokens=64)
    quiet, busy = Engine(cfg), Engine(cfg)
    prompts = [[random.Random(i).randrange(1, 250) for _ in range(20 + 7 * i)] for i in range(12)]
    want = [o.token_ids for o in quiet.generate(prompts, GREEDY)]
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    async def one(i: int, abort_after: int | None) -> None:
        got: list[int] = []
        async for delta in busy.stream(GenerateRequest(prompt=prompts[i], sampling=GREEDY, session_id=f"c{i}")):
            got.extend(delta.token_ids)
            if abort_after is not None and len(got) >= abort_after:
                break
            if delta.finished:
                results[i] = got

    async def several(indices: list[int]) -> None:
        await asyncio.wait_for(asyncio.gather(*(one(i, 2 if i % 3 == 0 else None) for i in indices)), timeout=120)

    def worker(indices: list[int]) -> None:
        try:
            asyncio.run(several(indices))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def admin() -> None:
        for _ in range(40):
            busy.stats()
            busy.clear_cache()
            for info in busy.list_sessions():
                busy.export_session(info.session_id)

    threads = [threading.Thread(target=worker, args=(list(range(k, 12, 3)),)) for k in range(3)]
    threads.append(threading.Thread(target=admin))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    busy.shutdown()
    assert not errors, errors
    completed = [i for i in range(12) if i % 3 != 0]
    assert sorted(results) == completed
    for i in completed:
        assert results[i] == want[i]
    assert busy.pool.num_used == 0
