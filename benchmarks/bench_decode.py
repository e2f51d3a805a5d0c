"""Decode speed against decode steps per scheduling round (``num_scheduler_steps``).

For each batch size, every request gets the same prompt length and the same number of new
tokens (greedy, no EOS), so after the prefill the engine runs pure decode rounds. Reported
per (batch, steps): decode tokens/s (tokens after the first, over the time after the
first token), milliseconds per step, and scheduling rounds, i.e. host syncs.

CPU default: the ``tiny`` preset, where the host's per-step work is most of a step. On a GPU
(``--device cuda --model llama-1b``) the same table shows how much of batch-1 decode the
host costs once the step itself is a CUDA graph replay.

Usage: python benchmarks/bench_decode.py [--model tiny] [--device cpu] [--batches 1 8 64]
       [--steps 1 2 4 8] [--new-tokens 128] [--fused-kernels]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402


def measure(engine: Engine, batch: int, prompt_len: int, new_tokens: int, repeats: int, seed: int) -> dict:
    rng = random.Random(seed)
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    engine.generate([[rng.randrange(1, 256) for _ in range(prompt_len)] for _ in range(batch)], sp)  # warm-up
    runs = []
    for _ in range(repeats):
        before = engine.stats()["tokens"]
        prompts = [[rng.randrange(1, 256) for _ in range(prompt_len)] for _ in range(batch)]
        t0 = time.perf_counter()
        outs = engine.generate(prompts, sp)
        wall = time.perf_counter() - t0
        first = max(o.ttft_s for o in outs)  # every request's first token is out by then
        after = engine.stats()["tokens"]
        runs.append(
            {
                "decode_tokens_per_s": batch * (new_tokens - 1) / (wall - first),
                "ms_per_step": 1e3 * (wall - first) / (new_tokens - 1),
                "schedules": after["schedules"] - before["schedules"],
                "steps": after["steps"] - before["steps"],
            }
        )
    runs.sort(key=lambda r: r["decode_tokens_per_s"])
    return runs[len(runs) // 2]  # the median run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--fused-kernels", action=argparse.BooleanOptionalAction, default=False,
                    help="Triton kernels for norm + residual, RoPE and SwiGLU (CUDA only)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    engine = Engine(
        EngineConfig(
            model=args.model,
            device=args.device,
            max_num_seqs=max(args.batches),
            max_model_len=4096,
            fused_kernels=args.fused_kernels,
        )
    )
    engine.warmup()
    results: dict = {
        "benchmark": "decode_steps",
        "model": engine.model_name,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "attention_backend": engine.attention_backend,
        "cuda_graphs": engine.cuda_graphs,
        "fused_kernels": args.fused_kernels,
        "machine": machine(),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "runs": [],
    }
    for batch in args.batches:
        for steps in args.steps:
            engine.num_scheduler_steps = steps  # read at every scheduling round
            r = measure(engine, batch, args.prompt_tokens, args.new_tokens, args.repeats, seed=batch)
            r.update(batch=batch, num_scheduler_steps=steps)
            results["runs"].append(r)
            print(
                f"batch {batch:4d} steps {steps}: {r['decode_tokens_per_s']:9.1f} tok/s "
                f"{r['ms_per_step']:7.3f} ms/step  {r['schedules']} rounds for {r['steps']} steps",
                flush=True,
            )
    for batch in args.batches:
        by_steps = {r["num_scheduler_steps"]: r for r in results["runs"] if r["batch"] == batch}
        if 1 in by_steps:
            base = by_steps[1]["decode_tokens_per_s"]
            results.setdefault("speedup_vs_one_step", {})[str(batch)] = {
                str(k): r["decode_tokens_per_s"] / base for k, r in sorted(by_steps.items())
            }
    device = "cpu" if engine.device.type == "cpu" else machine().get("gpu", "gpu").replace(" ", "_")
    fused = "_fused" if args.fused_kernels else ""
    write(args.out or f"decode_steps_{device}_{engine.model_name}{fused}.json", results)


if __name__ == "__main__":
    main()
