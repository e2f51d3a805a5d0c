"""The Triton paged-attention kernels over a quantized KV cache (int8, fp8 e4m3).

The write kernel must quantize as ``node/kv/quantization.py`` does (the PyTorch reference
reads what it writes, and the other way round), and decode / prefill must equal attention over
exactly the dequantized keys and values, within the float error of the kernels themselves.

They run natively on CUDA. Without CUDA, where Triton is installed, the first test reruns this
file in a subprocess under Triton's CPU interpreter (``TRITON_INTERPRET=1``, small shapes);
where Triton is missing (CI installs none) everything skips. The ``gpu`` tests add larger
shapes and bf16, and the engine end to end.
"""

from __future__ import annotations

import pytest
import torch
from kv_quant_cases import QuantCase, max_abs_err
from triton_interpreter import INTERPRETING, run_under_interpreter, triton_importable
from triton_ptx import LaunchRecorder, instructions
from ultrakv.node.attention.torch_ref import TorchReferenceBackend
from ultrakv.node.kv import quantization

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRETING else None)
needs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs CUDA, or Triton's interpreter (see the first test)")
STORAGE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
# |kernel - attention over the dequantized K/V| by q dtype: the kernels' own error (fp16 /
# bf16 probabilities and products in the dot; the dequantized values are exact in q's dtype).
KERNEL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# Relative error against the float reference (as tests/test_kv_quantization.py states it for
# the PyTorch reference: measured int8 0.014-0.016, fp8 0.030-0.031).
REL_TOL = {"int8": 0.03, "fp8_e4m3": 0.06}


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="CUDA runs the kernels natively")
@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.timeout(600)
def test_kernels_under_the_triton_interpreter():
    out = run_under_interpreter(__file__)
    assert " passed" in out and " failed" not in out


@pytest.fixture
def recorded_kernels(monkeypatch):
    """The backend's kernels replaced by launch recorders: a backend call records what it
    would launch (CPU tensors stand in for CUDA ones), for compiling for an H100."""
    from ultrakv.node.attention import triton_backend

    recorders = {name: LaunchRecorder(k) for name, k in triton_backend._kernels().items()}
    monkeypatch.setattr(triton_backend, "_kernels", lambda: recorders)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the backend take CPU tensors
    return recorders


def _record_llama_1b_launches(storage: torch.dtype) -> None:
    """Every kernel the backend has, launched (recorded) with Llama-3.2-1B heads (32 q, 8 kv,
    64 wide; a quantized row is 68 bytes) and bf16 activations."""
    from ultrakv.node.attention.base import AttentionMetadata

    quantized = quantization.is_quantized(storage)
    cache = torch.zeros(2, 64, 16, 8, 68 if quantized else 64, dtype=torch.uint8 if quantized else storage)
    cache = cache.view(storage)
    qkv = torch.zeros(3, 48 * 64, dtype=torch.bfloat16)
    heads = qkv.view(3, 48, 64)
    backend = _backend()
    backend.write_kv(heads[:, 32:40], heads[:, 40:], cache, torch.tensor([0, 1, 2]))
    cos = torch.zeros(3, 1, 64, dtype=torch.bfloat16)
    backend.rope_write_kv(qkv, cos, cos.clone(), cache, torch.tensor([0, 1, 2]), 32)
    tables = torch.zeros(1, 64, dtype=torch.int32)
    for seq_len in (900, 16):  # split-K (merged in the kernel) and a single partition
        decode = AttentionMetadata(torch.tensor([0, 1], dtype=torch.int32),
                                   torch.tensor([seq_len], dtype=torch.int32), tables, torch.tensor([5]), 1,
                                   seq_len)
        backend.decode(torch.zeros(1, 32, 64, dtype=torch.bfloat16), cache, decode, 0.125)
    prefill = AttentionMetadata(torch.tensor([0, 100], dtype=torch.int32), torch.tensor([900], dtype=torch.int32),
                                tables, torch.arange(100), 100, 900)
    backend.prefill(torch.zeros(100, 32, 64, dtype=torch.bfloat16), cache, prefill, 0.125)


