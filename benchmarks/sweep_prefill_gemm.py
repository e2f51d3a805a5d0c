"""llama-1b's projections at a returning turn's token counts (M = 64 ... 512 new tokens), cuBLAS
as the model calls it (``x @ W.T``) against the transposed product (``W @ x.T``, with and
without the copy back) and a K split in two, the weights cold (copies over 4x L2).

What it showed on an H100 (prefill_gemm_shapes_<gpu>.json): none of the alternatives beats
``F.linear``; cuBLAS's own choice varies with M (the down projection takes 26.9 us at 224
rows and 19.5 at 256), which is why the turn's prefill graph buckets matter.

``--down-rows`` instead times the down projections (llama-1b, llama-8b, smollm2-135m) at
every row count from 136 to 512 in steps of 8, as called and with the rows padded up to a
multiple of 64. On an H100 (prefill_down_rows_<gpu>.json) padding is no rule: it helps
llama-1b at 176-248 rows (224: 27.0 -> 20.1 us) but costs it up to 15 us at 264-312 (cuBLAS
is slow at 320) and costs llama-8b 4-6 us at 136-216, so the model does not pad.

Usage: python benchmarks/sweep_prefill_gemm.py [--down-rows]  (CUDA; writes to $ULTRAKV_RESULTS_DIR)
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import machine, write  # noqa: E402
from sweep_gemv import replay_us as us  # noqa: E402

MATRICES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)}
ROWS = (64, 128, 224, 256, 512)


DOWN = {"llama-1b": (2048, 8192), "llama-8b": (4096, 14336), "smollm2-135m": (576, 1536)}


def down_rows() -> None:
    """The down projections at 136..512 rows, as called and padded to a multiple of 64."""
    dev, dt = "cuda", torch.bfloat16
    res: dict = {"benchmark": "prefill_down_rows", "machine": machine(), "us": {}}
    for name, (n, k) in DOWN.items():
        ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(max(1, math.ceil(200e6 / (n * k * 2))))]
        for m in range(136, 513, 8):
            p = -(-m // 64) * 64
            x = torch.randn(p, k, device=dev, dtype=dt)
            row = {"rows": m, "padded": p,
                   "as_called": us(lambda x=x[:m], ws=ws: [F.linear(x, w) for w in ws], len(ws)),
                   "padded_us": us(lambda x=x, ws=ws: [F.linear(x, w) for w in ws], len(ws))}
            res["us"][f"{name}_m{m}"] = row
            print(name, m, p, round(row["as_called"], 1), round(row["padded_us"], 1), flush=True)
        ws.clear()
    write(f"prefill_down_rows_{res['machine'].get('gpu', 'cpu').replace(' ', '_')}.json", res)


def main() -> None:
    if "--down-rows" in sys.argv:
        down_rows()
        return
    dev, dt = "cuda", torch.bfloat16
    res: dict = {"benchmark": "prefill_gemm_shapes", "machine": machine(), "us_per_matrix": {}}
    for name, (n, k) in MATRICES.items():
        ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(max(1, math.ceil(200e6 / (n * k * 2))))]
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=dt)
            xt, h = x.t().contiguous(), k // 2
            row = {"linear": us(lambda x=x, ws=ws: [F.linear(x, w) for w in ws], len(ws)),
                   "w_at_xT": us(lambda xt=xt, ws=ws: [torch.mm(w, xt) for w in ws], len(ws)),
                   "w_at_xT_then_T_copy": us(lambda x=x, ws=ws: [torch.mm(w, x.t()).t().contiguous() for w in ws],
                                             len(ws)),
                   "split_k2": us(lambda x=x, ws=ws, h=h: [torch.addmm(F.linear(x[:, :h], w[:, :h]), x[:, h:],
                                                                        w[:, h:].t()) for w in ws], len(ws))}
            res["us_per_matrix"][f"{name}_m{m}"] = row
            print(name, m, {a: round(b, 1) for a, b in row.items()}, flush=True)
        ws.clear()
    write(f"prefill_gemm_shapes_{res['machine'].get('gpu', 'cpu').replace(' ', '_')}.json", res)


if __name__ == "__main__":
    main()
