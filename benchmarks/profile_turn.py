"""Where a returning session's time to first token goes: the host path (cProfile) and the GPU
kernels (torch.profiler) of turn 8 of a conversation (200 new tokens over ~2100 cached), as in
bench_gpu.py's multi-turn test.

Usage: python benchmarks/profile_turn.py [--model llama-1b] [--turns 8]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics

import torch
from torch.profiler import ProfilerActivity, profile
from ultrakv.node import Engine, EngineConfig, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--turns", type=int, default=8)
    args = ap.parse_args()
    rng = random.Random(0)
    engine = Engine(EngineConfig(model=args.model, device="cuda", max_num_seqs=256, max_num_batched_tokens=8192,
                                 max_model_len=4096))
    engine.warmup()
    toks = lambda n: [rng.randrange(1, 256) for _ in range(n)]  # noqa: E731
    reply = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ttfts = []
    for s in range(6):
        sid = f"s{s}"
        for _ in range(args.turns - 1):
            engine.generate([toks(200)], reply, session_ids=[sid])
        out = engine.generate([toks(200)], first, session_ids=[sid])[0]
        ttfts.append(out.ttft_s)
    print(f"turn {args.turns}: cached {out.cached_tokens} of {out.prompt_tokens}; "
          f"TTFT median {statistics.median(ttfts) * 1e3:.2f} ms over {len(ttfts)}")
    for _ in range(args.turns - 1):
        engine.generate([toks(200)], reply, session_ids=["p"])
    prompt = toks(200)
    prof = cProfile.Profile()
    prof.enable()
    out = engine.generate([prompt], first, session_ids=["p"])[0]
    prof.disable()
    print(f"profiled turn: TTFT {out.ttft_s * 1e3:.2f} ms")
    pstats.Stats(prof).sort_stats("cumtime").print_stats(30)
    engine.generate([toks(200)], reply, session_ids=["q"])
    for _ in range(args.turns - 2):
        engine.generate([toks(200)], reply, session_ids=["q"])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as kprof:
        out = engine.generate([toks(200)], first, session_ids=["q"])[0]
        torch.cuda.synchronize()
    gpu_us = sum(e.device_time for e in kprof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"kernel-profiled turn: TTFT {out.ttft_s * 1e3:.2f} ms; GPU kernel time {gpu_us / 1e3:.2f} ms")
    print(kprof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
