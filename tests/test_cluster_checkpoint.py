"""Checkpoints against real etcd and real engines; clear errors when etcd is unreachable."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from ultrakv.cluster.checkpoint import (
    CheckpointEntry,
    Manifest,
    SessionRecord,
    compact_history,
    load_manifest,
    read_session,
    write_manifest,
    write_session_files,
)
from ultrakv.cluster.errors import SessionNotFoundError
from ultrakv.cluster.etcd_server import free_port
from ultrakv.cluster.session_state import LastTurn
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.checkpoint import Checkpointer, fit_budget, restore_into
from ultrakv.node.turn_ledger import TurnLedger, TurnRecord
from ultrakv.v1 import types_pb2 as pb

pytestmark = pytest.mark.cluster

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[Engine, Engine]]:
    config = EngineConfig(model="tiny", device="cpu", num_blocks=256)
    a, b = Engine(config), Engine(config)
    yield a, b
    a.shutdown()
    b.shutdown()


def _prompt(i: int, turn: int) -> list[int]:
    return [(i * 11 + turn * 5 + k) % 200 + 1 for k in range(19)]


def _turn(engine: Engine, sids: list[str], turn: int):
    return engine.generate([_prompt(i, turn) for i in range(len(sids))], GREEDY,
                           session_ids=sids)


async def test_corrupted_or_missing_files_are_detected_and_recomputed(engines, store,
                                                                      tmp_path: Path) -> None:
    a, b = engines
    sids = [f"ck-{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
    _turn(a, sids, 1)
    _turn(a, sids, 2)
    checkpointer = Checkpointer(a, "n1", tmp_path, store, interval_s=60)
    manifest = await checkpointer.checkpoint_once()
    recorded = await load_manifest(store, "n1")
    assert recorded is not None and recorded.sessions == manifest.sessions
    assert all(manifest.sessions[s].kv_file for s in sids)

    files = Path(manifest.directory)
    kv0 = files / manifest.sessions[sids[0]].kv_file
    data = bytearray(kv0.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    kv0.write_bytes(bytes(data))
    (files / manifest.sessions[sids[1]].kv_file).unlink()
    (files / manifest.sessions[sids[2]].history_file).write_text("{not json")

    report = restore_into(b, recorded)
    assert sorted(report.kv_recomputed) == sorted(sids[:2])
    assert report.lost == [sids[2]]
    assert sorted(report.restored) == sorted([sids[0], sids[1], sids[3]])
    assert {s.session_id for s in b.list_sessions()} >= {sids[0], sids[1], sids[3]}
    assert sids[2] not in {s.session_id for s in b.list_sessions()}

    # Never wrong output: turn 3 on the restored node equals turn 3 on the original.
    keep = [0, 1, 3]
    expected = a.generate([_prompt(i, 3) for i in keep], GREEDY,
                          session_ids=[sids[i] for i in keep])
    got = b.generate([_prompt(i, 3) for i in keep], GREEDY, session_ids=[sids[i] for i in keep])
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.prompt_tokens for o in got] == [o.prompt_tokens for o in expected]
    assert got[0].cached_tokens == 0 and got[1].cached_tokens == 0  # KV recomputed
    assert got[2].cached_tokens == expected[2].cached_tokens > 0  # KV from the checkpoint


async def test_checkpoints_rewrite_only_changed_sessions_and_drop_old_files(
        engines, store, tmp_path: Path) -> None:
    a, _ = engines
    sids = [f"inc-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
    _turn(a, sids, 1)
    checkpointer = Checkpointer(a, "n2", tmp_path, store, interval_s=60)
    first = await checkpointer.checkpoint_once()
    again = await checkpointer.checkpoint_once()
    assert {s: again.sessions[s] for s in sids} == {s: first.sessions[s] for s in sids}
    a.generate(_prompt(0, 2), GREEDY, session_ids=[sids[0]])
    third = await checkpointer.checkpoint_once()
    assert third.sessions[sids[0]].turns == 2 and third.sessions[sids[1]] == first.sessions[sids[1]]
    names = {p.name for p in Path(third.directory).iterdir()}
    assert first.sessions[sids[0]].history_file not in names
    assert third.sessions[sids[0]].history_file in names


async def test_a_deleted_session_leaves_the_checkpoint_before_the_delete_is_answered(
        engines, store, tmp_path: Path) -> None:
    """A session deleted between two rounds stayed in the checkpoint (its manifest entry and
    files) until the next: a node killed meanwhile, and restored from it, brought the deleted
    session back (a tester saw five come back)."""
    from ultrakv.node.server import LocalBackend

    a, b = engines
    sids = [f"del-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
    _turn(a, sids, 1)
    checkpointer = Checkpointer(a, "del", tmp_path, store, interval_s=3600)
    first = await checkpointer.checkpoint_once()
    assert set(sids) <= set(first.sessions)
    backend = LocalBackend(a)
    backend.on_session_deleted = checkpointer.forget  # as the node's cluster agent sets it
    await backend.delete_session(sids[0], None)
    recorded = await load_manifest(store, "del")
    assert sids[0] not in recorded.sessions and sids[1] in recorded.sessions
    names = {p.name for p in Path(recorded.directory).iterdir()}
    assert first.sessions[sids[0]].history_file not in names
    assert {s for s in restore_into(b, recorded).restored} & set(sids) == {sids[1]}
    with pytest.raises(SessionNotFoundError):
        await backend.delete_session(sids[0], None)  # gone from memory and checkpoint alike


async def test_replicas_are_checkpointed_and_restored_as_replicas(engines, store,
                                                                 tmp_path: Path) -> None:
    """Defect 2: a replica may be a session's only copy; the holder's checkpoint keeps it."""
    a, b = engines
    sid = f"rep-{uuid.uuid4().hex[:6]}"
    a.store_replica(sid, list(range(1, 40)), 2, "acme")
    try:
        manifest = await Checkpointer(a, "rep", tmp_path, store, interval_s=60).checkpoint_once()
        assert manifest.sessions[sid].replica and manifest.sessions[sid].turns == 2
        stored = await load_manifest(store, "rep")
        assert stored is not None and stored.sessions[sid].replica
        report = restore_into(b, stored, skip=set(stored.sessions) - {sid})
        assert report.replicas == [sid] and report.restored == []
        info = b.get_session(sid)
        assert (info.replica, info.turns, info.num_tokens) == (True, 2, 39)
        assert b.promote_replica(sid) and b.sessions.get(sid).salt == "acme"
    finally:  # the engines serve the module's other tests
        for engine in (a, b):
            engine.delete_session(sid)


async def test_a_sessions_last_turn_record_is_checkpointed_and_restored(engines, store,
                                                                         tmp_path: Path) -> None:
    """The record of a session's last turn (node/turn_ledger.py) goes into its history file
    and comes back with it, for the restoring node's ledger; a record of an older turn (the
    session moved on since) is not written."""
    a, b = engines
    sids = [f"lt-{uuid.uuid4().hex[:6]}-{i}" for i in range(2)]
    _turn(a, sids, 1)
    result = pb.GenerateResult(request_id="turn-1", session_id=sids[0], token_ids=[5, 6],
                               usage=pb.Usage(prompt_tokens=19, cached_tokens=0))
    ledger = TurnLedger()
    ledger.record(TurnRecord((sids[0], "turn-1", b"d" * 32), result, 1))
    ledger.record(TurnRecord((sids[1], "turn-0", b"e" * 32), result, 0))  # an older turn
    try:
        manifest = await Checkpointer(a, "lt", tmp_path, store, interval_s=60,
                                      ledger=ledger).checkpoint_once()
        directory = Path(manifest.directory)
        assert read_session(directory, manifest.sessions[sids[0]]).last_turn == LastTurn(
            result, b"d" * 32)
        assert read_session(directory, manifest.sessions[sids[1]]).last_turn is None
        report = restore_into(b, manifest, skip=set(manifest.sessions) - set(sids))
        assert [(s.session_id, s.turns, s.last_turn) for s in report.last_turns] == [
            (sids[0], 1, LastTurn(result, b"d" * 32))]
    finally:  # the engines serve the module's other tests
        for engine in (a, b):
            for sid in sids:
                with contextlib.suppress(SessionNotFoundError):
                    engine.delete_session(sid)


async def test_a_record_that_arrives_after_its_history_was_checkpointed_is_written_next_round(
        engines, store, tmp_path: Path) -> None:
    """A turn that lands while a round runs can be written without its record (the record
    reaches the ledger after the history): the next round writes the files again with it,
    though the session's turns and tokens did not change since; a round after that leaves
    them be."""
    a, _ = engines
    sid = f"late-{uuid.uuid4().hex[:6]}"
    _turn(a, [sid], 1)
    ledger = TurnLedger()
    result = pb.GenerateResult(request_id="turn-1", session_id=sid, token_ids=[5, 6],
                               usage=pb.Usage(prompt_tokens=19, cached_tokens=0))
    try:
        checkpointer = Checkpointer(a, "late", tmp_path, store, interval_s=60, ledger=ledger)
        first = await checkpointer.checkpoint_once()
        directory = Path(first.directory)
        assert read_session(directory, first.sessions[sid]).last_turn is None
        ledger.record(TurnRecord((sid, "turn-1", b"d" * 32), result, 1))
        second = await checkpointer.checkpoint_once()
        assert read_session(directory, second.sessions[sid]).last_turn == LastTurn(result, b"d" * 32)
        third = await checkpointer.checkpoint_once()
        assert third.sessions[sid] == second.sessions[sid]  # unchanged: not written again
    finally:
        with contextlib.suppress(SessionNotFoundError):
            a.delete_session(sid)


# The node waits --etcd-wait seconds (20 by default) for etcd; 1 here: the message is the point.
@pytest.mark.parametrize("command", [["node", "--model", "tiny", "--device", "cpu", "--port", "0",
                                      "--etcd-wait", "1"],
                                     ["coordinator", "--port", "0", "--http-port", "0"]])
def test_unreachable_etcd_at_start_is_a_clear_error_naming_the_endpoint(command) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    # It gives up rather than waiting for etcd forever (the timeout bounds it; no tighter
    # bound: a loaded machine takes tens of seconds just to import the node).
    out = subprocess.run([sys.executable, "-m", "ultrakv.client.cli", *command,
                          "--etcd", endpoint, "--insecure-no-cluster-secret"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 2
    assert f"cannot reach etcd at {endpoint}" in out.stderr
    assert "Traceback" not in out.stderr


async def test_a_round_writes_only_the_changed_sessions_entries(engines, store,
                                                              tmp_path: Path) -> None:
    a, _ = engines
    sids = [f"delta-{uuid.uuid4().hex[:6]}-{i}" for i in range(3)]
    _turn(a, sids, 1)
    checkpointer = Checkpointer(a, "n3", tmp_path, store, interval_s=60)
    await checkpointer.checkpoint_once()
    kvs, _ = await store.get_prefix("checkpoints/n3/")
    before = {kv.key: kv.mod_revision for kv in kvs}
    assert {k.rsplit("/", 1)[1] for k in before} >= set(sids)
    a.generate(_prompt(0, 2), GREEDY, session_ids=[sids[0]])
    a.delete_session(sids[2])
    await checkpointer.checkpoint_once()
    kvs, _ = await store.get_prefix("checkpoints/n3/")
    after = {kv.key: kv.mod_revision for kv in kvs}
    key = "checkpoints/n3/"
    assert after[key + sids[0]] > before[key + sids[0]]  # rewritten: it took a turn
    assert after[key + sids[1]] == before[key + sids[1]]  # untouched
    assert key + sids[2] not in after  # gone with its session
    recorded = await load_manifest(store, "n3")
    assert recorded is not None and recorded.sessions == checkpointer.manifest.sessions


def test_the_longest_tenant_session_key_is_checkpointed(tmp_path: Path) -> None:
    """A tenant's session key runs to 257 bytes, past a file name's 255: its files are named
    by its digest, and read back by the manifest's entry like any other."""
    key = "t" * 128 + "~" + "s" * 128
    entry = write_session_files(tmp_path, SessionRecord(key, [1, 2, 3], 1, "t" * 128, "m"))
    assert entry.session_id == key and len(entry.history_file) < 255
    state = read_session(tmp_path, entry)
    assert state is not None and (state.session_id, state.token_ids) == (key, [1, 2, 3])
    short = write_session_files(tmp_path, SessionRecord("acme~s", [1], 1, "acme", "m"))
    assert short.history_file.startswith("acme~s.")  # a short key names its files as it is


