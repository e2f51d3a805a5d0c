"""Programmatic dependent launch of the decode step's kernels (``node/grid_dependency.py``).

A kernel launched so may start while its predecessor still runs, so each must wait
(``griddepcontrol.wait``) before its first memory access: checked in the PTX each kernel
compiles to for an H100, as the backend launches it (no GPU needed). On a GPU, an engine
decoding with it greedy-decodes the same tokens as without.
"""

from __future__ import annotations

import re

import pytest
import torch
from triton_interpreter import triton_importable
from triton_ptx import LaunchRecorder, hopper_ptx

needs_triton = pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
_MEMORY = re.compile(r"\b(?:ld|st|atom|red)\.global")
_WRITES = re.compile(r"\b(?:st|atom|red)\.global")


def _entry(ptx: str) -> str:
    return ptx[ptx.index(".entry"):]


def _waits_before_touching_memory(ptx: str, pattern: re.Pattern = _MEMORY) -> bool:
    """The kernel waits for its predecessor before its first global memory access matching
    ``pattern``, then triggers its successor's launch."""
    body = _entry(ptx)
    wait, trigger = body.find("griddepcontrol.wait"), body.find("griddepcontrol.launch_dependents")
    first = pattern.search(body)
    return first is not None and 0 <= wait < trigger < first.start()


def test_the_variant_is_on_by_default_and_named_in_errors():
    from ultrakv.node.kernel_variants import KernelVariants

    assert KernelVariants().launch == "pdl"
    assert KernelVariants.parse("launch=serial").launch == "serial"
    with pytest.raises(ValueError, match="launch must be one of"):
        KernelVariants.parse("launch=eager")


@needs_triton
def test_enabled_only_on_a_cuda_device(monkeypatch):
    from ultrakv.node import grid_dependency, kernel_variants

    monkeypatch.setenv(kernel_variants.ENV, "launch=pdl")
    kernel_variants.current.cache_clear()
    grid_dependency._supported.cache_clear()
    try:
        assert not grid_dependency.enabled(torch.device("cpu"))
    finally:
        kernel_variants.current.cache_clear()
        grid_dependency._supported.cache_clear()


def _gemv_ptx(pdl: bool) -> str:
    from ultrakv.node.model import gemv

    k, rows = 2048, 8192
    x, w = torch.zeros(1, k, dtype=torch.bfloat16), torch.zeros(2 * rows, k, dtype=torch.bfloat16)
    return hopper_ptx(gemv._gemv_kernel, (x, x, x, x, w, x, x, k, rows, 1e-5, k),
                      {"NORM": True, "RESIDUAL": True, "SILU": True, "HAS_BIAS": False, "BLOCK_N": 8,
                       "BLOCK_K": 1024, "PDL": pdl}, num_warps=4, num_stages=1, launch_pdl=pdl)


def _rms_norm_ptx(pdl: bool) -> str:
    from ultrakv.node.model import fused_kernels

    x = torch.zeros(1, 2048, dtype=torch.bfloat16)
    return hopper_ptx(fused_kernels._rms_norm_kernel, (x, x, x[0], x, 2048, 2048, 2048, 2048, 1e-5),
                      {"HAS_RESIDUAL": True, "BLOCK": 2048, "PDL": pdl}, num_warps=8, launch_pdl=pdl)


