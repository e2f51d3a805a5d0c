"""Triton matrix-vector products for one token (decode at batch 1), with the small ops around
them fused in, so a decoder layer is six launches instead of ten.

At batch 1 every projection is a GEMV: the whole weight matrix is read for one row of
output. cuBLAS reads the MLP matrices at 2.4-2.9 TB/s on an H100 but the small q/k/v and o
ones at 1.3-1.9, and around them sit the residual add + RMSNorm, the SwiGLU activation and
cuBLAS's own split-K reduce, each a launch of a few microseconds. Here:

* :func:`norm_gemv`: ``residual += x`` (optional), RMSNorm, then ``W @ normed``: each program
  recomputes the row's norm (the row is a few KiB) and one program writes the new residual
  stream, to a separate buffer (the others still read the old one);
* :func:`gemv`: ``W @ x`` (+ bias);
* ``silu=True``: ``W`` is the fused gate/up matrix ``[2N, K]``; each program takes rows
  ``i`` of both halves and writes ``silu(gate) * up`` (the SwiGLU activation, no [2N] output).

Each program owns ``BLOCK_N`` output rows (a few) and streams their weights along K in tiles
of ``BLOCK_N x BLOCK_K`` elements (16 KiB by default: contiguous rows, 16-byte vector loads);
there is no split over K, so no reduce launch: the row blocks are sized so that several
programs per SM run and keep enough loads in flight. Arithmetic is float32, rounded as the
unfused ops round (the residual sum and the normed row to the model dtype before the weight
multiplies). Grids depend on shapes only, so everything is CUDA-graph capturable. Chosen by
``ULTRAKV_KERNELS=gemv=triton`` (``node/kernel_variants.py``; cuBLAS stays the default until
GPU figures say otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from ultrakv.node import grid_dependency
from ultrakv.node.grid_dependency import await_predecessor


@dataclass(frozen=True)
class GemvLaunch:
    """Launch shape: weight elements per tile (a program's loads in flight per step along K:
    HBM needs tens of KiB in flight per SM, so tiles are wide and the row blocks narrow),
    warps, pipeline depth, and the programs per SM the row blocks are sized for. Tuned on an
    H100 (``benchmarks/bench_kernels_ab.py`` sweeps 36 shapes per llama-1b matrix): four warps
    won for every matrix; 8192-element tiles at four programs per SM are within 5% of each
    matrix's best (qkv 4.1 us against cuBLAS's 5.5, o 3.5 / 5.0, gate/up 25.2 / 25.2, down
    7.1 / 10.7)."""

    tile_elems: int = 8192
    num_warps: int = 4
    num_stages: int = 1
    programs_per_sm: int = 4


LAUNCH = GemvLaunch()
# Launch shapes for particular matrices, by (K, output rows, fused SwiGLU); others take LAUNCH.
# Swept on an H100 with the weights cold (``benchmarks/sweep_gemv.py``: gemv_sweep_<gpu>*.json,
# microseconds of the chosen shape vs LAUNCH): LAUNCH is within 2% of the best shape for each
# of llama-1b's layer matrices; the larger ones read fastest with wider tiles and fewer, longer
# programs.
#
# In the model (decode graphs with programmatic launch, where a kernel's first tiles load
# while its predecessor finishes) the best shapes differ from the cold isolated ones: an
# in-model sweep (benchmarks/sweep_gemv_in_model.py, results/launch_sweep_*.json)
# moved llama-1b's MLP matrices to more, shorter programs: gate/up 8192-element tiles at 8
# programs per SM (1.106 vs 1.143 ms a token), down 16384 at 2 (1.100 vs 1.143), both 1.064
# vs 1.145. llama-8b's entries held against every alternative tried there (within 0.2%).
LAUNCHES: dict[tuple[int, int, bool], GemvLaunch] = {
    (2048, 8192, True): GemvLaunch(8192, 4, 1, 8),       # llama-1b gate/up (in-model sweep)
    (8192, 2048, False): GemvLaunch(16384, 4, 1, 2),     # llama-1b down (in-model sweep)
    (2048, 128256, False): GemvLaunch(16384, 4, 2, 1),   # llama-1b lm_head: 172 vs 177
    (4096, 6144, False): GemvLaunch(16384, 4, 3, 8),     # llama-8b qkv: 18.0 vs 18.6
    (4096, 4096, False): GemvLaunch(16384, 4, 3, 1),     # llama-8b o: 11.6 vs 14.2
    (4096, 14336, True): GemvLaunch(8192, 4, 1, 8),      # llama-8b gate/up: 76.2 vs 80.0
    (14336, 4096, False): GemvLaunch(16384, 4, 1, 1),    # llama-8b down: 39.5 vs 50.6
    (4096, 128256, False): GemvLaunch(16384, 4, 1, 1),   # llama-8b lm_head: 342.9 vs 358.3
}


@triton.jit
def _input_tile(X, RES_IN, NW, k0, offs_k, K, rstd, dtype,
                NORM: tl.constexpr, RESIDUAL: tl.constexpr):
    """The input row's elements ``k0 + offs_k`` as the weights multiply them (float32 [1,
    BLOCK_K]): normed (over residual + x) when ``NORM``."""
    kmask = k0 + offs_k < K
    x = tl.load(X + k0 + offs_k, mask=kmask, other=0.0)
    if NORM:
        if RESIDUAL:
            r = tl.load(RES_IN + k0 + offs_k, mask=kmask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        nw = tl.load(NW + k0 + offs_k, mask=kmask, other=0.0)
        x = ((x.to(tl.float32) * rstd).to(dtype).to(tl.float32) * nw.to(tl.float32)).to(dtype)
    return x.to(tl.float32)[None, :]


@triton.jit
def _gemv_kernel(
    X, RES_IN, RES_OUT, NW, W, B, Y,
    K, N, eps, stride_w,
    NORM: tl.constexpr, RESIDUAL: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    offs_k = tl.arange(0, BLOCK_K)
    dtype = W.dtype.element_ty
    w_rows = W + rows.to(tl.int64)[:, None] * stride_w
    # The weights are never written while a model serves, so the first tile is loaded before
    # the wait for the previous kernel (node/grid_dependency.py): launched early, these
    # loads overlap that kernel's tail (attention, RoPE, a GEMV's last wave).
    wmask = rmask[:, None] & (offs_k < K)[None, :]
    w = tl.load(w_rows + offs_k[None, :], mask=wmask, other=0.0)
    if SILU:
        u = tl.load(w_rows + N * stride_w + offs_k[None, :], mask=wmask, other=0.0)
    await_predecessor(PDL)
    rstd = 1.0
    if NORM:
        # The row's RMS (over residual + x when adding), every program for itself.
        sq = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = k0 + offs_k < K
            x = tl.load(X + k0 + offs_k, mask=kmask, other=0.0)
            if RESIDUAL:
                r = tl.load(RES_IN + k0 + offs_k, mask=kmask, other=0.0)
                x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
                if pid == 0:
                    tl.store(RES_OUT + k0 + offs_k, x, mask=kmask)
            xf = x.to(tl.float32)
            sq += xf * xf
        rstd = 1.0 / tl.sqrt(tl.sum(sq, 0) / K + eps)
    xf = _input_tile(X, RES_IN, NW, 0, offs_k, K, rstd, dtype, NORM, RESIDUAL)
    acc = w.to(tl.float32) * xf
    if SILU:
        acc_up = u.to(tl.float32) * xf
    for k0 in range(BLOCK_K, K, BLOCK_K):
        xf = _input_tile(X, RES_IN, NW, k0, offs_k, K, rstd, dtype, NORM, RESIDUAL)
        wmask = rmask[:, None] & (k0 + offs_k < K)[None, :]
        w = tl.load(w_rows + k0 + offs_k[None, :], mask=wmask, other=0.0)
        acc += w.to(tl.float32) * xf
        if SILU:
            u = tl.load(w_rows + N * stride_w + k0 + offs_k[None, :], mask=wmask, other=0.0)
            acc_up += u.to(tl.float32) * xf
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(B + rows, mask=rmask, other=0.0).to(tl.float32)
    if SILU:
        # Rounded to the model dtype as the projection's output would be, then activated.
        gate = y.to(dtype).to(tl.float32)
        up = tl.sum(acc_up, 1).to(dtype).to(tl.float32)
        y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(Y + rows, y.to(Y.dtype.element_ty), mask=rmask)


def _block_n(n: int, num_sms: int, programs_per_sm: int) -> int:
    """Rows per program: a power of two in [4, 64] leaving ``programs_per_sm`` programs per SM."""
    b = 64
    while b > 4 and n // b < programs_per_sm * num_sms:
        b //= 2
    return b


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter runs: few, wide programs (each costs milliseconds there)
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, silu: bool = False,
            norm_weight: torch.Tensor | None = None, eps: float = 0.0,
            residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    if x.dim() != 2 or x.shape[0] != 1 or x.stride(-1) != 1:
        raise ValueError(f"x must be one contiguous row [1, K], got {tuple(x.shape)}")
    k = x.shape[1]
    rows = weight.shape[0] // 2 if silu else weight.shape[0]
    if weight.shape[1] != k or weight.stride(1) != 1 or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [N, {k}] row-major in {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    y = torch.empty(1, rows, dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(residual) if residual is not None else None
    launch = LAUNCHES.get((k, rows, silu), LAUNCH)
    pdl = grid_dependency.enabled(x.device)
    block_n = _block_n(rows, _num_sms(x.device), launch.programs_per_sm)
    block_k = max(16, min(triton.next_power_of_2(k), launch.tile_elems // block_n))
    _gemv_kernel[(triton.cdiv(rows, block_n),)](
        x, residual if residual is not None else x, res_out if res_out is not None else x,
        norm_weight if norm_weight is not None else x, weight, bias if bias is not None else x, y,
        k, rows, eps, weight.stride(0),
        NORM=norm_weight is not None, RESIDUAL=residual is not None, SILU=silu, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_K=block_k, PDL=pdl,
        num_warps=launch.num_warps, num_stages=launch.num_stages, launch_pdl=pdl,
    )
    return y, res_out


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one row ``x`` [1, K]; with ``silu`` the SwiGLU
    activation of the fused gate/up output instead (``weight`` [2N, K] -> [1, N])."""
    return _launch(x, weight, bias, silu=silu)[0]


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              weight: torch.Tensor, bias: torch.Tensor | None = None,
              silu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``residual + x`` (of ``x`` when ``residual`` is None) times ``norm_weight``,
    then :func:`gemv`. Returns the output and the residual stream (a new tensor holding
    ``residual + x``; ``x`` itself when there was no residual)."""
    y, res_out = _launch(x, weight, bias, silu=silu, norm_weight=norm_weight, eps=eps, residual=residual)
    return y, (res_out if res_out is not None else x)
