"""Where a step's time goes: cProfile of the host path for batch-1 decode, a 200-token
prefill and 64-way decode, plus the GPU time of one decode graph replay.
Usage: python benchmarks/profile_step.py [--model llama-1b] [--device cuda] [--scheduler-steps K]
       [--fused-kernels]"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import time

import torch
from ultrakv.node import Engine, EngineConfig, SamplingParams


def profile(label: str, fn) -> None:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    print(f"\n=== {label}: {time.perf_counter() - t0:.3f} s")
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--scheduler-steps", type=int, default=1, help="num_scheduler_steps")
    ap.add_argument("--fused-kernels", action="store_true", help="Triton norm/RoPE/SwiGLU kernels")
    args = ap.parse_args()
    rng = random.Random(0)
    engine = Engine(EngineConfig(model=args.model, device=args.device, max_num_seqs=256, max_model_len=4096,
                                 num_scheduler_steps=args.scheduler_steps, fused_kernels=args.fused_kernels))
    greedy = lambda n: SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)  # noqa: E731
    toks = lambda n: [rng.randrange(1, 256) for _ in range(n)]  # noqa: E731
    engine.generate([toks(128)], greedy(64))
    engine.generate([toks(128) for _ in range(64)], greedy(16))
    profile("batch-1 decode, 128 tokens", lambda: engine.generate([toks(128)], greedy(128)))
    profile("200-token prefill x 20", lambda: [engine.generate([toks(200)], greedy(1)) for _ in range(20)])
    profile("64 x decode 64 tokens", lambda: engine.generate([toks(128) for _ in range(64)], greedy(64)))
    if engine.runner.graphs is not None and engine.device.type == "cuda":
        g = engine.runner.graphs
        for key, (graph, _) in sorted(g.graphs.items())[:6]:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                graph.replay()
            end.record()
            torch.cuda.synchronize()
            print(f"graph batch={key[0]} ctx<={key[1]}: {start.elapsed_time(end) / 20:.3f} ms per replay")


if __name__ == "__main__":
    main()
