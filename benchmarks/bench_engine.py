"""Engine benchmark on CPU with `tiny`: tokens/s and TTFT, prefix cache on vs off.

Workloads (seeded):
  * batch: 64 requests, prompts of 32..256 tokens, 64 new tokens each, all at once;
  * shared_prefix: 64 requests behind one 512-token system prompt (one warm-up request first);
  * multi_turn: 16 sessions x 4 turns of 64 new prompt tokens + 32 generated.
Each runs with prefix caching on and off. Usage: python benchmarks/bench_engine.py [--out NAME]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import summary, write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(0, 256) for _ in range(n)]


def run_batch(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict:
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, sp)
    wall = time.perf_counter() - t0
    gen = sum(o.completion_tokens for o in outs)
    return {
        "requests": len(outs),
        "wall_s": wall,
        "output_tokens_per_s": gen / wall,
        "total_tokens_per_s": (gen + sum(o.prompt_tokens for o in outs)) / wall,
        "ttft_s": summary([o.ttft_s for o in outs]),
        "cached_tokens": sum(o.cached_tokens for o in outs),
        "prompt_tokens": sum(o.prompt_tokens for o in outs),
    }


def workloads(prefix_caching: bool, seed: int) -> dict:
    def fresh() -> Engine:
        return Engine(
            EngineConfig(
                model="tiny",
                device="cpu",
                num_blocks=4096,
                max_num_seqs=64,
                max_num_batched_tokens=2048,
                enable_prefix_caching=prefix_caching,
            )
        )

    rng = random.Random(seed)
    out: dict = {}
    engine = fresh()
    engine.generate([_tokens(rng, 16)], SamplingParams(max_tokens=4))  # warm-up
    out["batch"] = run_batch(engine, [_tokens(rng, rng.randint(32, 256)) for _ in range(64)], 64)

    engine = fresh()
    system = _tokens(rng, 512)
    engine.generate([system + _tokens(rng, 8)], SamplingParams(max_tokens=4))
    out["shared_prefix"] = run_batch(engine, [system + _tokens(rng, rng.randint(8, 64)) for _ in range(64)], 32)

    engine = fresh()
    sp = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    per_turn = []
    for turn in range(4):
        sids = [f"s{i}" for i in range(16)]
        t0 = time.perf_counter()
        outs = engine.generate([_tokens(rng, 64) for _ in sids], sp, session_ids=sids)
        per_turn.append(
            {
                "turn": turn + 1,
                "wall_s": time.perf_counter() - t0,
                "ttft_s": summary([o.ttft_s for o in outs]),
                "cached_tokens": sum(o.cached_tokens for o in outs),
                "prompt_tokens": sum(o.prompt_tokens for o in outs),
            }
        )
    out["multi_turn"] = per_turn
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="engine_cpu_tiny.json")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    results = {
        "model": "tiny",
        "device": "cpu",
        "prefix_cache_on": workloads(True, args.seed),
        "prefix_cache_off": workloads(False, args.seed),
    }
    on, off = results["prefix_cache_on"], results["prefix_cache_off"]
    results["speedup_with_prefix_cache"] = {
        "shared_prefix_throughput": on["shared_prefix"]["total_tokens_per_s"]
        / off["shared_prefix"]["total_tokens_per_s"],
        "shared_prefix_ttft_p50": off["shared_prefix"]["ttft_s"]["p50"] / on["shared_prefix"]["ttft_s"]["p50"],
        "multi_turn_last_turn_ttft_p50": off["multi_turn"][-1]["ttft_s"]["p50"] / on["multi_turn"][-1]["ttft_s"]["p50"],
    }
    write(args.out, results)
    print(f"{'workload':<16}{'cache':<6}{'out tok/s':>10}{'ttft p50 ms':>13}")
    for name in ("batch", "shared_prefix"):
        for label, r in (("on", on), ("off", off)):
            print(f"{name:<16}{label:<6}{r[name]['output_tokens_per_s']:>10.0f}{r[name]['ttft_s']['p50'] * 1e3:>13.1f}")
    for label, r in (("on", on), ("off", off)):
        t = r["multi_turn"][-1]
        cached = f"cached {t['cached_tokens']}/{t['prompt_tokens']}"
        print(f"{'turn 4':<16}{label:<6}{'':>10}{t['ttft_s']['p50'] * 1e3:>13.1f}  {cached}")
    print(results["speedup_with_prefix_cache"])


if __name__ == "__main__":
    main()
