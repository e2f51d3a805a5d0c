"""Where batch-1 decode's GPU time goes, kernel by kernel, and how much of the wall clock the GPU
is busy: torch.profiler (CUPTI) over a short greedy generation, after warm-up.

Usage: python benchmarks/profile_kernels.py [--model llama-1b] [--batch 1] [--steps 8] [--tokens 64]
Prints the top kernels by total GPU time, the GPU-busy fraction of the profiled wall time, and the
weight-streaming roofline for the step (bytes of parameters / peak bandwidth).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile
from ultrakv.node import Engine, EngineConfig, SamplingParams

PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8, help="num_scheduler_steps")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-graphs", action="store_true", help="eager (per-kernel launch visible)")
    args = ap.parse_args()
    engine = Engine(EngineConfig(model=args.model, device="cuda", max_num_seqs=64, max_model_len=4096,
                                 num_scheduler_steps=args.steps, use_cuda_graphs=not args.no_graphs))
    greedy = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    prompts = [[(7 * i + j) % 250 + 1 for j in range(128)] for i in range(args.batch)]
    for _ in range(2):
        engine.generate(prompts, greedy)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine.generate(prompts, greedy)
    torch.cuda.synchronize()
    plain = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.generate(prompts, greedy)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in events)
    params = sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_GBPS.items() if k in name), 3350.0)
    roofline_ms = params / (peak * 1e9) * 1e3
    print(f"device {name}; params {params / 1e9:.3f} GB; roofline {roofline_ms:.3f} ms/step at {peak} GB/s")
    print(f"unprofiled: {plain * 1e3 / args.tokens:.3f} ms/token; profiled wall {wall * 1e3:.1f} ms, "
          f"GPU busy {busy_us / 1e3:.1f} ms ({busy_us / 1e3 / (wall * 1e3):.0%}); "
          f"GPU per token {busy_us / 1e3 / args.tokens:.3f} ms")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
