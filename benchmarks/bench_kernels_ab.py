"""Issue 15's two unmet llama-1b targets, each kernel variant against the one it replaces, in one
run (``node/kernel_variants.py``; ``benchmarks/gpu_session.sh kernels-ab``):

1. Kernels alone (CUDA graphs, ``triton.testing.do_bench_cudagraph``): prefill attention of a
   returning session's turn (204 new tokens over 2096 cached, as turn 8 of bench_gpu's chat;
   in the 224-token / 4096-context prefill graph it replays in, and eager), per-head kernels
   vs the GQA kernel, plus a sweep of the GQA kernel's launch shapes; greedy argmax over the
   vocabulary at batch 1 and 64; batch-1 decode attention by its split-K target; the model's
   projections at one token, cuBLAS vs the Triton GEMV (with the norm and SwiGLU fused in),
   plus a sweep of its launch shape.
2. End to end, one engine per variant set (llama-1b, fused kernels, 32 steps per round;
   ``before``: the kernels this work replaced, ``default``: main's defaults, ``serial_launch``:
   the defaults without programmatic dependent launch):
   turn-8 TTFT with session reuse and by recompute (bench_gpu's multi-turn chat), batch-1
   decode tokens/s against the weight-read roofline, and the GPU kernel time of one reuse
   turn and of one decode token (torch.profiler).

Writes ``kernels_ab_<gpu>.json`` to $ULTRAKV_RESULTS_DIR (benchmarks/results by default).
Usage: python benchmarks/bench_kernels_ab.py [--model llama-1b] [--skip-sweep] [--skip-engine]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from bench_decode import measure  # noqa: E402
from bench_gpu import bench_multi_turn, weight_bytes  # noqa: E402
from common import host_us, machine, write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams, kernel_variants  # noqa: E402
from ultrakv.node.attention.base import AttentionMetadata  # noqa: E402
from ultrakv.node.attention.triton_backend import GqaPrefillConfig, TritonPagedBackend  # noqa: E402

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}
# Variant sets measured end to end: the code before this work, then each new piece.
ENGINE_VARIANTS = {
    "before": "prefill_attention=per_head,argmax=torch,gemv=cublas,launch=serial",
    "default": "",
    "serial_launch": "launch=serial",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def guarded(label: str, fn, *args):
    """``fn(*args)``, or the error's text: one failing part leaves the others' figures (a
    lent GPU's call is not repeated lightly)."""
    try:
        return fn(*args)
    except Exception:
        log(f"{label} failed:\n{traceback.format_exc()}")
        return {"error": traceback.format_exc()[-2000:]}


def bench_us(fn) -> float:
    import triton.testing

    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50)


def prefill_us(backend: TritonPagedBackend, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata) -> float:
    return bench_us(lambda: backend.prefill(q, cache, meta, q.shape[-1] ** -0.5))


# ------------------------------------------------------------------ prefill attention


