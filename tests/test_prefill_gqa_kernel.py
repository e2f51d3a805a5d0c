"""``prefill_gqa_kernel`` (a returning session's turn: few new tokens over a long cached
context, every query head of a kv head in one program, the context split and merged in the
same launch) against float32 attention over the keys and values the cache holds, for float,
int8 and fp8 caches; and against the per-head kernels it replaces by default.

Natively on CUDA (the ``gpu`` tests add llama-1b / llama-8b heads, bf16, and a CUDA graph
replay). Without CUDA, where Triton is installed, the first test reruns this file under
Triton's CPU interpreter (small shapes; bf16 is left to the GPU: the interpreter's bf16 dot
is not faithful).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from kv_quant_cases import QuantCase, max_abs_err
from triton_interpreter import INTERPRETING, assert_passes_under_interpreter, triton_importable
from ultrakv.node.attention.triton_backend import (
    GqaPrefillConfig,
    TritonPagedBackend,
    _num_sms,
    gqa_prefill_parts,
)

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRETING else None)
needs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs CUDA, or Triton's interpreter (see the first test)")
STORAGE = {"auto": None, "int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# Small tiles so the interpreter's cases have several of each; many programs per SM so they split.
SPLIT = GqaPrefillConfig(block_rows=16, block_n=16, programs_per_sm=64)
WHOLE = GqaPrefillConfig(block_rows=32, block_n=16, programs_per_sm=0)


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="CUDA runs the kernels natively")
@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.timeout(600)
def test_kernel_under_the_triton_interpreter():
    assert_passes_under_interpreter(__file__, at_least=7)


def _run(case: QuantCase, storage: torch.dtype, cfg: GqaPrefillConfig | None, kernel: str = "gqa", meta=None):
    cache = case.cache(storage)
    backend = TritonPagedBackend(gqa_prefill_config=cfg, prefill_kernel=kernel)
    q, k, v = (t.to(DEVICE) for t in (case.q, case.k, case.v))
    out = backend.forward(q, k, v, cache, meta or case.meta, case.scale)
    return out, backend, cache


def _parts(case: QuantCase, cfg: GqaPrefillConfig, max_seq_len: int | None = None) -> int:
    group = case.num_heads // case.num_kv_heads
    block_g = 1 << (group - 1).bit_length()
    tiles = -(-case.meta.max_query_len // (max(cfg.block_rows, block_g) // block_g))
    return gqa_prefill_parts(len(case.new_lens) * case.num_kv_heads * tiles, max_seq_len or case.meta.max_seq_len,
                             _num_sms(torch.device(DEVICE)), cfg)


@needs_kernels
@pytest.mark.parametrize(("name", "dtype"), [("auto", torch.float32), ("auto", torch.float16),
                                             ("int8", torch.float16), ("fp8_e4m3", torch.float32)], ids=str)
def test_split_turn_matches_attention_over_the_cache_and_rearms(name, dtype):
    """Several sequences (a turn, a decode token, a short prompt) over a split context: the
    slices' partial states merge to attention over exactly what the cache holds, the arrival
    counters are back at zero, and (float16) a second launch gives the same bits."""
    case = QuantCase([64, 30, 0], [7, 1, 4], 8, 2, 32, dtype, seed=3, device=DEVICE)
    assert case.meta.max_seq_len >= 2 * case.meta.max_query_len  # the gqa kernel's shape
    assert _parts(case, SPLIT) > 1
    storage = STORAGE[name] or dtype
    out, backend, cache = _run(case, storage, SPLIT)
    assert max_abs_err(out, case.reference(STORAGE[name])) < TOL[dtype]
    counters = backend._arrival[out.device]
    assert not counters.any()
    if name == "auto" and dtype == torch.float16:
        assert torch.equal(backend.prefill(case.q.to(DEVICE), cache, case.meta, case.scale), out)


@needs_kernels
def test_unsplit_launch_and_the_per_head_kernel_agree():
    """One slice per tile (the launch writes its output directly) and the per-head kernels
    the variant switch keeps (``prefill_attention=per_head``) compute the same attention."""
    case = QuantCase([70, 30], [9, 5], 8, 2, 32, torch.float16, seed=5, device=DEVICE)
    assert _parts(case, WHOLE) == 1
    ref = case.reference()
    gqa, _, _ = _run(case, torch.float16, WHOLE)
    per_head, _, _ = _run(case, torch.float16, None, kernel="per_head")
    assert max_abs_err(gqa, ref) < TOL[torch.float16]
    assert max_abs_err(per_head, ref) < TOL[torch.float16]


@needs_kernels
def test_group_of_three_heads_pads_the_rows():
    """Six query heads over two kv heads (a group of three, padded to four rows per token)."""
    case = QuantCase([60, 0], [7, 3], 6, 2, 32, torch.float32, seed=7, device=DEVICE)
    out, _, _ = _run(case, torch.float32, SPLIT)
    assert max_abs_err(out, case.reference()) < TOL[torch.float32]


@needs_kernels
def test_a_graph_bucket_longer_than_the_context_splits_the_real_length():
    """A prefill graph is captured for a context bucket (max_seq_len 4x the real one here):
    the launch splits for the bucket, and the kernel cuts each sequence's real context into
    its slices, so every slice has work and the result does not change."""
    case = QuantCase([50], [6], 4, 1, 32, torch.float16, seed=9, device=DEVICE)
    bucket = replace(case.meta, max_seq_len=4 * case.meta.max_seq_len)
    assert _parts(case, SPLIT, bucket.max_seq_len) > _parts(case, SPLIT)
    out, _, _ = _run(case, torch.float16, SPLIT, meta=bucket)
    assert max_abs_err(out, case.reference()) < TOL[torch.float16]


def test_variant_switch_names_the_field_and_choices():
    from ultrakv.node.kernel_variants import KernelVariants

    assert KernelVariants.parse("prefill_attention=per_head, argmax=torch").prefill_attention == "per_head"
    assert KernelVariants.parse("") == KernelVariants()
    with pytest.raises(ValueError, match=r"prefill_attention must be one of \('gqa', 'per_head'\), got 'x'"):
        KernelVariants.parse("prefill_attention=x")
    with pytest.raises(ValueError, match="name=value"):
        KernelVariants.parse("bogus=1")
    with pytest.raises(ValueError, match="prefill_attention must be one of"):
        TritonPagedBackend(prefill_kernel="fast")


# ------------------------------------------------------------------ CUDA only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["auto", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_cuda_turn_over_a_long_context(name, head_dim, dtype):
    """Llama-3 heads (32 q, 8 kv): a turn of 200 new tokens over 2100 cached (the issue's
    turn 8), with a decode token and a short turn beside it, tuned launch shape; against the
    reference and the per-head kernels."""
    case = QuantCase([2100, 700, 300], [200, 1, 37], 32, 8, head_dim, dtype, seed=head_dim, device=DEVICE)
    storage = STORAGE[name] or dtype
    out, backend, _ = _run(case, storage, None)
    ref = case.reference(STORAGE[name])
    assert max_abs_err(out, ref) < TOL[dtype]
    per_head, _, _ = _run(case, storage, None, kernel="per_head")
    assert max_abs_err(per_head, ref) < TOL[dtype]
    assert not backend._arrival[out.device].any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_a_turn_with_in_place_metadata():
    """Captured for a 4096 bucket with one turn's metadata, replayed with another turn's
    (context length and block table changed in place): each replay equals the reference."""
    cases = [QuantCase([p], [200], 32, 8, 64, torch.bfloat16, seed=p, device=DEVICE) for p in (2100, 900)]
    num_blocks = max(c.num_blocks for c in cases)
    backend = TritonPagedBackend(prefill_kernel="gqa")
    first = cases[0]
    cache = torch.zeros(2, num_blocks, 16, 8, 64, dtype=torch.bfloat16, device=DEVICE)
    q = first.q.to(DEVICE).clone()
    meta = replace(first.meta, seq_lens=first.meta.seq_lens.clone(), slot_mapping=first.meta.slot_mapping.clone(),
                   block_tables=torch.zeros(1, 4096 // 16, dtype=torch.int32, device=DEVICE), max_seq_len=4096)
    backend.prefill(q, cache, meta, first.scale)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.prefill(q, cache, meta, first.scale)
    for case in cases:
        cache[:, : case.num_blocks].copy_(case.cache(torch.bfloat16))
        backend.write_kv(case.k.to(DEVICE), case.v.to(DEVICE), cache, case.meta.slot_mapping)
        q.copy_(case.q)
        meta.seq_lens.copy_(case.meta.seq_lens)
        meta.block_tables.zero_()
        meta.block_tables[:, : case.meta.block_tables.shape[1]].copy_(case.meta.block_tables)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert max_abs_err(out, case.reference()) < TOL[torch.bfloat16]
