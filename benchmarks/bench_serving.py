"""Serving benchmark through the real path, like vLLM's ``benchmark_serving``.

One seeded multi-turn chat workload, driven by an asyncio client, measured on three paths so
the cost of the wire shows:

* ``engine``: the in-process engine's async stream (no wire at all);
* ``node``: a node process (``ultrakv node --no-engine-process``, the engine a thread of
  the node) over gRPC on loopback;
* ``node-engine-process``: the same with ``--engine-process`` (the engine in a child process
  of the node, node/engine_core.py, the default on CUDA), its CPU time reported as
  ``engine_core``;
* ``coordinator``: etcd + a coordinator + the node with its defaults (``LocalCluster``), over gRPC;
* ``http``: a node process's OpenAI-compatible API (``/v1/completions``, ``stream: true``,
  server-sent events) on loopback. An OpenAI completion carries its whole context, so this
  path needs ``--turns 1`` (later turns of the workload send only the new user tokens).

Two load shapes per path: ``--concurrency C`` streams kept in flight (closed loop: each
stream runs its sessions' turns back to back) and ``--rates R ...`` (open loop: sessions start
by a Poisson process, R requests/s in all; a session's next turn goes out when its previous
one has finished). Prompts are token ids of chat-like lengths, outputs are a fixed number of
tokens (``ignore_eos``), so every path does the same work.

Reported per run: TTFT, TPOT, ITL and end-to-end latency (mean/p50/p95/p99), output
tokens/s, request rate achieved, cached tokens, and goodput under an SLO (requests/s meeting
TTFT <= ``--slo-ttft-ms`` and TPOT <= ``--slo-tpot-ms``). The summary compares each path with
the engine: throughput kept and TTFT p50 added.

    python benchmarks/bench_serving.py --model tiny --device cpu --sessions 16 --turns 3
    python benchmarks/bench_serving.py --model tiny --device cpu --turns 1 --paths engine node http
    python benchmarks/bench_serving.py --model llama-1b --device cuda --concurrency 64 --rates 8 32

Writes benchmarks/results/serving_<device>_<model>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import load_average, summary, write  # noqa: E402
from ultrakv.client import AsyncClient, Client  # noqa: E402
from ultrakv.client.local_cluster import ClusterSpec, LocalCluster  # noqa: E402
from ultrakv.cluster.etcd_server import free_port  # noqa: E402


@dataclass(frozen=True)
class Turn:
    session: str
    user_ids: list[int]
    max_tokens: int


@dataclass
class Record:
    """One finished request, as the client saw it."""

    start: float
    ttft: float
    e2e: float
    tokens: int
    cached: int
    gaps: list[float] = field(default_factory=list)  # between chunks, per token
    messages: int = 0  # stream messages that carried tokens

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else 0.0


def workload(sessions: int, turns: int, vocab: int, seed: int, user_range: tuple[int, int],
             out_range: tuple[int, int]) -> list[list[Turn]]:
    """``sessions`` conversations of ``turns`` turns: user messages and reply lengths drawn
    uniformly from the ranges (a chat-like mix), token ids avoiding the low special ids."""
    rng = random.Random(seed)
    convs = []
    for s in range(sessions):
        convs.append([Turn(f"bench-{seed}-{s}", [rng.randrange(10, vocab) for _ in range(rng.randint(*user_range))],
                           rng.randint(*out_range)) for _ in range(turns)])
    return convs


# --- the three paths --------------------------------------------------------------------------


class EnginePath:
    name = "engine"

    def __init__(self, engine) -> None:
        self.engine = engine

    async def run(self, turn: Turn) -> Record:
        from ultrakv.node import GenerateRequest, SamplingParams

        req = GenerateRequest(prompt=turn.user_ids, session_id=turn.session,
                              sampling=SamplingParams(max_tokens=turn.max_tokens, temperature=0.0,
                                                      ignore_eos=True))
        return await _measure(self._deltas(req))

    async def _deltas(self, req):
        async for delta in self.engine.stream(req):
            yield len(delta.token_ids), (delta.output.cached_tokens if delta.finished else None)


class GrpcPath:
    def __init__(self, name: str, client: AsyncClient) -> None:
        self.name = name
        self.client = client

    async def run(self, turn: Turn) -> Record:
        spec = {"token_ids": turn.user_ids, "session_id": turn.session, "max_length": turn.max_tokens,
                "temperature": 0.0, "ignore_eos": True}
        return await _measure(self._chunks(spec))

    async def _chunks(self, spec):
        async for chunk in self.client.stream(spec, timeout=600):
            yield len(chunk.token_ids), (chunk.result["cached_tokens"] if chunk.finished else None)


class HttpPath:
    """The OpenAI API: a streamed ``/v1/completions`` per turn, prompt as token ids. Text
    chunks carry no token counts, so tokens come from the usage chunk and the gaps between
    chunks are spread evenly over them; TTFT is the first chunk with text."""

    name = "http"

    def __init__(self, client) -> None:
        self.client = client

    async def run(self, turn: Turn) -> Record:
        body = {"prompt": turn.user_ids, "max_tokens": turn.max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        stamps: list[float] = []
        usage = {}
        async with self.client.stream("POST", "/v1/completions", json=body,
                                      headers={"x-session-id": turn.session}) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    usage = event["usage"]
                elif event["choices"] and event["choices"][0].get("text"):
                    stamps.append(time.perf_counter())
        end = time.perf_counter()
        tokens = usage.get("completion_tokens", 0)
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
        per_chunk = tokens / len(stamps) if stamps else 0
        gaps = [(b - a) / per_chunk for a, b in itertools.pairwise(stamps) for _ in range(max(1, round(per_chunk)))]
        return Record(start, (stamps[0] if stamps else end) - start, end - start, tokens, cached, gaps, len(stamps))


async def _measure(events) -> Record:
    start = time.perf_counter()
    first = None
    last = start
    tokens = cached = 0
    gaps: list[float] = []
    messages = 0
    async for n, final_cached in events:
        now = time.perf_counter()
        if n:
            messages += 1
            if first is None:
                first = now
            else:
                gaps.extend([(now - last) / n] * n)
            last = now
            tokens += n
        if final_cached is not None:
            cached = final_cached
    end = time.perf_counter()
    return Record(start, (first or end) - start, end - start, tokens, cached, gaps, messages)


# --- load shapes ------------------------------------------------------------------------------


async def closed_loop(path, convs: list[list[Turn]], concurrency: int) -> tuple[list[Record], float]:
    queue = list(convs)
    records: list[Record] = []

    async def worker() -> None:
        while queue:
            for turn in queue.pop():
                records.append(await path.run(turn))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, time.perf_counter() - t0


async def open_loop(path, convs: list[list[Turn]], rate: float, seed: int) -> tuple[list[Record], float]:
    rng = random.Random(seed)
    session_rate = rate / max(1, len(convs[0]))
    records: list[Record] = []

    async def conversation(turns: list[Turn]) -> None:
        for turn in turns:
            records.append(await path.run(turn))

    t0 = time.perf_counter()
    tasks = []
    for turns in convs:
        tasks.append(asyncio.create_task(conversation(turns)))
        await asyncio.sleep(rng.expovariate(session_rate))
    await asyncio.gather(*tasks)
    return records, time.perf_counter() - t0


def report(records: list[Record], seconds: float, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    ttft = [r.ttft for r in records]
    tpot = [r.tpot for r in records if r.tokens > 1]
    itl = [g for r in records for g in r.gaps]
    good = sum(1 for r in records if r.ttft <= slo_ttft_s and r.tpot <= slo_tpot_s)
    ms = lambda xs: {k: v * 1000 for k, v in summary(xs).items()}  # noqa: E731
    return {
        "requests": len(records), "seconds": seconds,
        "request_rate": len(records) / seconds,
        "output_tokens_per_s": sum(r.tokens for r in records) / seconds,
        "cached_tokens": sum(r.cached for r in records),
        "ttft_ms": ms(ttft), "tpot_ms": ms(tpot), "itl_ms": ms(itl), "e2e_ms": ms([r.e2e for r in records]),
        "goodput_requests_per_s": good / seconds, "slo_met": good / len(records) if records else 0.0,
        "tokens_per_message": sum(r.tokens for r in records) / max(1, sum(r.messages for r in records)),
    }


def process_cpu_s(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds a process (or one of its threads) has used (Linux /proc):
    unlike wall time, it hardly depends on what else the machine runs."""
    stat = Path(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_core_of(node_pid: int) -> dict[str, int]:
    """``{"engine_core": pid}`` when the node runs its engine in a child process (started by
    multiprocessing's spawn), else ``{}``."""
    for child in Path(f"/proc/{node_pid}/task/{node_pid}/children").read_text().split():
        with contextlib.suppress(OSError):
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return {"engine_core": int(child)}
    return {}


def cpu_clocks(servers: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of each server process, of a node's main thread (its event loop:
    the gRPC servicers, everything a token costs the node besides the engine thread) and of
    this process (the client)."""
    clocks = {name: process_cpu_s(pid) for name, pid in servers.items()}
    if "node" in servers:
        clocks["node_event_loop"] = process_cpu_s(servers["node"], servers["node"])
    clocks["client"] = process_cpu_s(os.getpid())
    return clocks


# --- main -------------------------------------------------------------------------------------


class GcPauses:
    """The garbage collector's pauses in this process (the client; on the engine path, the
    engine too) while a run is measured: a full collection of a large heap holds every
    stream of the client at once."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self._started = 0.0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._hear)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._hear)

    def _hear(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif info.get("generation") == 2:
            self.pauses.append(time.perf_counter() - self._started)

    def report(self) -> dict:
        return {"full_collections": len(self.pauses), "max_ms": 1000 * max(self.pauses, default=0.0),
                "total_ms": 1000 * sum(self.pauses)}


async def run_path(path, args, vocab: int, servers: dict[str, int] | None = None) -> dict:
    """The path's runs. Each also reports the CPU time per 1000 output tokens of the
    ``servers`` (name -> pid: the node, the coordinator; for the engine path, the benchmark
    process holding the engine) and of this process (the client; it includes the engine on
    the engine path): the wire's cost that load hardly blurs. ``server_cpu_s_per_1k_tokens``
    is the servers' sum."""
    servers = servers or {}
    results: dict[str, dict] = {"load_average_before": load_average()}
    slo = (args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000)
    # Warm the path (connections, graphs, kernels) on a workload of its own, untimed.
    await closed_loop(path, workload(4, 1, vocab, 999, (8, 64), (4, 8)), 4)
    for i, c in enumerate(args.concurrency):
        convs = workload(args.sessions, args.turns, vocab, 100 + i, tuple(args.user_tokens), tuple(args.output_tokens))
        cpu0 = cpu_clocks(servers)
        with GcPauses() as pauses:
            records, secs = await closed_loop(path, convs, c)
        results[f"concurrency_{c}"] = report(records, secs, *slo)
        results[f"concurrency_{c}"]["client_gc"] = pauses.report()
        tokens = max(1, sum(r.tokens for r in records))
        per_1k = {name: 1000 * (t - cpu0[name]) / tokens for name, t in cpu_clocks(servers).items()}
        results[f"concurrency_{c}"]["cpu_s_per_1k_tokens"] = per_1k
        if servers:
            results[f"concurrency_{c}"]["server_cpu_s_per_1k_tokens"] = sum(per_1k[n] for n in servers)
        print(f"{path.name:12s} concurrency {c:4d}: {results[f'concurrency_{c}']['output_tokens_per_s']:9.1f} tok/s"
              f"  TTFT p50 {results[f'concurrency_{c}']['ttft_ms']['p50']:7.1f} ms", flush=True)
    for i, rate in enumerate(args.rates):
        convs = workload(args.sessions, args.turns, vocab, 200 + i, tuple(args.user_tokens), tuple(args.output_tokens))
        with GcPauses() as pauses:
            records, secs = await open_loop(path, convs, rate, seed=i)
        results[f"rate_{rate:g}"] = report(records, secs, *slo)
        results[f"rate_{rate:g}"]["client_gc"] = pauses.report()
        r = results[f"rate_{rate:g}"]
        print(f"{path.name:12s} rate {rate:6g}/s: {r['output_tokens_per_s']:9.1f} tok/s  "
              f"TTFT p50 {r['ttft_ms']['p50']:7.1f} p99 {r['ttft_ms']['p99']:7.1f} ms  "
              f"goodput {r['goodput_requests_per_s']:.2f}/s", flush=True)
    return results


async def grpc_runs(name: str, address: str, args, vocab: int, servers: dict[str, int]) -> dict:
    """A gRPC path's runs, by the client's multiplexing: as ``--no-multiplex`` says, or with
    ``--client-ab`` four times on the same servers, multiplexed (``name``, ``name_2``) and
    with a call per request (``name-per-call``, ``_2``) in the order it names, each run from an
    empty cache and no sessions so all four do the same work."""
    variants = [(name, args.multiplex)]
    if args.client_ab == "on-first":
        variants = [(name, True), (f"{name}-per-call", False), (f"{name}-per-call_2", False),
                    (f"{name}_2", True)]
    elif args.client_ab == "off-first":
        variants = [(f"{name}-per-call", False), (name, True), (f"{name}_2", True),
                    (f"{name}-per-call_2", False)]
    out = {}
    for key, multiplex in variants:
        async with AsyncClient(address, timeout=600, multiplex=multiplex) as client:
            if args.client_ab:
                await client.cleanup_sessions(0)
                await client.clear_cache()
            out[key] = await run_path(GrpcPath(key, client), args, vocab, servers)
            out[key]["client_multiplex"] = multiplex
    return out


def _node_argv(args, port: int, http_port: int = 0) -> list[str]:
    argv = [sys.executable, "-m", "ultrakv.client.cli", "node", "--model", args.model, "--device", args.device,
            "--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port),
            # one node alone on loopback, measured through its client API: no peers to trust
            "--insecure-no-cluster-secret"]
    return argv + args.node_args


def _wait_ready(address: str, proc: subprocess.Popen | None, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    with Client(address, timeout=5) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"node exited with status {proc.returncode} while starting")
            with contextlib.suppress(Exception):
                if client.health().get("status") == "SERVING":
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not ready within {timeout_s:.0f} s")
            time.sleep(0.5)


async def main_async(args) -> dict:
    from ultrakv.node import Engine, EngineConfig

    out: dict[str, dict] = {}
    extra = dict(zip(args.node_args[::2], args.node_args[1::2], strict=False))
    vocab = None
    if "engine" in args.paths:
        cfg = {"model": args.model, "device": args.device}
        if "--num-scheduler-steps" in extra:
            cfg["num_scheduler_steps"] = int(extra["--num-scheduler-steps"])
        engine = Engine(EngineConfig(**cfg))
        t0 = time.perf_counter()
        engine.warmup()
        warmup_s = time.perf_counter() - t0
        vocab = engine.model_config.vocab_size
        out["engine"] = await run_path(EnginePath(engine), args, vocab, {"engine": os.getpid()})  # + the client
        out["engine"]["warmup_s"] = warmup_s  # graphs captured, kernels compiled, matmuls met
        engine.shutdown()
        del engine
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()
    # This process is the client of the paths below. What the engine path left (torch, the
    # model's modules, its graphs) made a full collection of its heap take 265 ms on the H100
    # host, once in a run, holding every stream at once (its p99 TTFT: 324 ms). Servers
    # freeze their startup heap (cluster/heap.py); the client does the same here.
    gc.collect()
    gc.freeze()
    vocab = vocab or args.vocab
    for name in [p for p in args.paths if p in ("node", "node-engine-process")]:  # in the order given
        port = free_port()
        flags = ["--engine-process"] if name == "node-engine-process" else ["--no-engine-process"]
        proc = subprocess.Popen(_node_argv(args, port) + flags, stdout=subprocess.DEVNULL if args.quiet else None,
                                stderr=subprocess.STDOUT if args.quiet else None)
        try:
            await asyncio.to_thread(_wait_ready, f"127.0.0.1:{port}", proc)
            servers = {"node": proc.pid, **engine_core_of(proc.pid)}
            out.update(await grpc_runs(name, f"127.0.0.1:{port}", args, vocab, servers))
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if "http" in args.paths:
        import httpx

        port, http_port = free_port(), free_port()
        proc = subprocess.Popen(_node_argv(args, port, http_port), stdout=subprocess.DEVNULL if args.quiet else None,
                                stderr=subprocess.STDOUT if args.quiet else None)
        try:
            await asyncio.to_thread(_wait_ready, f"127.0.0.1:{port}", proc)
            limits = httpx.Limits(max_connections=max([*args.concurrency, 64]) * 2)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=600,
                                         limits=limits) as client:
                out["http"] = await run_path(HttpPath(client), args, vocab, {"node": proc.pid})
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if "coordinator" in args.paths:
        with tempfile.TemporaryDirectory() as tmp:
            spec = ClusterSpec(nodes=1, coordinators=1, data_dir=Path(tmp), model=args.model, device=args.device,
                               port=0, node_args=args.node_args, startup_timeout_s=600,
                               coordinator_args=shlex.split(args.coordinator_flags),
                               log_dir=Path(tmp) / "logs" if args.quiet else None)
            with LocalCluster(spec) as cluster:
                node = next(iter(cluster.nodes.values())).pid
                servers = {"node": node, **engine_core_of(node), "coordinator": cluster.coordinator.pid}
                out.update(await grpc_runs("coordinator", cluster.address, args, vocab, servers))
    return out


