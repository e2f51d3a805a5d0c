"""llama-1b's projections at a turn's row counts: cuBLAS (``F.linear``) against a Triton
product over a grid of launch shapes, the weights cold (copies over about 200 MB, as a
forward meets them layer after layer), each timed as a CUDA graph of one product per copy.
Writes ``gemm_sweep_<gpu>.json``: per matrix and row count, cuBLAS's time, the best launch
shape's and the five next best.

Why it was tried: at 200-256 rows (a returning session's turn) llama-1b's projections sit
between the weight read and the arithmetic, and cuBLAS's heuristic tiles look wasteful there
(gate/up at 256 rows: 148 tiles of 128x224 on 132 SMs, two waves with the second nearly
empty; the down projection: 64x64 tiles). The Triton product below takes any tile and a
split of K (each program stores its float32 partial; the last program of a tile to arrive
adds them and writes it, in the same launch, as the attention kernels merge context slices).

What it showed on an H100 (gemm_sweep_<gpu>.json, 2026-11-25): cuBLAS is ahead at every
matrix and row count but gate/up at 128 rows (32.0 against 32.7 us): qkv 12.3-15.9 us
against 8.2-11.8, o 9.9-13.4 against 7.0-10.6, down 22.6-36.9 against 19.4-34.0, gate/up
35.9 against 35.1 at 256 rows. So the model keeps cuBLAS, and this kernel stays here.

Usage: python benchmarks/sweep_gemm.py [--models llama-1b] [--rows 128 208 256 512]  (CUDA)
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from common import machine, write  # noqa: E402


@dataclass(frozen=True)
class GemmLaunch:
    """Launch shape: the output tile, K per inner step, how many programs share K (``split_k``),
    warps, pipeline depth, and how many row tiles a group of programs walks before the next
    column tile (the weights' tiles stay in L2 for the group's row tiles)."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8


