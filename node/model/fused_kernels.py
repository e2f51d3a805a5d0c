"""Triton kernels that fuse the small element-wise ops of a decoder layer.

At batch 1 a decode step of a 1B model is mostly small kernels, not weight reads: each RMSNorm
in PyTorch is a cast, the norm, a cast back and a multiply, each residual add is one more,
RoPE is three, SwiGLU's activation two. Inside a CUDA graph every one still costs a few
microseconds. These kernels do each group in one pass over the row:

* :func:`rms_norm` - ``residual += x`` (optional) then RMSNorm, in place on ``residual``;
* :func:`rope_` - rotate the query and key heads of the fused qkv output in place;
* :func:`silu_and_mul` - SwiGLU's ``silu(gate) * up`` from the fused gate/up output.

Arithmetic is float32 inside, rounded once to the tensor's dtype (PyTorch rounds after each
op, so results may differ in the last bit; ``tests/test_fused_kernels.py`` bounds this against
the PyTorch ops the model uses otherwise). Grids depend on shapes only, so every launch is
CUDA-graph capturable. Imported only when the model switches them on (Triton must be there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from ultrakv.node import grid_dependency
from ultrakv.node.grid_dependency import await_predecessor


@triton.jit
def _rms_norm_kernel(
    X, RES, W, OUT,
    stride_x, stride_res, stride_out,
    N, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    await_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The residual stream is kept in the model's dtype, as the unfused ops keep it.
        r = tl.load(RES + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(RES + row * stride_res + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / N + eps)
    normed = (xf * rstd).to(X.dtype.element_ty)
    w = tl.load(W + offs, mask=mask, other=0.0)
    tl.store(OUT + row * stride_out + offs, (normed.to(tl.float32) * w.to(tl.float32)).to(OUT.dtype.element_ty),
             mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of ``x`` [T, N] (or of ``residual + x``, stored back into ``residual``)."""
    t, n = x.shape
    out = torch.empty_like(x)
    if t == 0:
        return out
    if residual is not None and (residual.shape != x.shape or residual.stride(-1) != 1):
        raise ValueError(f"residual must be a row-major {tuple(x.shape)} tensor, got {tuple(residual.shape)}")
    res = residual if residual is not None else x
    block = triton.next_power_of_2(n)
    pdl = grid_dependency.enabled(x.device)
    _rms_norm_kernel[(t,)](
        x, res, weight, out,
        x.stride(0), res.stride(0), out.stride(0),
        n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl,
        num_warps=min(16, max(1, block // 256)), launch_pdl=pdl,
    )
    return out


@triton.jit
def _rope_kernel(
    QK, COS, SIN,
    stride_t, stride_h, stride_cs,
    HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, HALF)
    base = QK + t * stride_t + h * stride_h
    x1 = tl.load(base + offs).to(tl.float32)
    x2 = tl.load(base + HALF + offs).to(tl.float32)
    # The tables repeat cos over both halves and carry the rotation's sign in sin's first half.
    c1 = tl.load(COS + t * stride_cs + offs).to(tl.float32)
    c2 = tl.load(COS + t * stride_cs + HALF + offs).to(tl.float32)
    s1 = tl.load(SIN + t * stride_cs + offs).to(tl.float32)
    s2 = tl.load(SIN + t * stride_cs + HALF + offs).to(tl.float32)
    # Explicit fmas: the compiler may contract a * b + c either way round, and the RoPE fused
    # into the KV write (attention/triton_kernels.py) must round exactly as this one does.
    tl.store(base + offs, tl.fma(x1, c1, x2 * s1).to(QK.dtype.element_ty))
    tl.store(base + HALF + offs, tl.fma(x2, c2, x1 * s2).to(QK.dtype.element_ty))


def rope_(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``qk`` [T, heads, D] in place by per-token ``cos``/``sin`` [T, D] (the signed
    tables of ``RotaryEmbedding.cos_sin``); returns ``qk``. D must be a power of two."""
    t, heads, d = qk.shape
    if d & (d - 1) or qk.stride(-1) != 1:
        raise ValueError(f"head_dim must be a power of two with unit stride, got {d} (stride {qk.stride(-1)})")
    if t == 0:
        return qk
    cos, sin = cos.reshape(t, d), sin.reshape(t, d)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        raise ValueError("cos and sin must be row-major with the same layout")
    _rope_kernel[(t, heads)](qk, cos, sin, qk.stride(0), qk.stride(1), cos.stride(0), HALF=d // 2, num_warps=1)
    return qk


@triton.jit
def _silu_mul_kernel(
    X, OUT,
    stride_x, stride_out,
    N, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + N + offs, mask=mask, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate))
    tl.store(OUT + row * stride_out + offs, (act * up).to(OUT.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[:, :N]) * x[:, N:]`` for ``x`` [T, 2N] -> [T, N]."""
    t, two_n = x.shape
    n = two_n // 2
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    if x.stride(-1) != 1:
        raise ValueError("x must have unit stride in its last dimension")
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(n, block))](x, out, x.stride(0), out.stride(0), n, BLOCK=block, num_warps=4)
    return out
