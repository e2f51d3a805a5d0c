"""Cold-prompt TTFT by prompt length, and greedy parity of a prompt run in replayed steps.

A lone prefill of up to ``GRAPH_PREFILL_STEPS`` prefill graphs goes in graph-sized replayed
steps, a longer one in one eager step (node/scheduler.py). This measures where each side of
that line stands: for each length, ``--repeats`` prompts of random ids, each after
``clear_cache()`` (nothing cached), with one output token; then the greedy tokens of one
prompt inside the replayed range against an engine without CUDA graphs (all eager).

    python benchmarks/bench_cold_prefill.py --model llama-1b --device cuda

Writes benchmarks/results/cold_prefill_<device>_<model>.json.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import summary, write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402
from ultrakv.node.scheduler import GRAPH_PREFILL_STEPS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 800, 1024, 1100, 1400, 1536, 1600, 2000, 2300])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--parity-length", type=int, default=1400)
    args = p.parse_args()
    config = dict(model=args.model, device=args.device, max_num_seqs=256, max_num_batched_tokens=8192,
                  max_model_len=4096)
    engine = Engine(EngineConfig(**config))
    engine.warmup()
    rng = random.Random(1)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.generate([[rng.randrange(1, 256) for _ in range(300)]], one)
    graph_tokens = engine.scheduler.graph_prefill_tokens
    by_length = {}
    for length in args.lengths:
        ttfts = []
        for _ in range(args.repeats):
            engine.clear_cache()
            out = engine.generate([[rng.randrange(1, 256) for _ in range(length)]], one)[0]
            ttfts.append(out.ttft_s * 1000)
        replayed = 0 < graph_tokens and length <= GRAPH_PREFILL_STEPS * graph_tokens
        by_length[length] = {"ttft_ms": ttfts, "ttft_ms_summary": summary(ttfts),
                             "steps": "replayed" if replayed else "eager"}
        print(f"{length:5d} tokens ({by_length[length]['steps']}): TTFT ms {[round(t, 2) for t in ttfts]}", flush=True)
    prompt = [rng.randrange(1, 256) for _ in range(args.parity_length)]
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    engine.clear_cache()
    ours = engine.generate([prompt], greedy)[0].token_ids
    engine.shutdown()
    del engine
    gc.collect()
    eager = Engine(EngineConfig(**config, use_cuda_graphs=False))
    theirs = eager.generate([prompt], greedy)[0].token_ids
    eager.shutdown()
    print(f"parity, {args.parity_length} tokens, graphs vs eager: {ours == theirs}")
    write(f"cold_prefill_{args.device.split(':')[0]}_{args.model}.json", {
        "model": args.model, "graph_prefill_tokens": graph_tokens, "graph_prefill_steps": GRAPH_PREFILL_STEPS,
        "by_length": by_length,
        "parity": {"length": args.parity_length, "equal": ours == theirs, "graphs": ours, "eager": theirs},
    })


if __name__ == "__main__":
    main()