def compare(results: dict[str, dict]) -> dict:
    """Each wire path against the engine: throughput kept, TTFT p50 added (ms)."""
    base = results.get("engine")
    if not base:
        return {}
    cmp: dict[str, dict] = {}
    for path, runs in results.items():
        if path == "engine":
            continue
        cmp[path] = {
            run: {"throughput_kept": r["output_tokens_per_s"] / base[run]["output_tokens_per_s"],
                  "ttft_p50_added_ms": r["ttft_ms"]["p50"] - base[run]["ttft_ms"]["p50"]}
            for run, r in runs.items() if run.startswith(("concurrency_", "rate_")) and run in base
            and base[run]["output_tokens_per_s"] > 0
        }
    return cmp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--paths", nargs="+", default=["engine", "node", "coordinator"],
                   choices=["engine", "node", "node-engine-process", "coordinator", "http"])
    p.add_argument("--sessions", type=int, default=32, help="conversations per run")
    p.add_argument("--turns", type=int, default=3, help="turns per conversation")
    p.add_argument("--user-tokens", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    p.add_argument("--output-tokens", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    p.add_argument("--concurrency", type=int, nargs="*", default=[16], help="closed-loop runs: streams in flight")
    p.add_argument("--rates", type=float, nargs="*", default=[], help="open-loop runs: requests/s (Poisson)")
    p.add_argument("--slo-ttft-ms", type=float, default=200.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--vocab", type=int, default=256, help="token-id range when the engine path is not run")
    p.add_argument("--node-args", nargs=argparse.REMAINDER, default=[],
                   help="extra `ultrakv node` flags (last on the line)")
    p.add_argument("--coordinator-flags", default="", metavar='"FLAGS"',
                   help='extra `ultrakv coordinator` flags as one string, e.g. '
                        '--coordinator-flags="--stream-messages-per-s 500"')
    p.add_argument("--no-multiplex", dest="multiplex", action="store_false",
                   help="the gRPC paths' client opens a Generate call per request (the default "
                        "multiplexes its streams on one GenerateMany call)")
    p.add_argument("--client-ab", choices=["on-first", "off-first"], default=None,
                   help="run each gRPC path four times on the same servers, multiplexed and with a "
                        "call per request: on, off, off, on (on-first) or off, on, on, off")
    p.add_argument("--quiet", action="store_true", help="children's logs to a temp dir")
    p.add_argument("--output", default="")
    args = p.parse_args()
    if "http" in args.paths and args.turns != 1:
        p.error(f"the http path needs --turns 1 (an OpenAI completion carries its whole context), got {args.turns}")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results = asyncio.run(main_async(args))
    payload = {"model": args.model, "device": args.device, "workload": {
        "sessions": args.sessions, "turns": args.turns, "user_tokens": args.user_tokens,
        "output_tokens": args.output_tokens, "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms},
        "node_args": args.node_args, "coordinator_flags": args.coordinator_flags,
        "client_multiplex": args.multiplex, "results": results, "vs_engine": compare(results)}
    for path, runs in payload["vs_engine"].items():
        for run, c in runs.items():
            print(f"{path:12s} {run:16s} keeps {c['throughput_kept']:.1%} of the engine's throughput, "
                  f"TTFT p50 {c['ttft_p50_added_ms']:+.1f} ms")
    write(args.output or f"serving_{args.device.split(':')[0]}_{args.model}.json", payload)


if __name__ == "__main__":
    main()