@triton.jit
def _gemm_kernel(
    X, W, Y, PART, ARRIVED,
    M, N, stride_xm, stride_wn, stride_ym,
    K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pm = first_m + (pid % in_group) % group_size
    pn = (pid % in_group) // group_size
    # Rows and columns past the matrix read row M-1 / N-1 again (no masks on the loads);
    # the store masks them.
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    cols = tl.minimum(offs_n, N - 1).to(tl.int64)
    k_steps: tl.constexpr = K // (SPLIT_K * BLOCK_K)  # can_run: K % (SPLIT_K * BLOCK_K) == 0
    offs_k = split * k_steps * BLOCK_K + tl.arange(0, BLOCK_K)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + cols[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(k_steps):
        x = tl.load(x_ptrs)
        w = tl.load(w_ptrs)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = Y + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask)
    else:
        # Partials at [SPLIT_K, M, N] float32; the tile's last program to arrive sums them.
        tile = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(PART + split * M * N + tile, acc, mask=mask)
        tl.debug_barrier()
        counter = ARRIVED + pm * num_n + pn
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(PART + s * M * N + tile, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter, 0, sem="relaxed")


_SCRATCH: dict[tuple[torch.device, str], torch.Tensor] = {}


def _scratch(device: torch.device, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A buffer per device that only grows (the counters start at zero and the merging program
    zeroes its own; a graph captures the buffer it was given, so growth never frees one a
    captured graph still uses: the old tensor stays referenced by the graph's pool)."""
    key = (device, name)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = torch.zeros(numel, dtype=dtype, device=device)
        _SCRATCH[key] = buf
    return buf


def can_run(x: torch.Tensor, weight: torch.Tensor, launch: GemmLaunch) -> bool:
    """Whether :func:`linear` takes this product: 2-D contiguous rows, a contiguous weight of
    the same dtype, and K a multiple of the split's steps."""
    k = x.shape[-1]
    return (x.dim() == 2 and x.stride(-1) == 1 and weight.is_contiguous() and x.dtype == weight.dtype
            and k == weight.shape[1] and k % (launch.split_k * launch.block_k) == 0)


def linear(x: torch.Tensor, weight: torch.Tensor, launch: GemmLaunch) -> torch.Tensor:
    """``x @ weight.T`` ([M, K] x [N, K] -> [M, N]) in one launch of shape ``launch``."""
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    tiles_m, tiles_n = triton.cdiv(m, launch.block_m), triton.cdiv(n, launch.block_n)
    if launch.split_k > 1:
        part = _scratch(x.device, "part", launch.split_k * m * n, torch.float32)
        arrived = _scratch(x.device, "arrived", tiles_m * tiles_n, torch.int32)
    else:
        part = arrived = y  # not read
    _gemm_kernel[(tiles_m * tiles_n, launch.split_k)](
        x, weight, y, part, arrived, m, n, x.stride(0), weight.stride(0), y.stride(0),
        K=k, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k,
        SPLIT_K=launch.split_k, GROUP_M=launch.group_m,
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return y


MATRICES = {
    "llama-1b": {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192)},
    "llama-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
}
TILES = ((64, 64, 4), (64, 128, 4), (64, 256, 8), (128, 64, 4), (128, 128, 8), (128, 256, 8), (128, 128, 4))


def launches(k: int) -> list[GemmLaunch]:
    out = []
    for (bm, bn, warps), stages, split in itertools.product(TILES, (3, 4), (1, 2, 4, 8)):
        launch = GemmLaunch(bm, bn, 64, split, warps, stages, 8)
        if k % (split * 64) == 0 and k // split >= 256:
            out.append(launch)
    return out


def graph_us(fn, copies: int, replays: int = 20) -> float:
    """Microseconds per product: ``fn`` (one product per weight copy) captured as a graph,
    replayed, the median replay over ``copies``."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / copies)
    return statistics.median(times)


def sweep(model: str, rows: list[int]) -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    out: dict = {}
    for name, (n, k) in MATRICES[model].items():
        copies = max(2, math.ceil(200e6 / (n * k * 2)))
        ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
        for m in rows:
            x = torch.randn(m, k, device=dev, dtype=dt)
            ref = F.linear(x, ws[0]).float()
            row: dict = {"cublas_us": graph_us(lambda x=x, ws=ws: [F.linear(x, w) for w in ws], copies), "shapes": []}
            t0 = time.monotonic()
            for launch in launches(k):
                try:
                    y = linear(x, ws[0], launch).float()
                    err = ((y - ref).abs().max() / ref.abs().max()).item()
                    us = graph_us(lambda x=x, ws=ws, launch=launch: [linear(x, w, launch) for w in ws], copies)
                except Exception as e:  # out of shared memory for this tile and depth
                    row["shapes"].append({"launch": launch.__dict__, "error": type(e).__name__})
                    continue
                row["shapes"].append({"launch": launch.__dict__, "us": us, "rel_err": err})
            timed = sorted((s for s in row["shapes"] if "us" in s), key=lambda s: s["us"])
            row["shapes"] = timed[:6] + [s for s in row["shapes"] if "error" in s]
            best = timed[0] if timed else None
            row["best"] = best
            row["speedup"] = row["cublas_us"] / best["us"] if best else None
            out[f"{name}_m{m}"] = row
            print(f"{model} {name} m={m}: cuBLAS {row['cublas_us']:.1f} us, best {best['us']:.1f} us "
                  f"{best['launch']} (err {best['rel_err']:.1e}) [{time.monotonic() - t0:.0f}s]", flush=True)
        ws.clear()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["llama-1b"])
    ap.add_argument("--rows", nargs="+", type=int, default=[128, 208, 256, 512])
    args = ap.parse_args()
    res: dict = {"benchmark": "gemm_sweep", "machine": machine(), "rows": args.rows, "us": {}}
    for model in args.models:
        res["us"][model] = sweep(model, args.rows)
    write(f"gemm_sweep_{res['machine'].get('gpu', 'cpu').replace(' ', '_')}.json", res)


if __name__ == "__main__":
    main()
