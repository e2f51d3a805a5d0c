"""CPU benchmark: the engine vs transformers generate() on smollm2-135m, float32, batch 1 and 8.

Both run the same weights (transformers reads the checkpoint the engine converted from the
GGUF) on the same threads. Each case generates ``--new-tokens`` tokens per sequence after a
short chat prompt, EOS ignored, greedy; the engine gets the prompts as one continuous batch,
transformers as one left-padded batch. Runs alternate engine / transformers ``--repeats``
times (A B A B ...: both see the same load) and the medians are reported, with each pair's
ratio and the median of those ratios (the dev machine is shared, so single runs are noisy),
by the wall clock and by process CPU time (``cpu_time_*``, see Rate); the load average
before each pair is recorded beside it. Writes benchmarks/results/smollm2_cpu.json
(or ``--output``).

Usage: python benchmarks/bench_smollm2_cpu.py [--new-tokens 64] [--repeats 3] [--profile] [--output NAME]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import load_average, write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402
from ultrakv.node.model.gguf_checkpoint import converted_checkpoint  # noqa: E402
from ultrakv.node.model.packaged import PACKAGED  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain recursion in one sentence.",
    "How many legs does a spider have?",
    "Name a famous painting.",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Rate:
    """Tokens per second of one run by the wall clock and by this process's CPU time (every
    thread's). CPU time leaves out the time other processes held the cores: on the shared
    machine it is the steadier of the two (threads spinning at a barrier still count)."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def done(self, tokens: int) -> tuple[float, float]:
        return tokens / (time.perf_counter() - self.wall), tokens / (time.process_time() - self.cpu)


def engine_run(engine: Engine, chats: list[list[dict]], new_tokens: int) -> tuple[float, float]:
    sp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    rate = Rate()
    outs = engine.generate(chats, sp)
    assert all(o.completion_tokens == new_tokens for o in outs)
    return rate.done(sum(o.completion_tokens for o in outs))


@torch.no_grad()
def hf_run(model, tok, chats: list[list[dict]], new_tokens: int) -> tuple[float, float]:
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    rate = Rate()
    out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    return rate.done((out.shape[1] - batch["input_ids"].shape[1]) * len(chats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--profile", action="store_true", help="print the engine's torch profile at the largest batch")
    ap.add_argument("--output", default="smollm2_cpu.json", help="file name under benchmarks/results/")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    packaged = PACKAGED["smollm2-135m"]
    engine = Engine(EngineConfig(model=packaged.name, device="cpu", dtype="float32", max_num_seqs=max(args.batches)))
    directory = converted_checkpoint(packaged.locate(), packaged.sha256)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(directory))
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or "<|endoftext|>"
    log(f"loaded; torch threads {torch.get_num_threads()}")

    results = {}
    for batch in args.batches:
        chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(batch)]
        engine_run(engine, chats, 4)  # warm-up both
        hf_run(model, tok, chats, 4)
        ours, theirs, loads = [], [], []
        for _ in range(args.repeats):
            loads.append(load_average())
            engine.clear_cache()  # every run prefills its prompts
            ours.append(engine_run(engine, chats, args.new_tokens))
            theirs.append(hf_run(model, tok, chats, args.new_tokens))
        result = {"load_average_before_runs": loads}
        for clock, i in (("", 0), ("cpu_time_", 1)):
            e, h = statistics.median(r[i] for r in ours), statistics.median(r[i] for r in theirs)
            ratios = [a[i] / b[i] for a, b in zip(ours, theirs, strict=True)]
            result.update({
                f"{clock}engine_tokens_per_s": e, f"{clock}transformers_tokens_per_s": h, f"{clock}speedup": e / h,
                f"{clock}median_pair_speedup": statistics.median(ratios), f"{clock}pair_speedups": ratios,
                f"{clock}engine_runs": [r[i] for r in ours], f"{clock}transformers_runs": [r[i] for r in theirs],
            })
            log(f"batch {batch} ({clock or 'wall_'}clock): engine {e:.1f} tok/s, transformers {h:.1f} tok/s, "
                f"x{e / h:.2f} (median pair x{statistics.median(ratios):.2f}, load {loads[0][0]}..{loads[-1][0]})")
        results[f"batch_{batch}"] = result

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        batch = max(args.batches)
        chats = [[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(batch)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine_run(engine, chats, 32)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    write(args.output, {
        "model": "smollm2-135m (SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32)",
        "dtype": "float32",
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "peer": "transformers generate() (greedy, left-padded batch, same weights)",
        "results": results,
    })


if __name__ == "__main__":
    main()