@pytest.mark.skipif(INTERPRETING, reason="compiles for the GPU; no need to run twice")
@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
def test_quantizing_kernels_divide_as_pytorch_on_the_gpu(recorded_kernels, name):
    """Compiled for an H100 (no GPU needed), the kernels that quantize divide as PyTorch does
    (div.rn): Triton's fp32 `/` is the approximate div.full.f32 on CUDA, which rounded
    quotients on a tie to the other fp8 neighbour (a whole e4m3 step) and made the kernel's
    bytes differ from the reference's on the GPU only (the interpreter divides exactly)."""
    _record_llama_1b_launches(STORAGE[name])
    for kernel in ("write_kv", "rope_write_kv"):
        ptx = recorded_kernels[kernel].ptx()
        assert "div.rn.f32" in instructions(ptx, "div")
        approximate = instructions(ptx, "div.full") | instructions(ptx, "div.approx") | instructions(ptx, "rcp.approx")
        assert not approximate, (kernel, approximate)


@pytest.mark.skipif(INTERPRETING, reason="compiles for the GPU; no need to run twice")
@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.parametrize("name", ["auto", "int8", "fp8_e4m3"])
def test_kernels_compile_for_the_h100_moving_bytes_in_vectors(recorded_kernels, name):
    """Every kernel compiles for an H100 (the interpreter accepts code the compiler refuses),
    and with a quantized cache moves its one-byte K/V in 4-byte vectors or wider: a quantized
    row is head_dim + 4 bytes, which Triton does not know to be 4-byte aligned from the
    runtime strides, so without the kernels' alignment hints every value was loaded (and
    stored) one byte at a time."""
    _record_llama_1b_launches(torch.bfloat16 if name == "auto" else STORAGE[name])
    for kernel, recorder in recorded_kernels.items():
        for i in range(len(recorder.launches)):
            ptx = recorder.ptx(i)
            moves = instructions(ptx, "ld.global") | instructions(ptx, "st.global")
            assert name == "auto" or not {m for m in moves if m.endswith("8")}, (kernel, moves)


def _backend():
    from ultrakv.node.attention.triton_backend import TritonPagedBackend

    return TritonPagedBackend()


def _case(prefix_lens, new_lens, dtype, seed, num_heads=4, num_kv_heads=2, head_dim=32):
    return QuantCase(prefix_lens, new_lens, num_heads, num_kv_heads, head_dim, dtype, seed,
                     device=DEVICE)


def _to_device(case: QuantCase):
    return case.q.to(DEVICE), case.k.to(DEVICE), case.v.to(DEVICE)


@needs_kernels
@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_write_kernel_quantizes_like_the_reference(name, dtype):
    """The same bytes as quantization.quantize (values and scales; ties to even, which fp16 /
    bf16 inputs hit often; -0 for tiny negatives), on CUDA as under the interpreter: the
    kernel divides with IEEE rounding as PyTorch does (see the PTX test above)."""
    storage = STORAGE[name]
    case = _case([3, 0], [21, 9], dtype, seed=2)
    # Rows of exact e4m3 ties (an absmax of 7 * 2^-j makes the scale a power of two, so every
    # x / scale is exact) with a tiny negative value (-0 in e4m3).
    x = case.k.clone()
    x[:4, :, 3] = 7.0 * 2.0 ** -torch.arange(4.0)[:, None]
    x[:4, :, :3] = x[:4, :, 3:4] / 448 * torch.tensor([17.0, 19.0, -1e-4])
    x = x.to(dtype)
    cache = case.cache(storage)
    _backend().write_kv(x.to(DEVICE), case.v.to(DEVICE), cache, case.meta.slot_mapping)
    flat = cache.cpu().view(torch.uint8).view(2, -1, 2, 36)
    slots = case.meta.slot_mapping.cpu()
    for kind, rows in ((0, x), (1, case.v)):
        want = quantization.quantize(rows, storage).view(torch.uint8)
        got = flat[kind, slots]
        assert torch.equal(got, want), (got != want).nonzero()[:5].tolist()


@needs_kernels
@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_decode_over_quantized_cache(name, dtype):
    storage = STORAGE[name]
    case = _case([0, 17, 40, 95, 130], [1] * 5, dtype, seed=3)
    q, k, v = _to_device(case)
    cache = case.cache(storage)
    out = _backend().forward(q, k, v, cache, case.meta, case.scale)
    assert max_abs_err(out, case.reference(storage)) < KERNEL_TOL[dtype]
    ref = case.reference()
    assert float((out.float().cpu() - ref).norm() / ref.norm()) < REL_TOL[name]
    # The PyTorch reference reads the cache the kernels wrote (and wrote the prefix in).
    again = TorchReferenceBackend().forward(q.cpu(), k.cpu(), v.cpu(), cache.cpu(),
                                            _cpu_meta(case), case.scale)
    assert max_abs_err(out, again.float()) < KERNEL_TOL[dtype]