def test_over_budget_the_coldest_sessions_lose_kv_first_then_their_place() -> None:
    entries = {s: CheckpointEntry(s, 1, 20, f"{s}.h", "x", f"{s}.kv", "y", 16) for s in "abc"}
    sizes = {"a": (10, 100), "b": (10, 100), "c": (10, 100)}
    coldest_first = ["a", "b", "c"]
    assert fit_budget(entries, sizes, coldest_first, 330) == entries
    fitted = fit_budget(entries, sizes, coldest_first, 230)
    assert not fitted["a"].kv_file and fitted["b"].kv_file and fitted["c"].kv_file
    fitted = fit_budget(entries, sizes, coldest_first, 25)
    assert list(fitted) == ["b", "c"] and not fitted["b"].kv_file and not fitted["c"].kv_file


async def test_checkpoint_dir_stays_within_its_budget(engines, store, tmp_path: Path) -> None:
    a, _ = engines
    sids = [f"budget-{uuid.uuid4().hex[:6]}-{i}" for i in range(4)]
    for sid in sids:  # one at a time: sids[-1] is the most recently used
        _turn(a, [sid], 1)
    full = await Checkpointer(a, "n4", tmp_path / "full", store, interval_s=60).checkpoint_once()
    kv_bytes = (Path(full.directory) / full.sessions[sids[0]].kv_file).stat().st_size
    total = sum(p.stat().st_size for p in Path(full.directory).iterdir())
    budget = total - kv_bytes  # one KV file too many
    checkpointer = Checkpointer(a, "n5", tmp_path / "tight", store, interval_s=60,
                                max_bytes=budget)
    manifest = await checkpointer.checkpoint_once()
    files = list(Path(manifest.directory).iterdir())
    assert sum(p.stat().st_size for p in files) <= budget
    # the engine holds the other tests' sessions too: all of them compete for the budget
    by_age = [i.session_id for i in sorted(a.list_sessions(), key=lambda i: i.last_used_at)]
    with_kv = [manifest.sessions[s].kv_file != "" for s in by_age]
    assert not with_kv[0] and with_kv[-1] and by_age[-1] == sids[-1]
    assert with_kv == sorted(with_kv)  # every session stripped is colder than every one kept
    state = read_session(Path(manifest.directory), manifest.sessions[by_age[0]])
    assert state is not None and state.kv is None and len(state.token_ids) > 0


