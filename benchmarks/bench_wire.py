"""Wire benchmark: what gRPC adds on loopback, against the same engine called in-process.

* streaming overhead per token: one greedy request of N tokens, timed in-process
  (``engine.stream``) and over a Generate stream; (wire - in-process) / N, median of runs;
  once with the default chunk coalescing and once with a flush per step;
* unary requests/s: ``Process`` with max_length=1 (the engine's shortest request) and
  ``Stats`` (no generation: the wire and servicer alone), serially and from 8 threads.

    python benchmarks/bench_wire.py [--tokens 256] [--runs 7] [--seconds 3]

Writes benchmarks/results/wire_cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).parent))

from common import summary, write  # noqa: E402
from ultrakv.client import Client  # noqa: E402
from ultrakv.cluster.service import DEFAULT_FLUSH_INTERVAL_S  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402
from ultrakv.node.outputs import GenerateRequest  # noqa: E402
from ultrakv.node.server import BackgroundServer, ServerSettings  # noqa: E402
from ultrakv.v1 import types_pb2 as pb  # noqa: E402
from ultrakv.v1 import ultrakv_pb2_grpc  # noqa: E402

PROMPT = "Benchmarking the wire: "


def in_process_seconds(engine: Engine, tokens: int) -> float:
    async def run() -> float:
        started = time.perf_counter()
        n = 0
        async for delta in engine.stream(GenerateRequest(
                prompt=PROMPT, sampling=SamplingParams(max_tokens=tokens, temperature=0.0,
                                                       ignore_eos=True))):
            n += len(delta.token_ids)
        assert n == tokens, n
        return time.perf_counter() - started

    return asyncio.run(run())


def wire_seconds(stub: ultrakv_pb2_grpc.UltraKVStub, tokens: int, rid: str) -> tuple[float, int]:
    request = pb.GenerateStreamRequest(generate=pb.GenerateRequest(
        request_id=rid, text=PROMPT,
        sampling=pb.SamplingOptions(max_length=tokens, temperature=0.0, ignore_eos=True)))
    started = time.perf_counter()
    messages = 0
    n = 0
    for m in stub.Generate(iter([request]), timeout=120):
        messages += 1
        if m.WhichOneof("event") == "chunk":
            n += len(m.chunk.token_ids)
    assert n == tokens, n
    return time.perf_counter() - started, messages


def streaming_overhead(engine: Engine, tokens: int, runs: int, flush_s: float) -> dict:
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.2,
                              stream_flush_interval_s=flush_s)
    with BackgroundServer(engine, settings) as srv:
        channel = grpc.insecure_channel(srv.address)
        stub = ultrakv_pb2_grpc.UltraKVStub(channel)
        wire_seconds(stub, tokens, "warmup")
        in_process_seconds(engine, tokens)
        local, wire, messages = [], [], []
        for i in range(runs):  # interleaved, so drift hits both alike
            local.append(in_process_seconds(engine, tokens))
            t, m = wire_seconds(stub, tokens, f"run-{i}")
            wire.append(t)
            messages.append(m)
        channel.close()
    per_token_us = [(w - loc) / tokens * 1e6 for w, loc in zip(wire, local, strict=True)]
    return {
        "flush_interval_s": flush_s,
        "tokens": tokens,
        "runs": runs,
        "in_process_s": summary(local),
        "wire_s": summary(wire),
        "overhead_per_token_us": {"median": statistics.median(per_token_us),
                                  **summary(per_token_us)},
        "messages_per_request": statistics.median(messages),
        "in_process_tokens_per_s": tokens / statistics.median(local),
        "wire_tokens_per_s": tokens / statistics.median(wire),
    }


def unary_rate(address: str, call: str, threads: int, seconds: float) -> dict:
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def worker() -> None:
        channel = grpc.insecure_channel(address)
        stub = ultrakv_pb2_grpc.UltraKVStub(channel)
        request = (pb.GenerateRequest(text="x", sampling=pb.SamplingOptions(
            max_length=1, temperature=0.0)) if call == "Process" else pb.StatsRequest())
        method = getattr(stub, call)
        method(request, timeout=30)  # connect outside the timed loop
        mine = []
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            method(request, timeout=30)
            mine.append(time.perf_counter() - t)
        channel.close()
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - started
    return {"call": call, "threads": threads, "requests": len(latencies),
            "requests_per_s": len(latencies) / elapsed,
            "latency_ms": {k: v * 1000 for k, v in summary(latencies).items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    config = EngineConfig(model="tiny", device="cpu", num_blocks=512)
    engine = Engine(config)
    try:
        streaming = [streaming_overhead(engine, args.tokens, args.runs, flush)
                     for flush in (DEFAULT_FLUSH_INTERVAL_S, 0.0)]
        with BackgroundServer(engine) as srv, Client(srv.address) as client:
            assert client.health()["healthy"]
            unary = [unary_rate(srv.address, call, threads, args.seconds)
                     for call in ("Process", "Stats") for threads in (1, 8)]
    finally:
        engine.shutdown()
    for s in streaming:
        print(f"stream flush={s['flush_interval_s']}: overhead "
              f"{s['overhead_per_token_us']['median']:.1f} us/token, "
              f"{s['messages_per_request']:.0f} messages for {s['tokens']} tokens")
    for u in unary:
        print(f"{u['call']:8s} x{u['threads']}: {u['requests_per_s']:.0f} req/s, "
              f"p50 {u['latency_ms']['p50']:.2f} ms")
    write("wire_cpu.json", {
        "engine": {"model": config.model, "device": config.device,
                   "num_blocks": config.num_blocks},
        "grpc": grpc.__version__,
        "streaming": streaming,
        "unary": unary,
        "notes": "loopback, client and server in one process (server on its own event-loop "
                 "thread); overhead = wire minus in-process time for the same greedy request",
    })


if __name__ == "__main__":
    main()
