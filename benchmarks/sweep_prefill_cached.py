"""Launch shapes of the Triton prefill kernel for a returning session's turn: few new tokens
over a long cached context (Llama-3.2-1B heads: 32 q / 8 kv, head_dim 64; bf16, block size 16).

For each (new tokens, context) it times every PrefillConfig in a small grid and prints the
fastest against the default, with the output checked against the default's.

    python benchmarks/sweep_prefill_cached.py
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import asdict

import torch
import triton.testing
from ultrakv.node.attention.base import AttentionMetadata
from ultrakv.node.attention.triton_backend import PrefillConfig, TritonPagedBackend

SHAPES = [(200, 2300), (64, 4096), (500, 1000), (200, 800), (2048, 2048)]
HEADS, KV_HEADS, HEAD_DIM, PAGE = 32, 8, 64, 16


def case(q_len: int, ctx: int, dev: torch.device):
    g = torch.Generator(device=dev).manual_seed(0)
    blocks = -(-ctx // PAGE)
    kv = torch.randn(2, blocks + 8, PAGE, KV_HEADS, HEAD_DIM, device=dev, generator=g).to(torch.bfloat16)
    q = torch.randn(q_len, HEADS, HEAD_DIM, device=dev, generator=g).to(torch.bfloat16)
    table = torch.randperm(blocks + 8, device=dev, generator=g)[:blocks].to(torch.int32)[None]
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, q_len], dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([ctx], dtype=torch.int32, device=dev),
        block_tables=table,
        slot_mapping=torch.full((q_len,), -1, dtype=torch.int64, device=dev),
        max_query_len=q_len,
        max_seq_len=ctx,
    )
    return q, kv, meta


def main() -> None:
    dev = torch.device("cuda")
    grid = [PrefillConfig(m, n, w, s) for m, n, w, s in itertools.product((16, 32, 64, 128), (32, 64, 128),
                                                                             (4, 8), (2, 3))]
    results = []
    for q_len, ctx in SHAPES:
        q, kv, meta = case(q_len, ctx, dev)
        base = TritonPagedBackend()
        ref = base.prefill(q, kv, meta, 0.125)
        args = (q, kv, meta, 0.125)
        default_ms = triton.testing.do_bench(lambda be=base, a=args: be.prefill(*a))
        timed = []
        for cfg in grid:
            be = TritonPagedBackend(prefill_config=cfg)
            try:
                out = be.prefill(q, kv, meta, 0.125)
            except Exception as exc:  # a shape the compiler refuses (e.g. out of shared memory)
                print(f"  {cfg}: {type(exc).__name__}")
                continue
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            if err > 2e-2:
                print(f"  {cfg}: error {err:.3g}")
                continue
            timed.append((triton.testing.do_bench(lambda be=be, a=args: be.prefill(*a)), cfg))
        timed.sort(key=lambda t: t[0])
        best_ms, best = timed[0]
        print(f"q={q_len} ctx={ctx}: default {default_ms * 1e3:.1f} us, best {best_ms * 1e3:.1f} us {best}; "
              f"next {[(round(t * 1e3, 1), c) for t, c in timed[1:4]]}")
        results.append({"new_tokens": q_len, "context": ctx, "default_us": default_ms * 1e3,
                        "best_us": best_ms * 1e3, "best": asdict(best)})
    out = os.path.join(os.environ.get("ULTRAKV_RESULTS_DIR", "benchmarks/results"),
                       f"prefill_cached_sweep_{torch.cuda.get_device_name().replace(' ', '_')}.json")
    with open(out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": results}, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