def turn_case(new: int, cached: int, padded: int, bucket: int, heads=32, kv_heads=8, head_dim=64,
              dtype=torch.bfloat16):
    """q, cache and metadata of one sequence's step: ``new`` real tokens after ``cached``,
    padded to ``padded`` (slot -1), launched for a context of ``bucket``, as a prefill graph
    replays it."""
    dev = torch.device("cuda")
    block = 16
    seq = cached + padded
    blocks = -(-max(seq, bucket) // block)
    cache = torch.randn(2, blocks + 8, block, kv_heads, head_dim, device=dev, dtype=dtype)
    table = torch.randperm(blocks + 8, device=dev)[:blocks].to(torch.int32)[None]
    pos = torch.arange(cached, seq, device=dev)
    slots = (table[0, pos // block].long() * block + pos % block)
    slots[new:] = -1
    meta = AttentionMetadata(torch.tensor([0, padded], dtype=torch.int32, device=dev),
                             torch.tensor([seq], dtype=torch.int32, device=dev), table, slots, padded, bucket)
    q = torch.randn(padded, heads, head_dim, device=dev, dtype=dtype)
    return q, cache, meta


PREFILL_SHAPES = {
    # name: (new tokens, cached, padded to, launch bound)
    "turn8_graph_224_over_2096_bucket4096": (204, 2096, 224, 4096),
    "turn8_eager_204_over_2096": (204, 2096, 204, 2300),
    "turn_64_over_4000": (64, 4000, 64, 4096),
    "turn_16_over_1000_bucket1024": (16, 1000, 16, 1024),
    # A cold prompt: the backend keeps the per-head kernel; "gqa" here forces the GQA kernel,
    # to see whether it should take cold prompts too.
    "cold_2048": (2048, 0, 2048, 2048),
}
SWEPT = ("turn8_graph_224_over_2096_bucket4096", "turn_64_over_4000")


def bench_prefill_attention(sweep: bool) -> dict:
    res: dict = {}
    scale = 64 ** -0.5
    for name, (new, cached, padded, bucket) in PREFILL_SHAPES.items():
        q, cache, meta = turn_case(new, cached, padded, bucket)
        row = {}
        gqa = TritonPagedBackend(prefill_kernel="gqa")
        per_head = TritonPagedBackend(prefill_kernel="per_head")

        def forced_gqa(q=q, cache=cache, meta=meta, gqa=gqa):
            return gqa._gqa_prefill(q, cache, meta, scale, torch.empty_like(q))

        row["per_head"] = prefill_us(per_head, q, cache, meta)
        row["gqa"] = bench_us(forced_gqa)
        if name == "turn8_eager_204_over_2096":  # what an eager step's launches cost the host
            row["per_head_host_us"] = host_us(lambda b=per_head, q=q, c=cache, m=meta: b.prefill(q, c, m, scale))
            row["gqa_host_us"] = host_us(forced_gqa)
        ref = per_head.prefill(q, cache, meta, scale)[:new].float()
        got = forced_gqa()[:new].float()
        row["max_abs_diff"] = float((ref - got).abs().max())
        if sweep and name in SWEPT:
            row["sweep"] = []
            for rows in (64, 128):
                for block_n in (32, 64, 128):
                    for warps in (4, 8):
                        for pps in (1, 2, 4):
                            cfg = GqaPrefillConfig(rows, block_n, warps, 3, pps)
                            backend = TritonPagedBackend(prefill_kernel="gqa", gqa_prefill_config=cfg)
                            try:
                                us = prefill_us(backend, q, cache, meta)
                            except Exception as exc:  # a shape the compiler refuses (shared memory)
                                us = f"failed: {type(exc).__name__}"
                            row["sweep"].append({"block_rows": rows, "block_n": block_n, "num_warps": warps,
                                                 "num_stages": 3, "programs_per_sm": pps, "us": us})
            timed = [r for r in row["sweep"] if isinstance(r["us"], float)]
            row["sweep_best"] = min(timed, key=lambda r: r["us"]) if timed else None
            log(f"  best of the sweep: {row['sweep_best']}")
        res[name] = row
        log(f"prefill attention {name}: per_head {row['per_head']:.1f} us, gqa {row['gqa']:.1f} us "
            f"(max |diff| {row['max_abs_diff']:.3g})")
    return res


def bench_argmax() -> dict:
    """Greedy argmax over llama-1b's vocabulary: torch.argmax over float32 logits (the old
    path, after the upcast) vs the split kernel over the model dtype's logits."""
    from ultrakv.node.sampling_kernels import SplitArgmax

    res = {}
    split = SplitArgmax("cuda")
    for rows in (1, 64):
        logits = torch.randn(rows, 128256, device="cuda", dtype=torch.bfloat16)
        upcast = logits.float()
        row = {
            "torch_upcast_us": bench_us(lambda lg=logits: lg.float().argmax(dim=-1)),
            "torch_fp32_us": bench_us(lambda lg=upcast: lg.argmax(dim=-1)),
            "split_bf16_us": bench_us(lambda lg=logits: split(lg)),
            "equal": bool(torch.equal(split(logits), logits.float().argmax(dim=-1))),
        }
        res[f"rows_{rows}"] = row
        log(f"argmax rows {rows}: {row}")
    return res


def bench_decode_attention() -> dict:
    """Batch-1 decode attention (llama-1b heads, bf16) at short and long contexts, each
    launched for its CUDA graph's context bucket, by how many programs per SM the split-K
    partitioning aims at (the default is triton_backend._DECODE_PROGRAMS_PER_SM): at a short
    context the split and its in-launch merge may cost more than they save."""
    from ultrakv.node.attention import triton_backend

    res = {}
    default = triton_backend._DECODE_PROGRAMS_PER_SM
    for context, bucket in ((200, 256), (384, 1024), (2000, 4096)):
        q, cache, meta = turn_case(1, context - 1, 1, bucket)
        backend = TritonPagedBackend()
        row = {}
        for pps in (0, 1, 2, 4, 8):  # 0: one partition (no split)
            triton_backend._DECODE_PROGRAMS_PER_SM = pps
            row[f"programs_per_sm_{pps}"] = bench_us(lambda b=backend, q=q, c=cache, m=meta: b.decode(q, c, m, 0.125))
        triton_backend._DECODE_PROGRAMS_PER_SM = default
        res[f"context_{context}_bucket_{bucket}"] = row
        log(f"decode attention, context {context} (bucket {bucket}): {row}")
    return res


# llama-1b's projections at one token: (name, K, N, SwiGLU fused after, norm fused before).
# lm_head stays on cuBLAS in the model; it is timed to see whether it should not.
GEMV_SHAPES = (("qkv", 2048, 3072, False), ("o", 2048, 2048, False), ("gate_up", 2048, 16384, True),
               ("down", 8192, 2048, False), ("lm_head", 2048, 128256, False))


def bench_gemv(sweep: bool) -> dict:
    """Each llama-1b projection at one token, bf16: cuBLAS (F.linear, plus the fused RMSNorm
    and SwiGLU kernels the model launches around it) vs the Triton GEMV with them fused in;
    GB/s of weight read; and a sweep of the GEMV's launch shape."""
    from dataclasses import replace

    from ultrakv.node.model import fused_kernels, gemv

    res = {}
    dev, dt = "cuda", torch.bfloat16
    default = gemv.LAUNCH
    for name, k, n, silu in GEMV_SHAPES:
        x, r = torch.randn(1, k, device=dev, dtype=dt), torch.randn(1, k, device=dev, dtype=dt)
        w = torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5
        nw = torch.ones(k, device=dev, dtype=dt)
        gb = w.numel() * w.element_size() / 1e9
        row = {"weight_gb": gb,
               "cublas_us": bench_us(lambda x=x, w=w: torch.nn.functional.linear(x, w)),
               "triton_us": bench_us(lambda x=x, w=w, s=silu: gemv.gemv(x, w, silu=s))}
        if name in ("qkv", "gate_up"):  # the model norms (adding the residual) before these
            def unfused(x=x, r=r, nw=nw, w=w, s=silu):
                y = torch.nn.functional.linear(fused_kernels.rms_norm(x, nw, 1e-5, r), w)
                return fused_kernels.silu_and_mul(y) if s else y
            rr = r.clone()
            row["cublas_with_norm_us"] = bench_us(unfused)
            row["triton_with_norm_us"] = bench_us(lambda x=x, rr=rr, nw=nw, w=w, s=silu:
                                                  gemv.norm_gemv(x, rr, nw, 1e-5, w, silu=s))
        row["cublas_tbps"] = gb / row["cublas_us"] * 1e3
        row["triton_tbps"] = gb / row["triton_us"] * 1e3
        if sweep:
            row["sweep"] = []
            for tile in (4096, 8192, 16384):
                for warps in (4, 8):
                    for stages in (1, 3):
                        for pps in (2, 4, 8):
                            gemv.LAUNCH = gemv.GemvLaunch(tile, warps, stages, pps)
                            try:
                                us = bench_us(lambda x=x, w=w, s=silu: gemv.gemv(x, w, silu=s))
                            except Exception as exc:
                                us = f"failed: {type(exc).__name__}"
                            row["sweep"].append({**gemv.LAUNCH.__dict__, "us": us})
            gemv.LAUNCH = default
            timed = [r for r in row["sweep"] if isinstance(r["us"], float)]
            row["sweep_best"] = min(timed, key=lambda r: r["us"]) if timed else None
        res[name] = row
        log(f"gemv {name}: cuBLAS {row['cublas_us']:.1f} us ({row['cublas_tbps']:.2f} TB/s), triton "
            f"{row['triton_us']:.1f} us ({row['triton_tbps']:.2f} TB/s)"
            + (f"; best swept {row['sweep_best']}" if sweep and row.get("sweep_best") else ""))
    gemv.LAUNCH = replace(default)
    return res


# ------------------------------------------------------------------ engine end to end


def profile_gpu(fn) -> dict:
    """GPU kernel time of ``fn`` by kernel name (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name[:80], [0.0, 0])
            k[0] += e.device_time
            k[1] += 1
    total = sum(v[0] for v in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:20]
    return {"gpu_us": total, "launches": sum(v[1] for v in kernels.values()),
            "top": [{"kernel": n, "us": round(v[0], 1), "count": v[1]} for n, v in top]}


def bench_engine(model: str, label: str, spec: str) -> dict:
    os.environ[kernel_variants.ENV] = spec
    kernel_variants.current.cache_clear()
    variants = kernel_variants.current()
    log(f"engine {label}: {variants}")
    engine = Engine(EngineConfig(model=model, device="cuda", max_num_seqs=256, max_num_batched_tokens=8192,
                                 max_model_len=4096, num_scheduler_steps=32, fused_kernels=True))
    engine.warmup()
    res: dict = {"variants": variants.__dict__}
    measure_engine(engine, label, res)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return res


def measure_engine(engine: Engine, label: str, res: dict) -> None:
    turn = bench_multi_turn(engine, random.Random(0), smoke=False)
    res["turn8_reuse_ttft_ms"] = turn["reuse"][-1]["ttft_s"] * 1e3
    res["turn8_recompute_ttft_ms"] = turn["recompute"][-1]["ttft_s"] * 1e3
    res["turn8_speedup"] = turn["last_turn_ttft_speedup"]
    res["multi_turn"] = turn
    log(f"engine {label}: turn 8 reuse {res['turn8_reuse_ttft_ms']:.2f} ms, recompute "
        f"{res['turn8_recompute_ttft_ms']:.2f} ms, {res['turn8_speedup']:.2f}x")

    rng = random.Random(1)
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    reply = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    for _ in range(7):
        engine.generate([[rng.randrange(1, 256) for _ in range(200)]], reply, session_ids=["prof"])
    res["turn8_profile"] = profile_gpu(lambda: engine.generate([[rng.randrange(1, 256) for _ in range(200)]], first,
                                                               session_ids=["prof"]))

    params = weight_bytes(engine.runner.model)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBPS.items() if k in name), 3350.0)
    roofline_ms = params / (peak * 1e9) * 1e3
    dec = measure(engine, 1, 128, 256, 3, seed=2)
    res["decode_b1"] = dec
    res["decode_b1_roofline_fraction"] = roofline_ms / dec["ms_per_step"]
    res["roofline_ms"] = roofline_ms
    tokens = 64
    prompt = [[(7 * j) % 250 + 1 for j in range(128)]]
    greedy = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prof = profile_gpu(lambda: engine.generate(prompt, greedy))
    prof["gpu_us_per_token"] = prof["gpu_us"] / tokens
    res["decode_b1_profile"] = prof
    res["decode_b64"] = measure(engine, 64, 128, 128, 1, seed=3)
    log(f"engine {label}: decode b1 {dec['decode_tokens_per_s']:.0f} tok/s ({dec['ms_per_step']:.3f} ms/token, "
        f"{res['decode_b1_roofline_fraction']:.0%} of roofline {roofline_ms:.3f} ms; GPU "
        f"{prof['gpu_us_per_token']:.0f} us/token), b64 {res['decode_b64']['decode_tokens_per_s']:.0f} tok/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--variants", nargs="*", default=list(ENGINE_VARIANTS), choices=list(ENGINE_VARIANTS))
    args = ap.parse_args()
    gpu = machine().get("gpu", "cpu").replace(" ", "_").replace("/", "_")
    name = f"kernels_ab_{gpu}.json"
    results: dict = {"model": args.model}
    # Kernels, then the engines, then the launch-shape sweeps: a call cut off by its time
    # limit loses the sweeps first (each section is written as soon as it is done).
    results["prefill_attention_us"] = guarded("prefill attention", bench_prefill_attention, False)
    results["argmax_us"] = guarded("argmax", bench_argmax)
    results["decode_attention_us"] = guarded("decode attention", bench_decode_attention)
    results["gemv_us"] = guarded("gemv", bench_gemv, False)
    write(name, results)
    if not args.skip_engine:
        results["engine"] = {}
        for label in args.variants:
            results["engine"][label] = guarded(f"engine {label}", bench_engine, args.model, label,
                                               ENGINE_VARIANTS[label])
            write(name, results)
    if not args.skip_sweep:
        results["prefill_attention_sweep"] = guarded("prefill attention sweep", bench_prefill_attention, True)
        write(name, results)
        results["gemv_sweep"] = guarded("gemv sweep", bench_gemv, True)
        write(name, results)
    log(f"wrote {name}")


if __name__ == "__main__":
    main()
