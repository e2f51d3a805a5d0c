"""The one-token GEMV's launch shapes, swept with the weights cold, per matrix of a model.

``bench_kernels_ab.py`` times each projection on one weight matrix replayed over and over;
the smaller ones (llama-1b's o and down, 8-34 MB) then sit in the H100's 50 MB L2, so its
sweep rewarded shapes that read from L2 (down at 5 TB/s, faster than HBM). In a decode step
every weight comes from HBM once. Here each timed replay runs the GEMV over enough copies of
the matrix (at least ``--cold-mb``, 4x L2 by default) that no copy is still in L2 when it
comes round again, and reports time per matrix and GB/s of weight read, for cuBLAS
(``F.linear``) and for every distinct Triton launch shape (tile elements, warps, pipeline
stages, programs per SM). The best shape per matrix goes into ``gemv.LAUNCHES`` by hand,
with these figures as its reason.

Writes ``gemv_sweep_<gpu>.json`` to $ULTRAKV_RESULTS_DIR (benchmarks/results by default).
Usage: python benchmarks/sweep_gemv.py [--models llama-1b llama-8b] [--cold-mb 200] [--matrices o down]
       [--tiles 8192 16384] [--warps 4] [--stages 1] [--programs-per-sm 1 2 4]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import machine, write  # noqa: E402
from ultrakv.node.model import gemv  # noqa: E402
from ultrakv.node.model.presets import preset_config  # noqa: E402

TILES, WARPS, STAGES, PROGRAMS_PER_SM = (4096, 8192, 16384, 32768), (4, 8), (1, 2, 3), (1, 2, 4, 8)


def matrices(model: str) -> list[tuple[str, int, int, bool]]:
    """(name, K, output rows, fused SwiGLU) of each projection a decode step runs at one token."""
    c = preset_config(model)
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    return [("qkv", c.hidden_size, qkv, False),
            ("o", c.num_attention_heads * c.head_dim, c.hidden_size, False),
            ("gate_up", c.hidden_size, c.intermediate_size, True),
            ("down", c.intermediate_size, c.hidden_size, False),
            ("lm_head", c.hidden_size, c.vocab_size, False)]


def replay_us(fn, copies: int) -> float:
    """Microseconds per matrix of ``fn`` (which runs over ``copies`` matrices), CUDA graph."""
    import triton.testing

    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=100) / copies


def shapes(rows: int, k: int, num_sms: int, grid: tuple) -> list[gemv.GemvLaunch]:
    """Every launch shape in ``grid`` (tiles, warps, stages, programs per SM), one per
    distinct compiled kernel and grid."""
    seen, out = set(), []
    for tile, warps, stages, pps in itertools.product(*grid):
        block_n = gemv._block_n(rows, num_sms, pps)
        block_k = max(16, min(1 << (k - 1).bit_length(), tile // block_n))
        key = (block_n, block_k, warps, stages)
        if key not in seen:
            seen.add(key)
            out.append(gemv.GemvLaunch(tile, warps, stages, pps))
    return out


def sweep_matrix(k: int, rows: int, silu: bool, cold_mb: float, grid: tuple) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    n = 2 * rows if silu else rows
    mb = n * k * 2 / 1e6
    copies = max(1, math.ceil(cold_mb / mb))
    x = torch.randn(1, k, device=dev, dtype=dt)
    ws = [torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for _ in range(copies)]

    def cublas():
        for w in ws:
            torch.nn.functional.linear(x, w)

    def triton_gemv():
        for w in ws:
            gemv.gemv(x, w, silu=silu)

    row = {"k": k, "rows": rows, "silu": silu, "weight_mb": mb, "copies": copies,
           "cublas_us": replay_us(cublas, copies)}
    default, gemv.LAUNCHES = gemv.LAUNCH, {}
    try:
        row["default_us"] = replay_us(triton_gemv, copies)
        row["sweep"] = []
        for launch in shapes(rows, k, torch.cuda.get_device_properties(dev).multi_processor_count, grid):
            gemv.LAUNCH = launch
            try:
                us = replay_us(triton_gemv, copies)
            except Exception as exc:  # a shape the compiler refuses (shared memory)
                us = f"failed: {type(exc).__name__}"
            row["sweep"].append({**launch.__dict__, "us": us})
    finally:
        gemv.LAUNCH = default
    timed = [r for r in row["sweep"] if isinstance(r["us"], float)]
    row["best"] = min(timed, key=lambda r: r["us"])
    for key in ("cublas", "default"):
        row[f"{key}_tbps"] = mb / row[f"{key}_us"]
    row["best_tbps"] = mb / row["best"]["us"]
    ws.clear()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["llama-1b", "llama-8b"])
    ap.add_argument("--cold-mb", type=float, default=200.0)
    ap.add_argument("--matrices", nargs="+", default=None, help="qkv o gate_up down lm_head (default: all)")
    ap.add_argument("--tiles", nargs="+", type=int, default=list(TILES))
    ap.add_argument("--warps", nargs="+", type=int, default=list(WARPS))
    ap.add_argument("--stages", nargs="+", type=int, default=list(STAGES))
    ap.add_argument("--programs-per-sm", nargs="+", type=int, default=list(PROGRAMS_PER_SM))
    args = ap.parse_args()
    grid = (args.tiles, args.warps, args.stages, args.programs_per_sm)
    gpu = machine().get("gpu", "cpu").replace(" ", "_").replace("/", "_")
    name = f"gemv_sweep_{gpu}.json"
    results: dict = {"benchmark": "gemv_sweep", "machine": machine(), "cold_mb": args.cold_mb, "models": {}}
    for model in args.models:
        results["models"][model] = {}
        for label, k, rows, silu in matrices(model):
            if args.matrices and label not in args.matrices:
                continue
            row = sweep_matrix(k, rows, silu, args.cold_mb, grid)
            results["models"][model][label] = row
            print(f"{model} {label} [{rows}{'x2' if silu else ''}, {k}] {row['weight_mb']:.0f} MB: cuBLAS "
                  f"{row['cublas_us']:.1f} us ({row['cublas_tbps']:.2f} TB/s), triton default "
                  f"{row['default_us']:.1f} ({row['default_tbps']:.2f}), best {row['best']['us']:.1f} "
                  f"({row['best_tbps']:.2f}) at {row['best']}", flush=True)
            write(name, results)


if __name__ == "__main__":
    main()
