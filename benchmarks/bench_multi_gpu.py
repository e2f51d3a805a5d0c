"""Several devices behind one node: tensor parallel vs one device, data parallel vs one
engine, and a session's KV moved over torch.distributed point-to-point vs gRPC chunks.

    python benchmarks/bench_multi_gpu.py                     # CPU: gloo ranks, tiny (JSON: multi_gpu_cpu.json)
    python benchmarks/bench_multi_gpu.py --device cuda --model llama-8b   # 2 GPUs: NCCL

* ``tp``: decode tokens/s at TP=1 and TP=2, batch 1 and 64 concurrent (short prompts,
  ``--decode-tokens`` each); on CUDA also the batch-1 roofline fraction (weight bytes a rank
  reads per token over ``--hbm-gbps``).
* ``dp``: throughput of 64 sessions on ``--gpus 2`` (two engines) vs one engine.
* ``kv_transfer``: a session's KV at 2k and 32k tokens (``--kv-shape`` model, its dtype)
  sent rank 0 -> rank 1 in one ``KVLink`` send (NCCL GPU to GPU; gloo on CPU), against the
  gRPC path (the same KV framed by ``state_to_chunks``, streamed over a loopback gRPC call,
  checked and assembled, moved onto the device). GB/s and the move's latency.

NVLink multicast stays off (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1, set
here before torch loads). Results are noisy on a shared machine: read them as orders.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
if "cuda" not in sys.argv:
    # One thread per engine or rank (inherited by the TP worker and the KV peer): on a loaded
    # 2-core machine two OpenMP threads per process made a tiny batch-64 step 15x slower
    # (12 s against 0.7 s for 64 x 16 tokens), which would measure the oversubscription,
    # not the parallelism.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from concurrent import futures  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import write  # noqa: E402
from ultrakv.cluster.session_state import SessionState  # noqa: E402
from ultrakv.cluster.session_transfer import StateAssembler, state_to_chunks  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402
from ultrakv.node.model.presets import preset_config  # noqa: E402
from ultrakv.node.parallel.data_parallel import open_engine  # noqa: E402
from ultrakv.node.parallel.kv_transfer import KVLink  # noqa: E402
from ultrakv.node.parallel.process_group import ProcessGroup, host_store, join_store  # noqa: E402
from ultrakv.v1 import node_pb2 as npb  # noqa: E402

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def machine_named() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"node": platform.node(), "cpu_model": cpu, "cores": os.cpu_count(), "load_average": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _decode_rate(engine, batch: int, tokens: int) -> dict:
    prompts = [[(7 * i + j) % 250 + 1 for j in range(16)] for i in range(batch)]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:1], replace(params, max_tokens=2))  # warm
    runs = []
    for _ in range(3):  # the best of three: a shared machine's load comes in bursts
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        runs.append((time.perf_counter() - t0, outs))
    dt, outs = min(runs, key=lambda r: r[0])
    generated = sum(len(o.token_ids) for o in outs)
    tpot = sorted(o.latency_s - o.ttft_s for o in outs)[len(outs) // 2] / max(1, tokens - 1)
    return {"batch": batch, "tokens_per_s": generated / dt, "tpot_p50_s": tpot, "wall_s": dt}


def bench_tp(args) -> dict:
    out = {}
    for tp in (1, 2):
        t0 = time.perf_counter()
        engine = Engine(EngineConfig(model=args.model, device=args.device, tensor_parallel_size=tp,
                                     max_num_seqs=64, num_blocks=args.num_blocks))
        t1 = time.perf_counter()
        engine.warmup()  # every graph captured (on every rank) before timing, as serving does
        startup = {"load_s": t1 - t0, "warmup_s": time.perf_counter() - t1, "cuda_graphs": engine.cuda_graphs}
        try:
            rows = [_decode_rate(engine, b, args.decode_tokens) for b in (1, 64)]
            rows[0]["startup"] = startup
            if engine.device.type == "cuda":
                weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
                rows[0]["roofline_fraction"] = weights / rows[0]["tpot_p50_s"] / (args.hbm_gbps * 1e9)
            out[f"tp{tp}"] = rows
        finally:
            engine.shutdown()
    for i, batch in enumerate((1, 64)):
        out[f"speedup_batch{batch}"] = out["tp2"][i]["tokens_per_s"] / out["tp1"][i]["tokens_per_s"]
    return out


def bench_dp(args) -> dict:
    out = {}
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)
    prompts = [[(11 * i + j) % 250 + 1 for j in range(32)] for i in range(64)]
    sessions = [f"s{i}" for i in range(64)]
    for name, gpus in (("one_engine", ""), ("dp2", "2")):
        engine = open_engine(EngineConfig(model=args.model, device=args.device, gpus=gpus, max_num_seqs=64,
                                          num_blocks=args.num_blocks))
        engine.warmup()
        try:
            engine.generate(prompts[:2], replace(params, max_tokens=2))
            runs = []
            for r in range(3):  # the best of three, each on fresh sessions
                t0 = time.perf_counter()
                outs = engine.generate(prompts, params, session_ids=[f"{s}-{r}" for s in sessions])
                runs.append((time.perf_counter() - t0, outs))
            dt, outs = min(runs, key=lambda run: run[0])
            out[name] = {"sessions": 64, "tokens_per_s": sum(len(o.token_ids) for o in outs) / dt, "wall_s": dt}
        finally:
            engine.shutdown()
    out["speedup"] = out["dp2"]["tokens_per_s"] / out["one_engine"]["tokens_per_s"]
    return out


def _kv(args, tokens: int, device: torch.device) -> torch.Tensor:
    c = preset_config(args.kv_shape)
    dtype = _DTYPES[args.kv_dtype]
    gen = torch.Generator(device=device).manual_seed(tokens)
    return torch.randn(c.num_hidden_layers, 2, tokens, c.num_key_value_heads, c.head_dim,
                       generator=gen, device=device).to(dtype)


def _p2p(args, sizes: list[int]) -> dict:
    """Rank 0 here, rank 1 a child process of this script (``--peer``)."""
    store = host_store()
    prefix = f"bench-{uuid.uuid4().hex}"
    argv = [sys.executable, __file__, "--peer", str(store.port), prefix, "--device", args.device,
            "--kv-shape", args.kv_shape, "--kv-dtype", args.kv_dtype, "--sizes", ",".join(map(str, sizes)),
            "--repeats", str(args.repeats)]
    peer = subprocess.Popen(argv)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    link = KVLink(ProcessGroup(store, prefix, 0, 2, device), 1)
    out = {}
    ack = torch.zeros(1, device=device)
    try:
        for tokens in sizes:
            kv = _kv(args, tokens, device)
            times = []
            for _ in range(args.repeats + 1):  # the first one warms the connection
                t0 = time.perf_counter()
                link.send(kv)
                link.group.recv(ack, 1, 99)  # the peer has it all
                times.append(time.perf_counter() - t0)
            best = min(times[1:])
            out[str(tokens)] = {"bytes": kv.numel() * kv.element_size(), "latency_s": best,
                                "gb_per_s": kv.numel() * kv.element_size() / best / 1e9}
    finally:
        # The peer exits without releasing the group (under NCCL that is collective and did not
        # complete); this end is released once it is gone.
        try:
            peer.wait(timeout=120)
        finally:
            if peer.poll() is None:
                peer.kill()
            link.group.release()
    return out


def _peer(args) -> None:
    port, prefix = int(args.peer[0]), args.peer[1]
    device = torch.device("cuda", 1) if args.device == "cuda" else torch.device("cpu")
    link = KVLink(ProcessGroup(join_store("127.0.0.1", port), prefix, 1, 2, device), 0)
    ack = torch.ones(1, device=device)
    for _tokens in args.sizes.split(","):
        for _ in range(args.repeats + 1):
            link.recv()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            link.group.send(ack, 0, 99)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    os._exit(0)  # without releasing the group: see _p2p


def _grpc(args, sizes: list[int]) -> dict:
    """The same KV as chunks over a loopback gRPC stream: framed (sha256 per chunk), sent,
    checked and assembled, then put on the device, as ImportSession does before the engine."""
    device = torch.device("cuda", 1 if torch.cuda.device_count() > 1 else 0) if args.device == "cuda" \
        else torch.device("cpu")

    def sink(chunks, context):
        asm = StateAssembler()
        for chunk in chunks:
            asm.add(chunk)
        state = asm.finish()
        state.kv.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return b""

    handler = grpc.method_handlers_generic_handler("bench.KVSink", {
        "Put": grpc.stream_unary_rpc_method_handler(sink, request_deserializer=npb.SessionChunk.FromString,
                                                    response_serializer=lambda b: b)})
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=opts)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)
    put = channel.stream_unary("/bench.KVSink/Put", request_serializer=npb.SessionChunk.SerializeToString,
                               response_deserializer=lambda b: b)
    src = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    out = {}
    try:
        for tokens in sizes:
            kv = _kv(args, tokens, src)
            times = []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                state = SessionState("bench", list(range(tokens)), 1, "bench", tokens, kv.cpu())
                put(state_to_chunks(state), timeout=600)
                times.append(time.perf_counter() - t0)
            best = min(times[1:])
            out[str(tokens)] = {"bytes": kv.numel() * kv.element_size(), "latency_s": best,
                                "gb_per_s": kv.numel() * kv.element_size() / best / 1e9}
    finally:
        channel.close()
        server.stop(0)
    return out


def bench_kv_transfer(args) -> dict:
    sizes = [int(s) for s in args.sizes.split(",")]
    p2p, rpc = _p2p(args, sizes), _grpc(args, sizes)
    return {"kv_shape": args.kv_shape, "kv_dtype": args.kv_dtype, "p2p": p2p, "grpc": rpc,
            "p2p_speedup": {t: rpc[t]["latency_s"] / p2p[t]["latency_s"] for t in p2p}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", default=None, help="tiny on CPU, llama-8b on CUDA by default")
    p.add_argument("--decode-tokens", type=int, default=None, help="tokens per request (16 CPU, 128 CUDA)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV blocks per engine (CPU: 1024)")
    p.add_argument("--hbm-gbps", type=float, default=4800.0, help="peak memory bandwidth for the roofline (H200)")
    p.add_argument("--kv-shape", default=None, help="preset whose KV shape is moved (llama-1b CPU, llama-8b CUDA)")
    p.add_argument("--kv-dtype", default="bfloat16", choices=sorted(_DTYPES))
    p.add_argument("--sizes", default="2048,32768", help="session lengths in tokens")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", choices=("tp", "dp", "kv_transfer"), help="run one part")
    p.add_argument("--peer", nargs=2, metavar=("PORT", "PREFIX"), help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.kv_shape = args.kv_shape or ("llama-8b" if cuda else "llama-1b")
    if args.peer:
        return _peer(args)
    if cuda and torch.cuda.device_count() < 2:
        raise SystemExit(f"--device cuda needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    args.model = args.model or ("llama-8b" if cuda else "tiny")
    args.decode_tokens = args.decode_tokens or (128 if cuda else 16)
    args.num_blocks = args.num_blocks or (None if cuda else 1024)
    parts = {"tp": bench_tp, "dp": bench_dp, "kv_transfer": bench_kv_transfer}
    results = {"config": {k: v for k, v in vars(args).items() if k != "peer"}, "machine_named": machine_named()}
    for name, fn in parts.items():
        if args.only in (None, name):
            t0 = time.perf_counter()
            results[name] = fn(args)
            print(name, json.dumps(results[name], indent=1)[:2000], f"({time.perf_counter() - t0:.0f} s)", flush=True)
    suffix = "cpu" if not cuda else torch.cuda.get_device_name(0).replace(" ", "_")
    write(f"multi_gpu_{suffix}{'_' + args.only if args.only else ''}.json", results)


if __name__ == "__main__":
    main()
