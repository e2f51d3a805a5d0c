"""The fused Triton kernels (``node/model/fused_kernels.py``) against the PyTorch ops they
replace, then the whole engine with them on against transformers.

They run natively on a CUDA machine. Without CUDA, where Triton is installed, the first test
runs this file again in a subprocess under Triton's CPU interpreter (``TRITON_INTERPRET=1``),
so the kernels' indexing and arithmetic are checked on any machine. Where Triton is missing
(CI installs no Triton) everything skips. The interpreter rounds float32 to bfloat16 by
truncation, the GPU to nearest: bfloat16 tolerances allow two units in the last place.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import INTERPRETING, assert_passes_under_interpreter, triton_importable

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRETING else None)
needs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs CUDA, or Triton's interpreter (see the first test)")
BF16_TOL = {"rtol": 2**-6, "atol": 2**-6}  # two bfloat16 ulps


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="CUDA runs the kernels natively")
@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.timeout(600)
def test_kernels_under_the_triton_interpreter():
    # Every kernel case and the engine check ran (only this test and the CPU refusal skip).
    assert_passes_under_interpreter(__file__, at_least=24)


def _rope_tables(heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed RoPE tables (512 positions) of a one-layer model of these heads, on DEVICE."""
    from ultrakv.node.model.config import ModelConfig
    from ultrakv.node.model.llama import RotaryEmbedding

    cfg = ModelConfig(architecture="llama", vocab_size=8, hidden_size=heads * head_dim, intermediate_size=8,
                      num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0)
    return RotaryEmbedding(cfg).cos_sin(torch.device(DEVICE))


def _tol(dtype: torch.dtype) -> dict:
    return BF16_TOL if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (7, 96), (3, 2048)])