def _argmax_ptx(pdl: bool) -> str:
    from ultrakv.node import sampling_kernels

    logits = torch.zeros(1, 128256, dtype=torch.bfloat16)
    chunks = -(-128256 // sampling_kernels.CHUNK)
    out, counters = torch.zeros(1, dtype=torch.int64), torch.zeros(4, dtype=torch.int32)
    part_v, part_i = torch.zeros(chunks), torch.zeros(chunks, dtype=torch.int32)
    return hopper_ptx(sampling_kernels._split_argmax_kernel,
                      (logits, out, part_v, part_i, counters, 128256, 128256),
                      {"CHUNK": sampling_kernels.CHUNK, "BLOCK_C": 64, "PDL": pdl}, launch_pdl=pdl)


def _attention_ptx(monkeypatch) -> dict[bool, dict[str, str]]:
    """rope_write_kv and decode (split-K, single-partition, and with RoPE and the KV write
    inside) as the backend launches them
    for llama-1b's heads, recorded on CPU tensors, compiled with ``PDL`` on and off."""
    from ultrakv.node.attention import triton_backend
    from ultrakv.node.attention.base import AttentionMetadata

    recorders = {name: LaunchRecorder(k) for name, k in triton_backend._kernels().items()}
    monkeypatch.setattr(triton_backend, "_kernels", lambda: recorders)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the backend take CPU tensors
    backend = triton_backend.TritonPagedBackend()
    cache = torch.zeros(2, 64, 16, 8, 64, dtype=torch.bfloat16)
    qkv = torch.zeros(1, 48 * 64, dtype=torch.bfloat16)
    cos = torch.zeros(1, 1, 64, dtype=torch.bfloat16)
    backend.rope_write_kv(qkv, cos, cos.clone(), cache, torch.tensor([0]), 32)
    tables = torch.zeros(1, 64, dtype=torch.int32)
    for seq_len in (900, 16):
        meta = AttentionMetadata(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([seq_len], dtype=torch.int32),
                                 tables, torch.tensor([5]), 1, seq_len)
        backend.decode(torch.zeros(1, 32, 64, dtype=torch.bfloat16), cache, meta, 0.125)
    backend.decode_qkv(qkv, cos, cos.clone(), cache, meta, 0.125, 32)  # RoPE + KV write inside
    out: dict[bool, dict[str, str]] = {True: {}, False: {}}
    for name, kernel, index in (("rope_write_kv", "rope_write_kv", 0), ("decode_split", "decode", 0),
                                ("decode_single", "decode", 1), ("decode_rope", "decode", 2)):
        recorder = recorders[kernel]
        args, kw = recorder.launches[index]
        assert kw["PDL"] is False and kw["launch_pdl"] is False  # off CUDA, never
        for pdl in (True, False):
            recorder.launches.append((args, {**kw, "PDL": pdl, "launch_pdl": pdl}))
            out[pdl][name] = recorder.ptx()
    return out


@needs_triton
def test_every_decode_kernel_waits_for_its_predecessor_before_touching_memory(monkeypatch):
    """Compiled for an H100 with ``PDL``: RMSNorm, the split argmax, RoPE + KV write, and
    decode attention (split-K, whose last program merges, single-partition, and with RoPE and
    the new token's KV write inside) wait before
    their first global load, store or atomic, the GEMV (norm + residual + SwiGLU) before
    anything but its first weight tile; without it they carry no grid-dependency
    instruction at all."""
    ptx = {"gemv": _gemv_ptx, "rms_norm": _rms_norm_ptx, "argmax": _argmax_ptx}
    with_pdl = {name: build(True) for name, build in ptx.items()}
    without = {name: build(False) for name, build in ptx.items()}
    attention = _attention_ptx(monkeypatch)
    with_pdl.update(attention[True])
    without.update(attention[False])
    # The GEMV loads its first weight tile before waiting (weights are never written while
    # serving: the loads overlap the previous kernel's tail); its input, the residual store
    # and everything else come after the wait.
    gemv = _entry(with_pdl.pop("gemv"))
    assert _waits_before_touching_memory(gemv, _WRITES)
    wait = gemv.index("griddepcontrol.wait")
    assert "ld.global" in gemv[:wait] and "ld.global" in gemv[wait:]
    for name, code in with_pdl.items():
        assert _waits_before_touching_memory(code), name
    for name, code in without.items():
        assert "griddepcontrol" not in code, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_decodes_the_same_tokens_with_programmatic_launch(monkeypatch):
    """tiny on CUDA (CUDA graphs, fused kernels, the GEMV path at batch 1, batch 3 through
    the attention kernels): greedy tokens with ``launch=pdl`` equal those without."""
    from ultrakv.node import Engine, EngineConfig, SamplingParams, grid_dependency, kernel_variants

    prompts = [[(7 * j + i) % 250 + 1 for j in range(5 + 9 * i)] for i in range(3)]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    tokens = {}
    try:
        for choice in ("pdl", "serial"):
            monkeypatch.setenv(kernel_variants.ENV, f"launch={choice}")
            kernel_variants.current.cache_clear()
            grid_dependency._supported.cache_clear()
            engine = Engine(EngineConfig(model="tiny", device="cuda", num_blocks=64, fused_kernels=True,
                                         dtype="float32"))
            assert grid_dependency.enabled(torch.device("cuda")) == (choice == "pdl")
            engine.warmup()
            tokens[choice] = ([engine.generate([prompts[0]], sp)[0].token_ids]
                              + [o.token_ids for o in engine.generate(prompts, sp)])
            del engine
    finally:
        kernel_variants.current.cache_clear()
        grid_dependency._supported.cache_clear()
    assert tokens["pdl"] == tokens["serial"]
