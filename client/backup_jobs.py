"""Backup jobs against a running cluster: create (with retention), restore, and the
schedule loop of ``ultrakv backup schedule``.

The schedule is a loop in a process of its own, not a coordinator task: coordinators are
stateless and run several at once (each would back up, or they would need an election), and
they have no volume to keep backups on. On Kubernetes the chart's CronJob runs
``ultrakv backup create --keep N`` instead: the scheduler, retries and job history are
Kubernetes', and nothing runs between backups.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ultrakv.client.backup import (
    BackupError,
    BackupManifest,
    BackupSettings,
    opened,
    output_kind,
    prune,
    save_backup,
    session_chunks,
    verify,
)
from ultrakv.client.client import Client, RequestError
from ultrakv.cluster.store import EtcdStore
from ultrakv.coordinator.dynamic_config import ConfigError, parse_overrides, set_overrides
from ultrakv.v1 import ultrakv_pb2

log = logging.getLogger("ultrakv.client.backup")


@dataclass
class Created:
    """What :func:`create` did."""

    path: Path
    manifest: BackupManifest
    pruned: list[Path] = field(default_factory=list)


def create(client: Client, output: Path, compress: str = "none", history_only: bool = False,
           keep: int | None = None, timeout: float | None = None) -> Created:
    """Back the cluster up into ``output`` (a folder of backups or one .tar/.tar.zst file);
    with ``keep``, then delete all but the newest ``keep`` backups of that folder."""
    kind = output_kind(output, compress)
    if keep is not None and kind != "dir":
        raise BackupError(f"{output}: --keep applies to a folder of backups, not to one file")
    try:
        path, manifest = save_backup(client.export_sessions(history_only, timeout), output,
                                     compress, history_only)
    except RequestError as exc:
        raise BackupError(f"backup into {output} failed: {exc.code}: {exc.message}") from None
    pruned = prune(output, keep) if keep is not None else []
    return Created(path, manifest, pruned)


def restore(client: Client, path: Path, timeout: float | None = None,
            etcd: str = "") -> ultrakv_pb2.ImportSessionsResponse:
    """Verify the backup at ``path`` whole, then import every session into the cluster,
    each on its current owner; with ``etcd`` (HOST:PORT), then merge the backup's
    coordinator config (``config.json``) into the cluster's, as ``config set`` does."""
    manifest = verify(path)
    with opened(path) as directory:
        overrides = None
        config = directory / "config.json"
        if etcd and config.exists():
            try:
                overrides = parse_overrides(config.read_bytes())
            except ConfigError as exc:
                raise BackupError(f"{path}/config.json: {exc}") from None
        try:
            done = client.import_sessions(session_chunks(directory, manifest), timeout)
        except RequestError as exc:
            raise BackupError(f"{path}: restore refused by the cluster: {exc.code}: "
                              f"{exc.message}") from None
    if overrides:
        asyncio.run(_set_config(etcd, overrides))
    return done


async def _set_config(etcd: str, overrides: dict) -> None:
    async with EtcdStore(etcd) as store:
        await set_overrides(store, overrides)


def run_schedule(connect: Callable[[], Client], settings: BackupSettings,
                 stop: threading.Event, timeout: float | None = None,
                 on_round: Callable[[Created | None], None] | None = None) -> None:
    """Every ``settings.schedule_s``: a backup into ``settings.dir`` keeping
    ``settings.keep``, until ``stop`` is set. A failed round is logged and the next one
    runs on time (the older backups stay)."""
    while not stop.is_set():
        started = time.monotonic()
        done: Created | None = None
        try:
            with connect() as client:
                done = create(client, Path(settings.dir), settings.compress,
                              settings.history_only, settings.keep, timeout)
            log.info("backup %s: %d sessions; %d old backups deleted", done.path,
                     done.manifest.counts.get("sessions", 0), len(done.pruned))
        except (BackupError, OSError) as exc:
            log.error("scheduled backup failed: %s", exc)
        if on_round is not None:
            on_round(done)
        stop.wait(max(0.0, settings.schedule_s - (time.monotonic() - started)))
