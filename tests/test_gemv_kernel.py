"""The one-token Triton GEMVs (``node/model/gemv.py``: plain, with the residual add + RMSNorm
fused before, with the SwiGLU activation fused after) against the PyTorch ops they replace,
then an engine decoding through them (``ULTRAKV_KERNELS=gemv=triton``) against transformers.

Natively on CUDA (the ``gpu`` test adds llama-1b's matrix shapes in bf16). Without CUDA, where
Triton is installed, the first test reruns this file under Triton's CPU interpreter (which
rounds float32 to bfloat16 by truncation: bf16 tolerances allow two units in the last place).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import INTERPRETING, assert_passes_under_interpreter, triton_importable

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRETING else None)
needs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs CUDA, or Triton's interpreter (see the first test)")
EPS = 1e-5


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="CUDA runs the kernels natively")
@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.timeout(600)
def test_kernels_under_the_triton_interpreter():
    assert_passes_under_interpreter(__file__, at_least=5)


def _tol(dtype: torch.dtype) -> dict:
    # Different summation order than cuBLAS; bf16 / fp16 outputs round once more or less.
    return {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float16: {"rtol": 2e-3, "atol": 2e-3},
            torch.bfloat16: {"rtol": 2**-6, "atol": 2**-6}}[dtype]


def _tensors(k: int, n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, r = (torch.randn(1, k, generator=g).to(DEVICE, dtype) for _ in range(2))
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE, dtype)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    return x, r, w, b, nw


def _norm(x: torch.Tensor, nw: torch.Tensor) -> torch.Tensor:
    """What the model computes (RMSNorm.forward unfused): float32 norm, rounded, times weight."""
    return nw * F.rms_norm(x.float(), nw.shape, eps=EPS).to(x.dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gemv_with_and_without_bias(dtype):
    from ultrakv.node.model import gemv

    x, _, w, b, _ = _tensors(300, 40, dtype)  # K past one 256-wide tile, N not a multiple of the block
    torch.testing.assert_close(gemv.gemv(x, w), F.linear(x, w), **_tol(dtype))
    torch.testing.assert_close(gemv.gemv(x, w, b), F.linear(x, w, b), **_tol(dtype))


@needs_kernels
@pytest.mark.parametrize("silu", [False, True])
def test_narrow_tiles_stream_k_in_several_steps(monkeypatch, silu):
    """Tiles narrower than K (the default tiles take a small K in one step): the products, the
    norm's two passes and the residual store run over several tiles with a ragged last one."""
    from ultrakv.node.model import gemv

    monkeypatch.setattr(gemv, "LAUNCH", gemv.GemvLaunch(tile_elems=256))
    x, r, w, _, nw = _tensors(300, 48, torch.float32, seed=3)
    y, stream = gemv.norm_gemv(x, r, nw, EPS, w, silu=silu)
    ref = F.linear(_norm(x + r, nw), w)
    if silu:
        gate, up = ref.split(24, dim=-1)
        ref = F.silu(gate) * up
    torch.testing.assert_close(y, ref, **_tol(torch.float32))
    torch.testing.assert_close(stream, x + r, **_tol(torch.float32))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_gemv_adds_the_residual_into_a_new_stream(dtype):
    """``residual + x`` goes to a new tensor (the old one is still read by other programs),
    its RMSNorm feeds the product; without a residual the stream is ``x`` itself."""
    from ultrakv.node.model import gemv

    x, r, w, b, nw = _tensors(300, 40, dtype, seed=1)
    before = r.clone()
    y, stream = gemv.norm_gemv(x, r, nw, EPS, w, b)
    torch.testing.assert_close(stream, x + r, **_tol(dtype))
    assert torch.equal(r, before)
    torch.testing.assert_close(y, F.linear(_norm(x + r, nw), w, b), **_tol(dtype))
    y, stream = gemv.norm_gemv(x, None, nw, EPS, w)
    assert stream is x
    torch.testing.assert_close(y, F.linear(_norm(x, nw), w), **_tol(dtype))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_norm_gemv_with_swiglu_equals_gate_up_then_silu_mul(dtype):
    from ultrakv.node.model import gemv

    x, r, w, _, nw = _tensors(260, 48, dtype, seed=2)  # gate rows 0..23, up rows 24..47
    act, _ = gemv.norm_gemv(x, r, nw, EPS, w, silu=True)
    gate, up = F.linear(_norm(x + r, nw), w).split(24, dim=-1)
    assert act.shape == (1, 24)
    # bf16: the reference rounds silu(gate) and the product once more each (and the
    # interpreter truncates): up to four ulps apart.
    tol = {"rtol": 2**-5, "atol": 2**-5} if dtype == torch.bfloat16 else _tol(dtype)
    torch.testing.assert_close(act, F.silu(gate) * up, **tol)