async def test_manifest_writes_compact_etcd_history(etcd, tmp_path: Path) -> None:
    from ultrakv.cluster.store import EtcdStore, StoreError

    async with EtcdStore(etcd.endpoint, prefix=f"/c-{uuid.uuid4().hex[:6]}/") as s:
        old = None
        for round_ in range(30):  # 30 rounds of 20 changed entries: 600 revisions
            new = Manifest("n6", str(tmp_path), sessions={
                f"s{i}": CheckpointEntry(f"s{i}", round_, round_, f"f{round_}", "x")
                for i in range(20)})
            await write_manifest(s, old, new)
            old = new
        head = await s.current_revision()
        await compact_history(s, keep_revisions=100)
        with pytest.raises(StoreError):  # already compacted up to head - 100
            await s.compact(head - 150)
        recorded = await load_manifest(s, "n6")
        assert recorded is not None and recorded.sessions == old.sessions


async def test_the_ttl_sweep_evicts_idle_sessions_replicas_turn_records_and_entries(
        etcd, store, tmp_path: Path) -> None:
    """Growth bound: a node's sweep drops sessions and replicas idle past ``session_ttl_s``,
    their turn records, and (the next checkpoint round) their manifest entries; a session in
    use stays. Fails if the sweep does not run or leaves any of them behind."""
    import asyncio
    import time

    from ultrakv.node.agent import AgentSettings, NodeAgent
    from ultrakv.node.server import NodeServer, ServerSettings
    from ultrakv.v1 import types_pb2 as pb

    ttl = 6.0  # long enough for a loaded machine to checkpoint the idle ones first
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=64, session_ttl_s=ttl))
    server = NodeServer(engine, ServerSettings(host="127.0.0.1", port=0, node_id="ttl"))
    agent = None

    async def turn(sid: str, request_id: str) -> None:
        request = pb.GenerateRequest(
            session_id=sid, request_id=request_id, token_ids=pb.TokenIds(ids=_prompt(1, 1)),
            priority=pb.PRIORITY_NORMAL,
            sampling=pb.SamplingOptions(max_length=2, temperature=0.0, ignore_eos=True))
        events = [e async for e in server.backend.generate(request, None)]
        assert isinstance(events[-1], pb.GenerateResult) and not events[-1].error

    async def until(what: str, check) -> None:
        deadline = time.monotonic() + 60  # generous: a loaded machine
        while not await check():
            assert time.monotonic() < deadline, f"not within 60 s: {what}"
            await turn("kept", f"k-{time.monotonic()}")  # in use all along: never idle
            await asyncio.sleep(0.2)

    try:
        await server.start()
        agent = NodeAgent(engine, server, AgentSettings(
            etcd=etcd.endpoint, prefix=store.prefix, checkpoint_dir=str(tmp_path),
            checkpoint_interval_s=0.3))
        await agent.start()
        await turn("idle", "r-1")
        engine.store_replica("idle-replica", list(range(1, 30)), 2)

        async def checkpointed() -> bool:
            manifest = await load_manifest(store, "ttl")
            return manifest is not None and {"idle", "idle-replica", "kept"} <= set(manifest.sessions)

        await until("every session in a checkpoint", checkpointed)
        assert len(server.backend.ledger) == 2  # "idle" and "kept" have a turn record each

        async def swept() -> bool:
            manifest = await load_manifest(store, "ttl")
            held = {i.session_id for i in engine.list_sessions()}
            return (held == {"kept"} and len(server.backend.ledger) == 1
                    and manifest is not None and set(manifest.sessions) == {"kept"})

        await until("idle sessions, replicas, turn records and entries swept", swept)
    finally:
        if agent is not None:
            await agent.stop()
        await server.stop()
        engine.shutdown()


