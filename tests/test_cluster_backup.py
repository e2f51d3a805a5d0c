"""Backup -> clear everything -> restore, against real clusters (etcd, a coordinator and node
processes; CPU, tiny).

The first cluster (one node) serves two tenants' sessions for two turns and is backed up; a
third turn is recorded as the truth. Then it is stopped and its data directory (etcd's data,
the checkpoints) deleted. A fresh cluster of two nodes gets the backup (each session on its
owner there): a tenant key is refused, the admin key restores it, tenants stay apart, every
history is what was backed up, and the third turn hits the restored KV and gives the
recorded tokens.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
from ultrakv.client import Client
from ultrakv.client.backup import MANIFEST, MANIFEST_SHA256, BackupError, opened, verify
from ultrakv.client.backup_jobs import create, restore
from ultrakv.client.client import RequestError, RetryPolicy
from ultrakv.client.local_cluster import ClusterSpec, LocalCluster
from ultrakv.cluster.checkpoint import SessionRecord
from ultrakv.cluster.security.keys import create_key
from ultrakv.cluster.store import EtcdStore
from ultrakv.coordinator.dynamic_config import read_overrides, set_overrides

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

SESSIONS = {"acme": [f"acme-room-{i}" for i in range(4)], "globex": ["globex-room-0", "globex-room-1"]}


def _spec(data: Path, keys_file: Path, nodes: int) -> ClusterSpec:
    return ClusterSpec(nodes=nodes, coordinators=1, data_dir=data, port=0, device="cpu",
                       num_blocks=512, lease_ttl_s=2, checkpoint_interval_s=1.0,
                       log_dir=data / "logs", coordinator_args=["--keys-file", str(keys_file)])


def _client(cluster: LocalCluster, key: str) -> Client:
    return Client(cluster.address, api_key=key, timeout=120, retry=RetryPolicy(attempts=3))


def _turn(client: Client, sid: str, turn: int) -> dict:
    prompt = [(len(sid) * 7 + turn * 13 + i) % 250 + 1 for i in range(21)]
    r = client.process_request({"token_ids": prompt, "session_id": sid, "max_length": 6,
                                "temperature": 0.0, "ignore_eos": True})
    assert r["success"], r
    return r


def _histories(path: Path) -> dict[str, SessionRecord]:
    manifest = verify(path)
    with opened(path) as d:
        return {e.session_id: SessionRecord.from_json((d / "sessions" / e.history_file).read_bytes())
                for e in manifest.sessions}


def test_backup_clear_everything_restore_continues_with_hits(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.jsonl"
    keys = {t: create_key(keys_file, t, "user")[0] for t in SESSIONS}
    admin = create_key(keys_file, "ops", "admin")[0]
    backups = tmp_path / "backups"
    first = tmp_path / "first"
    third_turn: dict[str, list[int]] = {}
    with LocalCluster(_spec(first, keys_file, 1)) as cluster:
        for tenant, sids in SESSIONS.items():
            with _client(cluster, keys[tenant]) as c:
                for turn in (1, 2):
                    for sid in sids:
                        _turn(c, sid, turn)
        async def set_config() -> None:
            async with EtcdStore(cluster.etcd_endpoint, timeout_s=30) as store:
                await set_overrides(store, {"load_eps": 0.5})

        asyncio.run(set_config())
        with _client(cluster, keys["acme"]) as c, pytest.raises(BackupError) as err:
            create(c, backups)
        assert "PERMISSION_DENIED" in str(err.value) and "admin" in str(err.value)
        with _client(cluster, admin) as c:
            made = create(c, backups, compress="zstd", keep=3)
        assert made.manifest.counts["sessions"] == 6 and made.manifest.counts["tenants"] == 2
        assert made.manifest.counts["kv_tokens"] > 0
        for tenant, sids in SESSIONS.items():  # the truth: turn 3 without any restore
            with _client(cluster, keys[tenant]) as c:
                for sid in sids:
                    third_turn[sid] = _turn(c, sid, 3)["response"]["token_ids"]
    saved = _histories(made.path)
    assert {s: (r.turns, r.tenant) for s, r in saved.items()} == {  # each by its tenant's key
        f"{t}~{s}": (2, t) for t, sids in SESSIONS.items() for s in sids}

    shutil.rmtree(first)  # everything: etcd's data, checkpoints, the cluster secret

    with LocalCluster(_spec(tmp_path / "second", keys_file, 2)) as cluster:
        # Restored sessions go to their owners on the coordinator's ring: with one node on it
        # yet, they would move when the second joins (and compute turn 3 after the move).
        cluster.wait_ready(2, api_key=admin)
        with _client(cluster, keys["globex"]) as c, pytest.raises(BackupError) as err:
            restore(c, made.path)
        assert "PERMISSION_DENIED" in str(err.value) and made.path.name in str(err.value)
        with _client(cluster, admin) as c:
            with pytest.raises(RequestError) as missing:
                c.get_session("acme~acme-room-0")
            assert missing.value.code == "NOT_FOUND"  # the refused restore wrote nothing
            done = restore(c, made.path, etcd=cluster.etcd_endpoint)
            assert (done.sessions, done.num_tokens) == (6, sum(len(r.token_ids) for r in saved.values()))
            assert done.kv_tokens == made.manifest.counts["kv_tokens"]
            again = create(c, tmp_path / "again")  # a directory this time
        assert {n["node_id"] for n in again.manifest.nodes} == {"node-1", "node-2"}
        async def config() -> dict:
            async with EtcdStore(cluster.etcd_endpoint, timeout_s=30) as store:
                return (await read_overrides(store))[0]

        assert asyncio.run(config()) == {"load_eps": 0.5}  # the live config came back too
        restored = _histories(again.path)
        assert {s: (r.token_ids, r.turns, r.tenant) for s, r in restored.items()} == {
            s: (r.token_ids, r.turns, r.tenant) for s, r in saved.items()}

        with _client(cluster, keys["globex"]) as c, pytest.raises(RequestError) as other:
            c.get_session("acme-room-0")  # tenants stay apart after a restore
        assert other.value.code == "NOT_FOUND"
        for tenant, sids in SESSIONS.items():
            with _client(cluster, keys[tenant]) as c:
                for sid in sids:
                    r = _turn(c, sid, 3)
                    assert r["cached_tokens"] > 0, (sid, r)
                    assert r["response"]["token_ids"] == third_turn[sid], sid
                    assert c.get_session(sid)["turns"] == 3
        # Restored again, the backup (2 turns) keeps the sessions' third turn (it rolled them
        # back, silently losing turns clients had).
        with _client(cluster, admin) as c:
            rerun = restore(c, made.path, etcd=cluster.etcd_endpoint)
            assert (rerun.sessions, rerun.skipped) == (0, 6)
            assert all(c.get_session(f"{t}~{s}")["turns"] == 3 for t, sids in SESSIONS.items() for s in sids)

        # A backup of another model is refused by name, before any of it is imported.
        doctored = again.path
        manifest = json.loads((doctored / MANIFEST).read_text())
        entry = manifest["sessions"][0]
        history = doctored / "sessions" / entry["history_file"]
        record = json.loads(history.read_text())
        record["model_fingerprint"] = "another-model"
        history.write_text(json.dumps(record))
        import hashlib

        digest = hashlib.sha256(history.read_bytes()).hexdigest()
        manifest["files"]["sessions/" + entry["history_file"]] = {
            "sha256": digest, "bytes": history.stat().st_size}
        entry["history_sha256"] = digest
        raw = json.dumps(manifest).encode()
        (doctored / MANIFEST).write_bytes(raw)
        (doctored / MANIFEST_SHA256).write_text(hashlib.sha256(raw).hexdigest())
        with _client(cluster, admin) as c, pytest.raises(BackupError) as wrong:
            restore(c, doctored)
        text = str(wrong.value)
        assert doctored.name in text and "FAILED_PRECONDITION" in text
        assert "another-model" in text and entry["session_id"] in text


CHAINS = 3  # client threads, each alternating turns over its own two sessions
IDLE = 12  # sessions between a chain's two in the backup's order (ids sort a-*, m-*, z-*)


def _history_turn(client: Client, sid: str, turn: int, history: list[int]) -> list[int]:
    prompt = [(sum(map(ord, sid)) + turn * 13 + i) % 250 + 1 for i in range(8)]
    r = client.process_request({"token_ids": prompt, "session_id": sid, "max_length": 2,
                                "temperature": 0.0, "ignore_eos": True})
    assert r["success"], r
    return history + prompt + list(r["response"]["token_ids"])


def test_backup_is_one_point_in_time_while_clients_run_turns(tmp_path: Path) -> None:
    """Each client runs turns on a-k, z-k, a-k, z-k, ..., each turn sent once the previous
    one was answered, while backups run. Whatever moment a backup stands for, it holds a
    prefix of that order: z-k has the turns of a-k or one fewer. Taken session by session
    (a-* first, then twelve idle sessions, then z-*), z-k is read so much later that it
    has turns a-k lacks. Every session must also be exactly its history after the turns
    the backup says it has, hold every turn answered before the backup began and none sent
    after it ended."""
    spec = ClusterSpec(nodes=2, coordinators=1, data_dir=tmp_path / "data", port=0,
                       device="cpu", num_blocks=512, lease_ttl_s=2, log_dir=tmp_path / "logs")
    chains = [(f"a-{k}", f"z-{k}") for k in range(CHAINS)]
    histories: dict[str, list[list[int]]] = {sid: [[]] for chain in chains for sid in chain}
    answered: dict[str, list[float]] = {sid: [] for sid in histories}  # monotonic, per turn
    sent: dict[str, list[float]] = {sid: [] for sid in histories}
    stop = threading.Event()
    failures: list[BaseException] = []

    def run_chain(cluster: LocalCluster, chain: tuple[str, str]) -> None:
        try:
            with Client(cluster.address, timeout=120, retry=RetryPolicy(attempts=3)) as c:
                while not stop.is_set():
                    for sid in chain:
                        sent[sid].append(time.monotonic())
                        turn = len(histories[sid])
                        histories[sid].append(_history_turn(c, sid, turn, histories[sid][-1]))
                        answered[sid].append(time.monotonic())
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)

    backups = []
    with LocalCluster(spec) as cluster:
        with Client(cluster.address, timeout=120) as c:
            for i in range(IDLE):  # a long history each: every export takes a while
                history: list[int] = []
                for turn in (1, 2):
                    history = _history_turn(c, f"m-{i:02d}", turn, history)
        threads = [threading.Thread(target=run_chain, args=(cluster, chain), daemon=True)
                   for chain in chains]
        for t in threads:
            t.start()
        try:
            deadline = time.monotonic() + 120
            while min(len(a) for a in answered.values()) < 2 and not failures:
                assert time.monotonic() < deadline, "the clients made no progress"
                time.sleep(0.05)
            with Client(cluster.address, timeout=120) as c:
                for i in range(2):
                    began = time.monotonic()
                    made = create(c, tmp_path / f"backups-{i}")
                    backups.append((began, time.monotonic(), made))
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=120)
    assert not failures, failures
    for began, ended, made in backups:
        cut = made.manifest.cut
        assert cut is not None and cut["cut_id"] and cut["attempts"] >= 1
        assert cut["etcd_revision"] > 0 and 0 <= cut["hold_s"] < 10
        saved = _histories(made.path)
        assert cut["turns"] == {sid: r.turns for sid, r in saved.items()}
        for sid, record in saved.items():
            if sid in histories:  # exactly its history after the turns it has
                assert record.token_ids == histories[sid][record.turns], sid
        for first, second in chains:
            turns = {sid: saved[sid].turns if sid in saved else 0 for sid in (first, second)}
            assert turns[first] - 1 <= turns[second] <= turns[first], (made.path.name, turns)
            for sid, n in turns.items():
                assert n >= sum(1 for t in answered[sid] if t < began), (sid, n)
                assert n <= sum(1 for t in sent[sid] if t < ended), (sid, n)
