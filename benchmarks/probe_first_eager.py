"""Why the first eager prefill at a new prompt length is slow, once.

``bench_cold_prefill.py`` on an H100 showed it: after warmup, the first cold prompt of 1600,
2000 and 2300 tokens (one eager step each) took 6-7 ms more than the next ones of the same
length. This runs cold prompts in an order that tells the suspects apart, and counts, for
each prompt, what happened besides the forward:

* Triton compiles (the JIT's post-compile hook): a kernel specialized for a new shape;
* the caching allocator's device allocations and reserved bytes (``cudaMalloc`` for a larger
  activation than any before);
* the CUDA module loading mode (``CUDA_MODULE_LOADING``): with ``LAZY`` (CUDA's default) a
  cuBLAS kernel is loaded at its first launch, so a GEMM shape that picks a kernel not used
  before pays for the load.

    python benchmarks/probe_first_eager.py --model llama-1b
    CUDA_MODULE_LOADING=EAGER python benchmarks/probe_first_eager.py --model llama-1b --tag eager
    python benchmarks/probe_first_eager.py --model llama-1b --lengths 2300 2300 --profile 1777 --tag profile

Writes benchmarks/results/first_eager_<device>_<model>[_<tag>].json.

What it found on an H100 (``first_eager_..._llama-1b_before*.json``): no compile, no
allocation, and the same with eager module loading; the profile of a new length's first
prompt had ``aten::mm`` at 8.4 ms of host time against 1.9 ms on its repeat. cuBLAS pays for
each shape it has not met; eager steps now run at a fixed set of padded shapes that warmup
runs (node/step_shapes.py), and ``..._after.json`` is this probe on that code.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402

# Longest first (the allocator grows once), then lengths not seen, then a repeat of each.
ORDER = [2300, 1600, 2000, 1700, 2301, 2300, 1600, 1999, 3000, 2500, 3000]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--lengths", type=int, nargs="+", default=ORDER)
    p.add_argument("--tag", default="")
    p.add_argument("--profile", type=int, default=0,
                   help="after the probe: profile a prompt of this (new) length, then its repeat, host ops first")
    args = p.parse_args()
    from triton import knobs

    engine = Engine(EngineConfig(model=args.model, device="cuda", max_num_seqs=256, max_num_batched_tokens=8192,
                                 max_model_len=4096))
    engine.warmup()
    rng = random.Random(1)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.generate([[rng.randrange(1, 256) for _ in range(300)]], one)
    compiled: list[str] = []
    knobs.runtime.jit_post_compile_hook = lambda *a, **k: compiled.append(str(k.get("repr", k.get("fn", "?"))))

    rows = []
    for length in args.lengths:
        engine.clear_cache()
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()
        n_compiled = len(compiled)
        prompt = [rng.randrange(1, 256) for _ in range(length)]
        t0 = time.perf_counter()
        out = engine.generate([prompt], one)[0]
        wall = (time.perf_counter() - t0) * 1000
        after = torch.cuda.memory_stats()
        row = {
            "length": length,
            "ttft_ms": round(out.ttft_s * 1000, 2),
            "wall_ms": round(wall, 2),
            "triton_compiles": compiled[n_compiled:],
            "device_allocs": after.get("num_device_alloc", 0) - before.get("num_device_alloc", 0),
            "reserved_mib_growth": round((after["reserved_bytes.all.current"]
                                          - before["reserved_bytes.all.current"]) / 2**20, 1),
            "alloc_retries": after["num_alloc_retries"] - before["num_alloc_retries"],
        }
        rows.append(row)
        print(row, flush=True)
    profiles = {}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for label in ("first", "repeat"):
            engine.clear_cache()
            torch.cuda.synchronize()
            prompt = [rng.randrange(1, 256) for _ in range(args.profile)]
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                out = engine.generate([prompt], one)[0]
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
            profiles[label] = {"ttft_ms": round(out.ttft_s * 1000, 2), "table": table}
            print(f"--- {label} prompt of {args.profile} tokens: TTFT {out.ttft_s * 1000:.2f} ms\n{table}", flush=True)
    engine.shutdown()
    write(f"first_eager_{torch.cuda.get_device_name(0).replace(' ', '_')}_{args.model}"
          f"{'_' + args.tag if args.tag else ''}.json",
          {"model": args.model, "cuda_module_loading": os.environ.get("CUDA_MODULE_LOADING", "(default: LAZY)"),
           "rows": rows, "profiles": profiles})


if __name__ == "__main__":
    main()
