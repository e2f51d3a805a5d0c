"""The split greedy argmax (``node/sampling_kernels.py``) against ``torch.argmax``.

Natively on CUDA (the ``gpu`` test adds the engine: the same greedy tokens with the kernel as
with ``torch.argmax``). Without CUDA, where Triton is installed, the first test reruns this
file under Triton's CPU interpreter.
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import INTERPRETING, assert_passes_under_interpreter, triton_importable

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRETING else None)
needs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs CUDA, or Triton's interpreter (see the first test)")


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="CUDA runs the kernels natively")
@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.timeout(600)
def test_kernel_under_the_triton_interpreter():
    assert_passes_under_interpreter(__file__, at_least=4)


def _argmax():
    from ultrakv.node.sampling_kernels import SplitArgmax

    return SplitArgmax(DEVICE)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_equals_torch_argmax_over_chunks_and_a_ragged_tail(dtype):
    """Rows of a vocabulary that is not a multiple of the chunk (the last chunk is partial),
    the maximum placed in different chunks, the model dtype read without an upcast; the
    counters re-arm, so a second launch agrees."""
    from ultrakv.node.sampling_kernels import CHUNK

    vocab = 3 * CHUNK + 77
    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(1)).to(dtype)
    for row, at in enumerate((0, CHUNK - 1, CHUNK, vocab - 1, 2 * CHUNK + 5)):
        logits[row, at] = 50.0
    logits = logits.to(DEVICE)
    argmax = _argmax()
    want = logits.float().argmax(dim=-1)
    got = argmax(logits)
    assert got.dtype == torch.int64
    assert torch.equal(got, want)
    assert not argmax._arrived.any()
    assert torch.equal(argmax(logits), want)


@needs_kernels
def test_ties_take_the_lowest_index_and_edge_rows():
    """A maximum repeated inside a chunk and across chunks: the first, as torch.argmax. A
    row of -inf gives 0; a NaN counts as +inf; more rows than the counters had grow them."""
    from ultrakv.node.sampling_kernels import CHUNK

    vocab = 2 * CHUNK + 10
    logits = torch.zeros(5, vocab)
    logits[0, [CHUNK + 3, 7, 2 * CHUNK + 1]] = 2.0
    logits[1, [CHUNK + 3, CHUNK + 9]] = 2.0
    logits[2] = float("-inf")
    logits[3, CHUNK + 4] = float("nan")
    logits[4, 5] = -1.0  # all others 0: the first zero
    assert _argmax()(logits.to(DEVICE)).tolist() == [7, CHUNK + 3, 0, CHUNK + 4, 0]
    argmax = _argmax()
    argmax._arrived = argmax._arrived[:2]  # fewer counters than rows: they grow
    many = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    assert torch.equal(argmax(many.to(DEVICE)).cpu(), many.argmax(dim=-1))
    assert argmax._arrived.numel() >= 3


@needs_kernels
def test_refuses_a_strided_vocabulary():
    logits = torch.zeros(4, 64, device=DEVICE).t()
    with pytest.raises(ValueError, match="unit stride"):
        _argmax()(logits)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_greedy_tokens_equal_torch_argmax(monkeypatch):
    """tiny on CUDA, batch 1 and 3, multi-step decode: the same tokens with the split argmax
    (the default) as with ``ULTRAKV_KERNELS=argmax=torch``."""
    from ultrakv.node import Engine, EngineConfig, SamplingParams, kernel_variants

    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11] * 5, [12] * 20]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = {}
    for choice in ("split", "torch"):
        monkeypatch.setenv(kernel_variants.ENV, f"argmax={choice}")
        kernel_variants.current.cache_clear()
        engine = Engine(EngineConfig(model="tiny", device="cuda", num_blocks=256))
        assert (engine.runner._split_argmax is not None) == (choice == "split")
        outs[choice] = ([o.token_ids for o in engine.generate(prompts[:1], sp)],
                        [o.token_ids for o in engine.generate(prompts, sp)])
    kernel_variants.current.cache_clear()
    assert outs["split"] == outs["torch"]


@pytest.mark.skipif(INTERPRETING, reason="compiles for the GPU; no need to run twice")
@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
def test_compiles_for_the_h100_with_an_ordered_merge():
    """As launched over llama-1b's bf16 logits: 16-byte loads, the arrival counter an
    acquire-release atomic, the merge's loads bypassing L1."""
    from triton_ptx import hopper_ptx, instructions
    from ultrakv.node import sampling_kernels

    logits = torch.zeros(1, 128256, dtype=torch.bfloat16)
    chunks = -(-128256 // sampling_kernels.CHUNK)
    out, counters = torch.zeros(1, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)
    part_v, part_i = torch.zeros(chunks), torch.zeros(chunks, dtype=torch.int32)
    ptx = hopper_ptx(sampling_kernels._split_argmax_kernel,
                     (logits, out, part_v, part_i, counters, 128256, 128256),
                     {"CHUNK": sampling_kernels.CHUNK, "BLOCK_C": 64, "PDL": False})
    assert "ld.global.v4.b32" in instructions(ptx, "ld.global")
    assert "ld.global.cg.b32" in instructions(ptx, "ld.global")
    assert "atom.global.gpu.acq_rel.add.u32" in instructions(ptx, "atom")
