"""Loader errors, config parsing, presets, backend selection, and the reference attention."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from ultrakv.node.attention import AttentionMetadata, TorchReferenceBackend, get_backend
from ultrakv.node.model.config import ModelConfig
from ultrakv.node.model.llama import LlamaForCausalLM
from ultrakv.node.model.loader import load_model
from ultrakv.node.model.presets import PRESETS

transformers = pytest.importorskip("transformers")
CPU = torch.device("cpu")


def _load(path, **kw):
    return load_model(str(path), kw.pop("dtype", "auto"), CPU, get_backend("torch", CPU), **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _copy(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        _load(tmp_path / "nope")


def test_missing_config_json(checkpoint, tmp_path):
    bad = _copy(checkpoint, tmp_path / "c", skip={"config.json"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        _load(bad)


def test_missing_weight_file(checkpoint, tmp_path):
    bad = _copy(checkpoint, tmp_path / "c", skip={"model.safetensors"})
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        _load(bad)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    bad = _copy(checkpoint, tmp_path / "c")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.0.self_attn.k_proj.weight"):
        _load(bad)


def test_misshapen_tensor_is_named(checkpoint, tmp_path):
    bad = _copy(checkpoint, tmp_path / "c")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(31)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(32,\).*\(31,\)"):
        _load(bad)


def test_unknown_architecture_names_the_field(checkpoint, tmp_path):
    bad = _copy(checkpoint, tmp_path / "c")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architectures must contain one of"):
        _load(bad)


def test_checkpoint_dtype_and_fingerprint(checkpoint):
    a, b = _load(checkpoint), _load(checkpoint, dtype="bfloat16")
    assert a.dtype == torch.float32  # auto on CPU
    assert b.model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert a.fingerprint == _load(checkpoint).fingerprint
    assert a.fingerprint != b.fingerprint
    assert a.name == checkpoint.name


def test_from_hf_classic_rope_keys_and_eos_list():
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
          "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
          "num_key_value_heads": 8, "max_position_embeddings": 131072, "rope_theta": 5e5,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
          "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
          "torch_dtype": "bfloat16"}
    c = ModelConfig.from_hf(hf)
    assert (c.head_dim, c.rope_theta, c.rope_scaling["rope_type"]) == (128, 5e5, "llama3")
    assert c.eos_token_ids == [128001, 128008, 128009] and c.torch_dtype == "bfloat16"
    assert ModelConfig.from_hf({**hf, "rope_scaling": {"type": "linear", "factor": 2.0}}
                               ).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(ValueError, match="rope_scaling.rope_type must be one of"):
        ModelConfig.from_hf({**hf, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="num_attention_heads must be a multiple"):
        ModelConfig.from_hf({**hf, "num_key_value_heads": 5})


def test_preset_same_seed_same_weights_other_seed_differs():
    a, b, c = _load("tiny", seed=7), _load("tiny", seed=7), _load("tiny", seed=8)
    for (name, pa), pb in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.model.embed_tokens.weight, c.model.model.embed_tokens.weight)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.tokenizer.eos_token_ids == [a.config.eos_token_ids[0]] == [257]


def test_tiny_greedy_logits_depend_on_input():
    loaded = _load("tiny")
    m, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
    caches = [torch.zeros(2, 8, 32, cfg.num_key_value_heads, cfg.head_dim)
              for _ in range(cfg.num_hidden_layers)]
    last_logits = []
    for i, text in enumerate(["Hello", "The quick brown fox", "12345", "zzz", "Über"]):
        ids = tok.encode(text, add_bos=True)
        n = len(ids)
        meta = AttentionMetadata(
            query_start_loc=torch.tensor([0, n], dtype=torch.int32),
            seq_lens=torch.tensor([n], dtype=torch.int32),
            block_tables=torch.tensor([[i]], dtype=torch.int32),
            slot_mapping=torch.arange(i * 32, i * 32 + n), max_query_len=n, max_seq_len=n)
        with torch.no_grad():
            h = m(torch.tensor(ids), torch.arange(n), caches, meta)
            last_logits.append(m.compute_logits(h[-1:])[0])
    logits = torch.stack(last_logits)
    assert torch.isfinite(logits).all()
    assert 0.3 < float(logits.std()) < 30  # neither vanishing nor exploding
    assert len({int(x) for x in logits.argmax(-1)}) >= 3


@pytest.mark.parametrize("name,params", [("llama-1b", 1.236e9), ("llama-8b", 8.03e9), ("smollm2-shape", 134.5e6)])
def test_benchmark_presets_have_real_shapes(name, params):
    with torch.device("meta"):
        model = LlamaForCausalLM(PRESETS[name], TorchReferenceBackend())
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - params) / params < 0.005, total


def test_get_backend_names_the_field():
    assert isinstance(get_backend("auto", "cpu"), TorchReferenceBackend)
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        get_backend("flash", "cpu")


def test_reference_attention_mixed_batch_against_naive():
    """Three sequences (fresh prefill, decode, prefill after a prefix) plus a padding row."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, d, bs, nblocks = 4, 2, 8, 4, 16
    cache = torch.zeros(2, nblocks, bs, kv_heads, d)
    tables = torch.tensor([[3, 9, 0, 0], [12, 1, 5, 0], [7, 2, 14, 11]])
    seqs = [(0, 5), (9, 1), (7, 6)]  # (cached, new)
    full_k = [torch.randn(c + n, kv_heads, d, generator=gen) for c, n in seqs]
    full_v = [torch.randn(c + n, kv_heads, d, generator=gen) for c, n in seqs]
    full_q = [torch.randn(n, heads, d, generator=gen) for _, n in seqs]
    flat_cache = cache.view(2, nblocks * bs, kv_heads, d)
    slots = []
    for i, (c, n) in enumerate(seqs):
        all_slots = [int(tables[i, p // bs]) * bs + p % bs for p in range(c + n)]
        flat_cache[0, all_slots[:c]] = full_k[i][:c]  # the cached prefix, already in place
        flat_cache[1, all_slots[:c]] = full_v[i][:c]
        slots += all_slots[c:]
    # A padding sequence: one row, slot -1, no context.
    q = torch.cat([*full_q, torch.randn(1, heads, d, generator=gen)])
    k = torch.cat([fk[c:] for fk, (c, _) in zip(full_k, seqs, strict=True)]
                  + [torch.randn(1, kv_heads, d)])
    v = torch.cat([fv[c:] for fv, (c, _) in zip(full_v, seqs, strict=True)]
                  + [torch.randn(1, kv_heads, d)])
    before = cache.clone()
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0, 5, 6, 12, 13], dtype=torch.int32),
        seq_lens=torch.tensor([5, 10, 13, 0], dtype=torch.int32),
        block_tables=torch.cat([tables, torch.zeros(1, 4, dtype=torch.long)]).int(),
        slot_mapping=torch.tensor([*slots, -1]), max_query_len=6, max_seq_len=13)
    scale = 1 / math.sqrt(d)
    out = TorchReferenceBackend().forward(q, k, v, cache, meta, scale)
    assert out.shape == (13, heads, d) and torch.isfinite(out).all()
    written = (cache != before).any(-1).any(-1).view(2, -1)[0].nonzero().flatten().tolist()
    assert sorted(written) == sorted(slots)
    row = 0
    for i, (c, n) in enumerate(seqs):
        kk = full_k[i].repeat_interleave(heads // kv_heads, dim=1)  # [S, H, D]
        vv = full_v[i].repeat_interleave(heads // kv_heads, dim=1)
        for r in range(n):
            s = torch.einsum("hd,shd->hs", full_q[i][r], kk[: c + r + 1]) * scale
            want = torch.einsum("hs,shd->hd", s.softmax(-1), vv[: c + r + 1])
            torch.testing.assert_close(out[row], want, atol=1e-5, rtol=1e-5)
            row += 1