@needs_kernels
def test_engine_decoding_through_the_gemvs_equals_the_plain_projections(monkeypatch):
    """tiny, batch-1 decode (one token per step: the GEMV path, six launches per layer)
    greedy-decodes the same tokens with ``gemv=triton`` as with ``gemv=cublas``, and only
    the first has the layers' GEMV path on. float32 on CUDA (the two summation orders then
    differ far below any logit gap); float16 under the interpreter (a float32 model on a CPU
    packs its weights, which the GEMVs do not read)."""
    from ultrakv.node import Engine, EngineConfig, SamplingParams, kernel_variants

    prompt = [(7 * j) % 250 + 1 for j in range(5)]
    tokens = {}
    try:
        for choice in ("triton", "cublas"):
            monkeypatch.setenv(kernel_variants.ENV, f"gemv={choice}")
            kernel_variants.current.cache_clear()
            engine = Engine(EngineConfig(model="tiny", device=DEVICE, num_blocks=64, fused_kernels=True,
                                         dtype="float32" if DEVICE == "cuda" else "float16"))
            assert all(layer.gemv == (choice == "triton") for layer in engine.model.model.layers)
            out = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
            tokens[choice] = out.token_ids
    finally:
        kernel_variants.current.cache_clear()
    assert tokens["triton"] == tokens["cublas"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("k", "n", "silu"), [(2048, 3072, False), (2048, 2048, False), (2048, 16384, True),
                                              (8192, 2048, False), (2048, 128256, False),
                                              (4096, 6144, False), (4096, 4096, False), (4096, 28672, True),
                                              (14336, 4096, False), (4096, 128256, False)])
def test_cuda_llama_1b_matrices_bf16(k, n, silu):
    """llama-1b's and llama-8b's qkv, o, gate/up (+ SwiGLU), down and output matrices in bf16,
    each with its launch shape (``gemv.LAUNCHES``)."""
    from ultrakv.node.model import gemv

    x, r, w, _, nw = _tensors(k, n, torch.bfloat16, seed=k + n)
    if silu:
        act, _ = gemv.norm_gemv(x, r, nw, EPS, w, silu=True)
        gate, up = F.linear(_norm(x + r, nw), w).split(n // 2, dim=-1)
        torch.testing.assert_close(act, F.silu(gate) * up, rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(gemv.gemv(x, w), F.linear(x, w), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(INTERPRETING, reason="compiles for the GPU; no need to run twice")
@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.parametrize("silu", [False, True])
def test_compiles_for_the_h100_with_vector_loads(silu):
    """The fused GEMV (norm + residual, SwiGLU) compiles for an H100 as the model launches it
    on llama-1b's matrices (no GPU needed), loading weights 16 bytes at a time, no spills."""
    from triton_ptx import hopper_ptx, instructions
    from ultrakv.node.model import gemv

    k, n = 2048, 16384 if silu else 3072
    x, w = torch.zeros(1, k, dtype=torch.bfloat16), torch.zeros(n, k, dtype=torch.bfloat16)
    rows = n // 2 if silu else n
    block_n = gemv._block_n(rows, 132, gemv.LAUNCH.programs_per_sm)
    ptx = hopper_ptx(gemv._gemv_kernel, (x, x, x, x, w, x, x, k, rows, EPS, k),
                     {"NORM": True, "RESIDUAL": True, "SILU": silu, "HAS_BIAS": False, "BLOCK_N": block_n,
                      "BLOCK_K": min(k, gemv.LAUNCH.tile_elems // block_n), "PDL": False},
                     num_warps=gemv.LAUNCH.num_warps, num_stages=gemv.LAUNCH.num_stages)
    assert "ld.global.v4.b32" in instructions(ptx, "ld.global")
    assert not instructions(ptx, "ld.local") and not instructions(ptx, "st.local")
