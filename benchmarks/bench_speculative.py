"""Speculative decoding from the context (n-gram drafts) against plain greedy decoding.

Two workloads, each at batch 1 and 16, greedy, fixed output length:

* ``repetitive``: prompts made of a repeated passage (an edit-this-code or summarize-this
  shape, where the output overlaps the prompt), so drafts exist and are often right;
* ``random``: random prompts, where drafts are rare and mostly wrong (the cost side).

Speculation runs only for greedy decode batches of at most ``speculative_max_batch``
sequences (8 by default), so batch 16 shows it switched off by load. Reports decode tokens/s,
the speed-up, and the draft acceptance rate.

    python benchmarks/bench_speculative.py --model tiny --device cpu
    python benchmarks/bench_speculative.py --model llama-1b --device cuda

Writes benchmarks/results/speculative_<device>_<model>.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402


def prompts(kind: str, n: int, vocab: int, seed: int, length: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if kind == "repetitive":
            passage = [rng.randrange(10, vocab) for _ in range(rng.randint(24, 64))]
            out.append((passage * (length // len(passage) + 1))[:length])
        else:
            out.append([rng.randrange(10, vocab) for _ in range(length)])
    return out


def run(engine: Engine, batch: list[list[int]], new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    before = engine.stats()["tokens"]
    t0 = time.perf_counter()
    outs = engine.generate(batch, params)
    seconds = time.perf_counter() - t0
    after = engine.stats()["tokens"]
    proposed = after["draft_proposed"] - before["draft_proposed"]
    accepted = after["draft_accepted"] - before["draft_accepted"]
    return {"tokens_per_s": sum(len(o.token_ids) for o in outs) / seconds, "seconds": seconds,
            "rounds": after["schedules"] - before["schedules"], "draft_proposed": proposed,
            "draft_accepted": accepted, "acceptance": accepted / proposed if proposed else 0.0,
            "outputs": [o.token_ids for o in outs]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=4, help="speculative_tokens")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = p.parse_args()
    base = {"model": args.model, "device": args.device}
    plain = Engine(EngineConfig(**base))
    spec = Engine(EngineConfig(**base, speculative_tokens=args.tokens))
    for e in (plain, spec):
        e.warmup()
    vocab = plain.model_config.vocab_size
    results = {}
    for kind in ("repetitive", "random"):
        for b in args.batches:
            batch = prompts(kind, b, vocab, seed=b, length=args.prompt_tokens)
            run(plain, batch, 8), run(spec, batch, 8)  # warm both on these shapes
            off, on = run(plain, batch, args.new_tokens), run(spec, batch, args.new_tokens)
            same = off.pop("outputs") == on.pop("outputs")
            results[f"{kind}_batch_{b}"] = {"plain": off, "speculative": on, "same_output": same,
                                            "speedup": on["tokens_per_s"] / off["tokens_per_s"]}
            print(f"{kind:10s} batch {b:3d}: plain {off['tokens_per_s']:8.1f} tok/s, speculative "
                  f"{on['tokens_per_s']:8.1f} tok/s ({on['tokens_per_s'] / off['tokens_per_s']:.2f}x), "
                  f"acceptance {on['acceptance']:.0%}, same output: {same}", flush=True)
    write(f"speculative_{args.device.split(':')[0]}_{args.model}.json",
          {"model": args.model, "device": args.device, "speculative_tokens": args.tokens,
           "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "attention_backend": plain.attention_backend, "results": results})


if __name__ == "__main__":
    main()
