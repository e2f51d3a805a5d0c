"""In-model sweep of ``gemv.LAUNCHES`` entries on batch-1 decode (H100).

The cold sweep (``sweep_gemv.py``) times each matrix's GEMV alone with its weights out of
L2; in the model, under programmatic launch, a kernel's first tiles load while its
predecessor finishes, which moves the best shapes. This keeps one engine, and per variant
(one matrix's launch shape changed) recaptures the decode graphs and times greedy batch-1
decode (median of 3 runs of 160 tokens), in two rounds, the second in reverse order.

    python benchmarks/sweep_gemv_in_model.py llama-1b          # every candidate
    python benchmarks/sweep_gemv_in_model.py llama-1b combos   # the table vs the chosen combination

Writes launch_sweep_<model>.json to $OUT (or here). A different tile width sums K in another
order, so near-tie greedy tokens may differ between variants (random weights).
"""
import json
import os
import sys

import torch
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.model import gemv
from ultrakv.node.model.gemv import GemvLaunch as G

model = sys.argv[1]
base = dict(gemv.LAUNCHES)
if model == "llama-8b":
    cands = {
        "qkv": ((4096, 6144, False), [G(8192, 4, 1, 4), G(16384, 4, 2, 4), G(16384, 4, 3, 4), G(8192, 4, 2, 8),
                                      G(32768, 8, 2, 2)]),
        "o": ((4096, 4096, False), [G(16384, 4, 2, 2), G(8192, 4, 2, 4), G(16384, 4, 3, 2), G(32768, 8, 2, 1)]),
        "down": ((14336, 4096, False), [G(16384, 4, 2, 1), G(32768, 8, 1, 1), G(16384, 4, 1, 2), G(16384, 4, 1, 4)]),
        "gate_up": ((4096, 14336, True), [G(8192, 4, 2, 4), G(16384, 4, 1, 4)]),
    }
else:
    cands = {
        "qkv": ((2048, 3072, False), [G(16384, 4, 2, 2), G(8192, 4, 2, 4), G(16384, 4, 1, 4), G(4096, 4, 1, 8)]),
        "o": ((2048, 2048, False), [G(16384, 4, 2, 2), G(8192, 4, 2, 4), G(4096, 4, 1, 8)]),
        "gate_up": ((2048, 8192, True), [G(16384, 4, 1, 2), G(8192, 4, 2, 4), G(16384, 4, 2, 2), G(8192, 4, 1, 8)]),
        "down": ((8192, 2048, False), [G(16384, 4, 1, 2), G(16384, 4, 2, 1), G(32768, 8, 1, 1), G(8192, 4, 2, 4)]),
    }
# The table's llama-1b MLP entries come from this sweep; "cold" times the table without them
# (those matrices at the default shape), as the sweep that chose them started from.
IN_MODEL = {(2048, 8192, True), (8192, 2048, False)}
variants = {"base": {}}
if model == "llama-1b":
    base = {k: v for k, v in base.items() if k not in IN_MODEL}
    variants["combo"] = {(2048, 8192, True): G(8192, 4, 1, 8), (8192, 2048, False): G(16384, 4, 1, 2)}
if len(sys.argv) > 2:  # only the combos
    cands = {}
for name, (key, shapes) in cands.items():
    for s in shapes:
        variants[f"{name}:{s.tile_elems}/{s.num_warps}/{s.num_stages}/{s.programs_per_sm}"] = {key: s}
engine = Engine(EngineConfig(model=model, device="cuda", max_num_seqs=4, max_model_len=2048, num_scheduler_steps=32))
greedy = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
prompt = [[(7 * j) % 250 + 1 for j in range(128)]]
res = {}
ref = None
order = list(variants)
for rnd in range(2):
    for v in (order if rnd == 0 else order[::-1]):
        gemv.LAUNCHES.clear()
        gemv.LAUNCHES.update({**base, **variants[v]})
        engine.runner.graphs.graphs.clear()
        torch.cuda.synchronize()
        engine.runner.graphs.pool = torch.cuda.graph_pool_handle()
        engine.generate(prompt, greedy)
        runs = []
        for _ in range(3):
            out = engine.generate(prompt, greedy)[0]
            runs.append(1e3 * (out.latency_s - out.ttft_s) / 159)
            # Another tile width sums K in another order: near-tie greedy tokens may differ.
        res.setdefault(v, []).append(sorted(runs)[1])
        print(f"{model} {v:28s} {sorted(runs)[1]:.4f} ms/token", flush=True)
summary = {v: sum(r) / len(r) for v, r in res.items()}
print(json.dumps({"model": model, "mean_ms_per_token": summary}))
with open(os.path.join(os.environ.get("OUT", "."), f"launch_sweep_{model}.json"), "w") as f:
    json.dump({"model": model, "ms_per_token": res}, f, indent=1)
