"""Backups on disk (client/backup.py): written from an ExportSessions stream, verified file by
file, read back as the same chunk runs; corruption, truncation, newer formats and missing
paths are errors that name the file; retention keeps exactly ``keep``."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from ultrakv.client import Client
from ultrakv.client.backup import (
    MANIFEST,
    BackupError,
    BackupSettings,
    backup_name,
    backups_in,
    expired,
    list_backups,
    manifest_summary,
    opened,
    prune,
    save_backup,
    session_chunks,
    unpack,
    verify,
)
from ultrakv.client.backup_jobs import Created, create, restore, run_schedule
from ultrakv.client.cli import main as cli_main
from ultrakv.cluster.security.keys import create_key
from ultrakv.cluster.security.settings import SecuritySettings
from ultrakv.cluster.session_state import LastTurn, SessionState
from ultrakv.cluster.session_transfer import chunks_to_state, state_to_chunks
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.server import BackgroundServer, ServerSettings
from ultrakv.v1 import types_pb2 as pb
from ultrakv.v1 import ultrakv_pb2


def _states() -> list[SessionState]:
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 2, 16, 2, 8, generator=g)  # [layers, k/v, tokens, kv heads, head dim]
    last = LastTurn(pb.GenerateResult(request_id="turn-2", session_id="acme-1", token_ids=[20, 21], text="ok",
                                      usage=pb.Usage(prompt_tokens=9, completion_tokens=2, cached_tokens=8)),
                    bytes(range(32)))
    return [SessionState("acme-1", list(range(1, 22)), 2, "fp-a", 16, kv, tenant="acme", last_turn=last),
            SessionState("globex-1", [5, 6, 7], 1, "fp-a", tenant="globex",
                         messages=[("user", "Bonjour"), ("assistant", "Salut !")])]


def _stream(states: list[SessionState]) -> list[ultrakv_pb2.BackupPart]:
    parts = [ultrakv_pb2.BackupPart(header=ultrakv_pb2.BackupHeader(
        nodes=[ultrakv_pb2.BackupNode(node_id="n1", model="tiny", model_fingerprint="fp-a")],
        num_sessions=len(states), config_json='{"load_eps": 0.5}',
        checkpoints_json="{}"))]
    for s in states:
        parts += [ultrakv_pb2.BackupPart(session=c) for c in state_to_chunks(s, chunk_bytes=700)]
    return parts


def _runs(chunks) -> list[SessionState]:
    runs, run = [], []
    for c in chunks:
        run.append(c)
        if c.WhichOneof("part") == "trailer":
            runs.append(chunks_to_state(run))
            run = []
    return runs


@pytest.mark.parametrize("compress", ["none", "zstd"])
def test_a_backup_reads_back_the_sessions_it_was_given(tmp_path: Path, compress: str) -> None:
    path, manifest = save_backup(_stream(_states()), tmp_path / "b", compress)
    assert path.name.endswith(".tar.zst") == (compress == "zstd")
    assert manifest.counts["sessions"] == 2 and manifest.counts["kv_tokens"] == 16
    assert manifest.counts["tenants"] == 2 and manifest.model_fingerprint == "fp-a"
    checked = verify(path)
    with opened(path) as directory:
        assert json.loads((directory / "config.json").read_text()) == {"load_eps": 0.5}
        back = _runs(session_chunks(directory, checked))
    for got, want in zip(back, _states(), strict=True):
        assert (got.session_id, got.token_ids, got.turns, got.tenant, got.kv_tokens,
                got.messages) == (want.session_id, want.token_ids, want.turns, want.tenant,
                                  want.kv_tokens, want.messages)  # a chat keeps its messages
        assert got.last_turn == want.last_turn  # a retry of its last turn is answered, not rerun
        assert (got.kv is None) == (want.kv is None)
        if want.kv is not None:
            assert torch.equal(got.kv, want.kv)  # bit-exact
    assert [b.path for b in list_backups(tmp_path / "b")] == [path]
    assert list_backups(tmp_path / "b")[0].manifest.counts == manifest.counts
    assert not [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".tmp")]
    # Conversations in plain text: every file the owner's only (an archive was 0644).
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    assert files and all(f.stat().st_mode & 0o077 == 0 for f in files), [oct(f.stat().st_mode) for f in files]


def test_an_output_file_named_tar_is_an_uncompressed_tar() -> None:
    # `--output FILE.tar` failed: the default compression (zstd) wanted .tar.zst.
    from ultrakv.client.cli import _backup_compression

    assert _backup_compression("one.tar", "zstd") == "none"
    assert _backup_compression("one.tar.zst", "zstd") == "zstd"
    assert _backup_compression(None, "zstd") == "zstd"


def test_verify_names_a_flipped_byte_and_a_truncated_file(tmp_path: Path) -> None:
    path, manifest = save_backup(_stream(_states()), tmp_path, "none")
    kv = path / "sessions" / manifest.sessions[0].kv_file
    data = bytearray(kv.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    kv.write_bytes(bytes(data))
    history = path / "sessions" / manifest.sessions[1].history_file
    history.write_bytes(history.read_bytes()[:-5])
    with pytest.raises(BackupError) as err:
        verify(path)
    text = str(err.value)
    assert f"{kv.name}: sha256 mismatch (corrupted)" in text
    assert f"{history.name}: truncated" in text
    assert "2 problem(s)" in text
    assert cli_main(["backup", "verify", str(path)]) == 2  # the CLI exits non-zero


def test_a_damaged_or_truncated_archive_is_named(tmp_path: Path) -> None:
    path, _ = save_backup(_stream(_states()), tmp_path, "zstd")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BackupError, match=f"{path.name}: the archive is truncated or corrupted"):
        verify(path)
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(BackupError, match=path.name):
        verify(path)


def test_bad_paths_and_manifests_give_errors_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="nothere: no such backup"):
        verify(tmp_path / "nothere")
    path, _ = save_backup(_stream(_states()), tmp_path, "none")
    manifest = path / MANIFEST
    doc = json.loads(manifest.read_text())
    doc["format_version"] = 99
    manifest.write_text(json.dumps(doc))
    with pytest.raises(BackupError, match=r"manifest.json: backup format version 99 is newer"):
        verify(path)
    doc["format_version"] = 1
    doc["counts"]["sessions"] = 7  # the manifest itself is checksummed
    manifest.write_text(json.dumps(doc))
    with pytest.raises(BackupError, match=r"manifest.json: sha256 mismatch"):
        verify(path)
    manifest.unlink()
    with pytest.raises(BackupError, match=r"manifest.json: missing: not an ultrakv backup"):
        verify(path)
    with pytest.raises(BackupError, match=r"--compress zstd writes a .tar.zst file"):
        save_backup(_stream(_states()), tmp_path / "x.tar", "zstd")


def test_a_stream_that_breaks_off_leaves_no_backup(tmp_path: Path) -> None:
    parts = _stream(_states())[:-1]  # the last session's trailer never came
    with pytest.raises(BackupError, match="ended inside a session"):
        save_backup(parts, tmp_path, "none")
    assert list(tmp_path.iterdir()) == []


def test_retention_keeps_exactly_the_newest_keep(tmp_path: Path) -> None:
    now = time.time()
    names = [backup_name(now + i) for i in range(5)]
    assert expired(names, 2) == names[:3] and expired(names, 9) == []
    with pytest.raises(ValueError, match="keep must be >= 1"):
        expired(names, 0)
    for i, name in enumerate(names):
        if i % 2:
            (tmp_path / f"{name}.tar.zst").write_bytes(b"")
        else:
            (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("not a backup: never deleted")
    gone = prune(tmp_path, 2)
    assert sorted(p.name.removesuffix(".tar.zst") for p in gone) == names[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["notes.txt", names[3] + ".tar.zst", names[4]])


def test_unpack_copies_a_verified_archive_out(tmp_path: Path) -> None:
    path, manifest = save_backup(_stream(_states()), tmp_path / "b", "zstd")
    out = unpack(path, tmp_path / "out")
    assert verify(out).files == manifest.files
    assert os.stat(out / MANIFEST).st_size > 0


def _turn(client: Client, sid: str, turn: int) -> dict:
    r = client.process_request({"token_ids": [(turn * 11 + i) % 200 + 1 for i in range(21)],
                                "session_id": sid, "max_length": 4, "temperature": 0.0,
                                "ignore_eos": True})
    assert r["success"], r
    return r


def test_a_node_serving_alone_backs_up_on_a_schedule_and_restores(tmp_path: Path) -> None:
    """The schedule loop against a real server with API keys (a node serving the client API
    itself): a tenant key may neither back up nor restore; a signed admin key does;
    retention leaves exactly ``keep`` backups, the newest; the last one restores into a
    fresh node whose next turn hits the restored KV and equals the original's."""
    keys_file = tmp_path / "keys.jsonl"
    user = create_key(keys_file, "acme")[0]
    admin, record = create_key(keys_file, "ops", "admin", signing=True)
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.2,
                              security=SecuritySettings(keys_file=str(keys_file)))
    config = EngineConfig(model="tiny", device="cpu", num_blocks=64)
    original, fresh = Engine(config), Engine(config)
    quantized = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=64, kv_cache_dtype="int8"))

    def as_admin(address: str) -> Client:
        return Client(address, api_key=admin, signing_secret=record.signing_secret)

    try:
        with BackgroundServer(original, settings) as srv, Client(srv.address, api_key=user) as c:
            for sid in ("s-1", "s-2"):
                _turn(c, sid, 1)
                _turn(c, sid, 2)
            with pytest.raises(BackupError, match="PERMISSION_DENIED.*needs an admin key"):
                create(c, tmp_path / "b")
            rounds: list[Created | None] = []
            stop = threading.Event()

            def on_round(done: Created | None) -> None:
                rounds.append(done)
                if len(rounds) == 4:
                    stop.set()

            schedule = BackupSettings(dir=str(tmp_path / "b"), schedule_s=0.01, keep=2)
            run_schedule(lambda: as_admin(srv.address), schedule, stop, on_round=on_round)
            assert all(r is not None for r in rounds)
            assert [p.name for p in backups_in(tmp_path / "b")] == [r.path.name for r in rounds[-2:]]
            last = rounds[-1]
            assert last.manifest.counts["sessions"] == 2 and last.manifest.counts["kv_tokens"] > 0
            # One snapshot of the node; an admin's backup names sessions by their tenant's key.
            assert last.manifest.cut["turns"] == {"acme~s-1": 2, "acme~s-2": 2}
            assert last.manifest.cut["taken_at"] <= last.manifest.created_at
            assert manifest_summary(last.manifest)["cut_at"] == last.manifest.cut["taken_at_utc"]
            truth = {sid: _turn(c, sid, 3)["response"]["token_ids"] for sid in ("s-1", "s-2")}
        with BackgroundServer(fresh, settings) as srv, Client(srv.address, api_key=user) as c:
            with pytest.raises(BackupError, match="PERMISSION_DENIED"):
                restore(c, last.path)
            with as_admin(srv.address) as a:
                done = restore(a, last.path)
            assert (done.sessions, done.kv_tokens) == (2, last.manifest.counts["kv_tokens"])
            for sid, tokens in truth.items():
                r = _turn(c, sid, 3)
                assert r["cached_tokens"] > 0 and r["response"]["token_ids"] == tokens
            # Restored again, the backup (2 turns) must not roll back the sessions' third turn:
            # it silently did, losing a turn its client had.
            with as_admin(srv.address) as a:
                again = restore(a, last.path)
                assert (again.sessions, again.skipped) == (0, 2)
                assert [a.get_session(f"acme~{sid}")["turns"] for sid in truth] == [3, 3]
        # Into a node whose KV cache is int8: the float KV is left out, the history comes in
        # (it was refused whole, naming kv_dtype) and the next turn recomputes the KV.
        with BackgroundServer(quantized, settings) as srv, as_admin(srv.address) as a:
            done = restore(a, last.path)
            assert (done.sessions, done.kv_tokens) == (2, 0)
            assert a.get_session("acme~s-1")["turns"] == 2
    finally:
        original.shutdown()
        fresh.shutdown()
        quantized.shutdown()