@needs_kernels
@pytest.mark.parametrize("name", ["auto", "int8"])
def test_split_decode_merges_in_its_own_launch_and_rearms(name):
    """Split-K decode (several context partitions per sequence) merges the partitions in the
    same launch: the last program of each (sequence, kv head) to arrive does it and zeroes
    the arrival counter, so the next launch (a CUDA graph replay) computes the same output."""
    from ultrakv.node.attention import triton_backend

    storage = STORAGE.get(name, torch.float16)
    case = _case([0, 17, 40, 95, 130], [1] * 5, torch.float16, seed=7)
    q, k, v = _to_device(case)
    cache = case.cache(storage)
    backend = _backend()
    block_n = triton_backend.DecodeConfig.for_head_dim(32, name != "auto").block_n
    partition = triton_backend.decode_partition_size(5, 2, case.meta.max_seq_len,
                                                     triton_backend._num_sms(q.device), block_n)
    assert case.meta.max_seq_len > 2 * partition  # three partitions or more
    out = backend.forward(q, k, v, cache, case.meta, case.scale)
    assert max_abs_err(out, case.reference(None if name == "auto" else storage)) < KERNEL_TOL[torch.float16]
    counters = backend._arrival[q.device]
    assert not counters.any()
    assert torch.equal(backend.decode(q, cache, case.meta, case.scale), out)
    assert not counters.any()


@needs_kernels
@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
def test_prefill_over_quantized_cache(name):
    storage = STORAGE[name]
    case = _case([0, 20, 33], [40, 13, 1], torch.float16, seed=4)
    q, k, v = _to_device(case)
    cache = case.cache(storage)
    out = _backend().forward(q, k, v, cache, case.meta, case.scale)
    assert max_abs_err(out, case.reference(storage)) < KERNEL_TOL[torch.float16]
    ref = case.reference()
    assert float((out.float().cpu() - ref).norm() / ref.norm()) < REL_TOL[name]


def _cpu_meta(case: QuantCase):
    from dataclasses import replace

    m = case.meta
    return replace(m, query_start_loc=m.query_start_loc.cpu(), seq_lens=m.seq_lens.cpu(),
                   block_tables=m.block_tables.cpu(), slot_mapping=m.slot_mapping.cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_long_context_bf16(name, head_dim):
    """Split-K decode (many partitions) and prefill, bf16, real head sizes."""
    storage = STORAGE[name]
    case = _case([2000, 1, 700, 0], [1, 1, 1, 1], torch.bfloat16, seed=5, num_heads=32,
                 num_kv_heads=8, head_dim=head_dim)
    q, k, v = _to_device(case)
    cache = case.cache(storage)
    out = _backend().forward(q, k, v, cache, case.meta, case.scale)
    assert max_abs_err(out, case.reference(storage)) < KERNEL_TOL[torch.bfloat16]
    case = _case([0, 300, 50], [500, 64, 1], torch.bfloat16, seed=6, num_heads=32,
                 num_kv_heads=8, head_dim=head_dim)
    q, k, v = _to_device(case)
    cache = case.cache(storage)
    out = _backend().forward(q, k, v, cache, case.meta, case.scale)
    assert max_abs_err(out, case.reference(storage)) < KERNEL_TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
def test_cuda_engine_greedy_with_quantized_cache(name):
    """tiny on CUDA (Triton attention, CUDA graphs): the quantized engine decodes the same
    tokens through the Triton kernels as through the PyTorch reference, and its prefix-cached
    rerun repeats them."""
    from ultrakv.node import Engine, EngineConfig, SamplingParams

    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 5, [11, 12, 13] * 7]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = {}
    for backend in ("triton", "torch"):
        e = Engine(EngineConfig(model="tiny", device="cuda", num_blocks=256, kv_cache_dtype=name,
                                attention_backend=backend))
        outs[backend] = [o.token_ids for o in e.generate(prompts, sp)]
        assert [o.token_ids for o in e.generate(prompts, sp)] == outs[backend]
    same = sum(x == y for a, b in zip(outs["triton"], outs["torch"], strict=True)
               for x, y in zip(a, b, strict=True))
    assert same >= 0.9 * sum(len(a) for a in outs["torch"])