def test_rms_norm_with_and_without_the_residual_add(dtype, shape):
    from ultrakv.node.model import fused_kernels as fk

    g = torch.Generator().manual_seed(shape[0])
    x, r, w = (torch.randn(*s, generator=g).to(DEVICE, dtype) for s in (shape, shape, shape[1:]))
    eps = 1e-5

    def ref_norm(v):
        return w * F.rms_norm(v.float(), w.shape, eps=eps).to(dtype)

    torch.testing.assert_close(fk.rms_norm(x, w, eps), ref_norm(x), **_tol(dtype))
    residual = r.clone()
    out = fk.rms_norm(x, w, eps, residual)
    torch.testing.assert_close(residual, x + r, **_tol(dtype))  # the stream is updated in place
    torch.testing.assert_close(out, ref_norm(x + r), **_tol(dtype))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_rope_in_place_on_the_qkv_view_matches_apply_rope(dtype, head_dim):
    from ultrakv.node.model import fused_kernels as fk
    from ultrakv.node.model.llama import apply_rope

    heads, kv_heads, t = 4, 2, 9
    cos_t, sin_t = _rope_tables(heads, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 2, 3, 100, 101, 7, 300, 511], device=DEVICE)
    cos, sin = cos_t[positions].to(dtype).unsqueeze(1), sin_t[positions].to(dtype).unsqueeze(1)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(t, width, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(t, -1, head_dim)  # strided rows, as in the model
    expected = apply_rope(qk.clone(), cos, sin)
    assert fk.rope_(qk, cos, sin) is qk
    torch.testing.assert_close(qk, expected, **_tol(dtype))
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # values untouched


@needs_kernels
@pytest.mark.parametrize("kv", ["auto", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_kv_write_in_one_kernel_equal_rope_then_write(dtype, kv):
    """rope_write_kv (one launch) leaves the same rotated queries in qkv and the same cache
    bytes (quantized ones included, scales too) as fused_kernels.rope_ followed by the
    backend's write kernel; slot -1 rows write nothing."""
    from ultrakv.node.attention.triton_backend import TritonPagedBackend
    from ultrakv.node.kv import quantization
    from ultrakv.node.model import fused_kernels as fk

    heads, kv_heads, head_dim, t = 8, 2, 32, 6
    cos_t, sin_t = _rope_tables(heads, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 77, 300, 5, 511], device=DEVICE)
    cos, sin = cos_t[positions].to(dtype).unsqueeze(1), sin_t[positions].to(dtype).unsqueeze(1)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    storage = dtype if kv == "auto" else quantization.storage_dtype(kv, dtype)
    row = quantization.row_width(head_dim, storage)
    quantized = quantization.is_quantized(storage)
    cache = torch.zeros(2, 4, 16, kv_heads, row, dtype=torch.uint8 if quantized else storage)
    cache = cache.view(storage).to(DEVICE)
    slots = torch.tensor([3, 17, -1, 40, 0, 63], device=DEVICE)
    backend = TritonPagedBackend()

    want_qkv, want_cache = qkv.clone(), cache.clone()
    qk = want_qkv[:, : (heads + kv_heads) * head_dim].view(t, -1, head_dim)
    fk.rope_(qk, cos, sin)
    v = want_qkv[:, (heads + kv_heads) * head_dim :].view(t, kv_heads, head_dim)
    backend.write_kv(qk[:, heads:], v, want_cache, slots)

    q = backend.rope_write_kv(qkv, cos, sin, cache, slots, heads)
    assert q.data_ptr() == qkv.data_ptr() and q.shape == (t, heads, head_dim)
    assert torch.equal(qkv[:, : heads * head_dim], want_qkv[:, : heads * head_dim])
    assert torch.equal(cache.view(torch.uint8), want_cache.view(torch.uint8))
    assert cache.view(torch.uint8).flatten(1, 2)[:, [3, 17, 40, 0, 63]].any()  # something was written


@needs_kernels
@pytest.mark.parametrize("kv", ["auto", "int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_with_rope_and_kv_write_inside_equals_the_two_launches(dtype, kv):
    """decode_qkv (the decode kernel rotates the queries and writes the new tokens' keys and
    values itself) gives the same output and the same cache bytes as rope_write_kv then
    decode, for sequences whose new token sits in the first, a middle or the last of
    several context partitions, and a padded row (slot -1) that writes nothing."""
    from ultrakv.node.attention.base import AttentionMetadata
    from ultrakv.node.attention.triton_backend import TritonPagedBackend
    from ultrakv.node.kv import quantization

    heads, kv_heads, head_dim, page = 8, 2, 32, 16
    seq_lens = [1, 70, 200, 129, 1]
    t, width = len(seq_lens), 16
    cos_t, sin_t = _rope_tables(heads, kv_heads, head_dim)
    positions = torch.tensor([n - 1 for n in seq_lens], device=DEVICE)
    cos, sin = cos_t[positions].to(dtype).unsqueeze(1), sin_t[positions].to(dtype).unsqueeze(1)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    storage = dtype if kv == "auto" else quantization.storage_dtype(kv, dtype)
    row = quantization.row_width(head_dim, storage)
    quantized = quantization.is_quantized(storage)
    blocks = t * width
    cache = torch.randint(0, 100, (2, blocks, page, kv_heads, row), generator=g, dtype=torch.uint8)
    cache = (cache if quantized else cache.to(storage) / 50).view(storage).to(DEVICE)
    tables = torch.arange(blocks, dtype=torch.int32).flip(0).view(t, width).to(DEVICE)
    slots = tables.gather(1, (positions // page).unsqueeze(1)).squeeze(1).long() * page + positions % page
    slots[-1] = -1  # a padded row: attends over one token, writes nowhere
    meta = AttentionMetadata(query_start_loc=torch.arange(t + 1, dtype=torch.int32, device=DEVICE),
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                             block_tables=tables, slot_mapping=slots, max_query_len=1, max_seq_len=256)
    backend = TritonPagedBackend()
    scale = head_dim**-0.5

    want_qkv, want_cache = qkv.clone(), cache.clone()
    q = backend.rope_write_kv(want_qkv, cos, sin, want_cache, slots, heads)
    want = backend.decode(q, want_cache, meta, scale)
    got = backend.decode_qkv(qkv, cos, sin, cache, meta, scale, heads)
    assert torch.equal(got, want)
    assert torch.equal(cache.view(torch.uint8), want_cache.view(torch.uint8))


@needs_kernels
def test_engine_with_rope_fused_into_the_kv_write_decodes_as_without():
    """tiny through the Triton backend with fused kernels and an fp8 cache: the same greedy
    tokens and cached KV bytes whether RoPE is fused into the KV write (two kernels per
    layer's attention) or runs as its own kernel before the backend's write."""
    from ultrakv.node import Engine, EngineConfig, SamplingParams

    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3, [11, 12, 13] * 5]
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    runs = []
    for fuse_rope in (True, False):
        e = Engine(EngineConfig(model="tiny", device=DEVICE, num_blocks=32, attention_backend="triton",
                                fused_kernels=True, kv_cache_dtype="fp8_e4m3"))
        backend = e.model.model.layers[0].self_attn.backend
        assert backend.fuses_rope
        backend.fuses_rope = fuse_rope  # off: rope_ kernel, then the backend's forward
        tokens = [o.token_ids for o in e.generate(prompts, sp, session_ids=["a", "b"])]
        runs.append((tokens, e.export_session("a").kv.view(torch.uint8)))
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 128), (5, 3000)])
def test_silu_and_mul(dtype, shape):
    from ultrakv.node.model import fused_kernels as fk

    x = torch.randn(shape[0], 2 * shape[1], generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    gate, up = x.split(shape[1], dim=-1)
    torch.testing.assert_close(fk.silu_and_mul(x), F.silu(gate) * up, **_tol(dtype))


@needs_kernels
def test_engine_with_fused_kernels_matches_transformers(tmp_path):
    pytest.importorskip("transformers")
    from hf_reference import assert_greedy_matches, build_checkpoint, hf_greedy
    from ultrakv.node import Engine, EngineConfig, SamplingParams

    hf = build_checkpoint("llama", tmp_path)
    engine = Engine(EngineConfig(model=str(tmp_path), device=DEVICE, dtype="float32", num_blocks=64,
                                 max_num_batched_tokens=32, fused_kernels=True))
    assert engine.stats()["fused_kernels"]
    prompts = [[(7 * i + j) % 250 + 1 for j in range(n)] for i, n in enumerate((1, 5, 20, 45))]
    outs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        ref, ref_logits = hf_greedy(hf, prompt, 6)
        assert_greedy_matches(out.token_ids, ref, ref_logits)


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="checks the CPU refusal")
def test_fused_kernels_are_refused_on_cpu_naming_the_setting():
    from ultrakv.node import Engine, EngineConfig

    with pytest.raises(ValueError, match="fused_kernels"):
        Engine(EngineConfig(model="tiny", device="cpu", num_blocks=16, fused_kernels=True))