def test_a_chat_sessions_messages_travel_with_it(engines, tmp_path: Path) -> None:
    """Move (the transfer format), checkpoint (its files) and merge with a replica keep a
    chat session's messages with its history; an imported session and a replica continue
    the conversation from them."""
    from ultrakv.cluster.checkpoint import merge_with_history, write_session
    from ultrakv.cluster.session_transfer import chunks_to_state, state_to_chunks

    a, b = engines
    sid = f"chat-{uuid.uuid4().hex[:6]}"
    question = [{"role": "user", "content": "Hi?"}]
    a.generate(question, GREEDY, session_ids=[sid])
    try:
        state = a.export_session(sid)
        assert state.messages[0] == ("user", "Hi?") and state.messages[1][0] == "assistant"
        moved = chunks_to_state(state_to_chunks(state))
        assert moved.messages == state.messages
        entry = write_session(tmp_path, state)
        assert read_session(tmp_path, entry).messages == state.messages
        merged = merge_with_history(sid, None, state.token_ids, state.turns,
                                    state.model_fingerprint, state.messages)
        assert merged.messages == state.messages
        b.import_session(moved)
        assert [(m.role, m.content) for m in b.sessions.get(sid).messages] == state.messages
        b.delete_session(sid)
        b.store_replica(sid, state.token_ids, state.turns, "", state.messages)
        assert b.promote_replica(sid)
        assert [(m.role, m.content) for m in b.sessions.get(sid).messages] == state.messages
    finally:
        for engine in (a, b):
            with contextlib.suppress(SessionNotFoundError):
                engine.delete_session(sid)