def test_a_backup_takes_the_owners_copy_else_the_newest_never_a_replica() -> None:
    from ultrakv.coordinator.session_backup import pick_copies
    from ultrakv.v1 import types_pb2 as pb

    listed = {
        "n1": [pb.SessionInfo(session_id="a", turns=3), pb.SessionInfo(session_id="b", turns=5),
               pb.SessionInfo(session_id="c", turns=9, replica=True)],
        "n2": [pb.SessionInfo(session_id="a", turns=4), pb.SessionInfo(session_id="b", turns=2)],
    }
    owners = {"a": "n1", "b": "n2", "c": "n2"}
    # a: the copy with the most turns wins over the owner's stale one (re-sharding's rule);
    # b: equal turns would pick the owner's, here n1 has more; c: only a replica exists,
    # which a backup leaves out.
    assert pick_copies(listed, owners.get) == {"a": "n2", "b": "n1"}
    listed["n2"][1] = pb.SessionInfo(session_id="b", turns=5)
    assert pick_copies(listed, owners.get) == {"a": "n2", "b": "n2"}  # a tie: the owner's


async def test_a_member_that_does_not_answer_fails_the_backup(etcd) -> None:
    """A backup that would miss a member's sessions fails naming it (and then retention,
    which runs only after a backup succeeded, keeps the older complete backups)."""
    import uuid

    import grpc
    from ultrakv.cluster.etcd_server import free_port
    from ultrakv.cluster.membership import NODES_PREFIX, NodeRecord, NodeState
    from ultrakv.cluster.store import EtcdStore
    from ultrakv.coordinator.health import Health, HealthPolicy
    from ultrakv.coordinator.server import CoordinatorServer, CoordinatorSettings
    from ultrakv.v1 import ultrakv_pb2_grpc

    prefix = f"/bk-{uuid.uuid4().hex[:8]}/"
    async with EtcdStore(etcd.endpoint, prefix=prefix) as store:
        record = NodeRecord(id="gone", address=f"127.0.0.1:{free_port()}", pid=1,
                            state=NodeState.SERVING)  # registered, nothing listens there
        await store.put(NODES_PREFIX + "gone", record.to_json())
    server = CoordinatorServer(CoordinatorSettings(
        etcd=etcd.endpoint, prefix=prefix, host="127.0.0.1", port=0, grace_period_s=0.2,
        health=HealthPolicy(interval_s=0.1, timeout_s=0.1, down_after=1)))
    await server.start()
    try:
        deadline = time.monotonic() + 60
        while server.backend.health.status("gone") is not Health.DOWN:  # off the ring now
            assert time.monotonic() < deadline, "the health loop never marked the node DOWN"
            await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = ultrakv_pb2_grpc.UltraKVStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.ExportSessions(ultrakv_pb2.ExportSessionsRequest(), timeout=60):
                    pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "node gone did not answer" in err.value.details()
    finally:
        await server.stop()
