"""The decoder against transformers: same logits for prefill, prefill after a cached prefix,
decode, and a mixed batch, for Llama (GQA + llama3 RoPE), Qwen2 (qkv bias) and Mistral."""

from __future__ import annotations

import copy

import pytest
import torch
from ultrakv.node.attention import AttentionMetadata, get_backend
from ultrakv.node.model.loader import load_model
from ultrakv.node.model.packed_linear import PackedLinear

transformers = pytest.importorskip("transformers")

BLOCK_SIZE = 8
NUM_BLOCKS = 24
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             attn_implementation="eager")


def _hf_configs():
    return {
        "llama": transformers.LlamaConfig(
            **SMALL, rope_theta=500000.0, tie_word_embeddings=True,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        "qwen2": transformers.Qwen2Config(**SMALL, rope_theta=1e6),
        "mistral": transformers.MistralConfig(**SMALL, head_dim=16, sliding_window=None),
        # Untied lm_head, bias on q/k/v/o, linear RoPE scaling.
        "llama-linear": transformers.LlamaConfig(
            **SMALL, attention_bias=True, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    }


class PagedSeqs:
    """Per-sequence block tables over one small cache; builds AttentionMetadata per step."""

    def __init__(self, num_seqs: int, blocks_per_seq: int):
        # Scrambled block ids so a wrong table lookup cannot pass by accident.
        perm = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(3))
        self.tables = perm[: num_seqs * blocks_per_seq].view(num_seqs, blocks_per_seq)

    def step(self, seqs: list[tuple[int, int]], seq_ids: list[int] | None = None):
        """``seqs``: (cached_len, new_len) per sequence -> (positions, meta)."""
        seq_ids = seq_ids if seq_ids is not None else list(range(len(seqs)))
        positions, slots = [], []
        for sid, (cached, new) in zip(seq_ids, seqs, strict=True):
            for p in range(cached, cached + new):
                positions.append(p)
                slots.append(int(self.tables[sid, p // BLOCK_SIZE]) * BLOCK_SIZE
                             + p % BLOCK_SIZE)
        new_lens = torch.tensor([n for _, n in seqs])
        seq_lens = torch.tensor([c + n for c, n in seqs], dtype=torch.int32)
        meta = AttentionMetadata(
            query_start_loc=torch.cat([torch.zeros(1), new_lens.cumsum(0)]).to(torch.int32),
            seq_lens=seq_lens,
            block_tables=self.tables[seq_ids].to(torch.int32),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            max_query_len=int(new_lens.max()),
            max_seq_len=int(seq_lens.max()),
        )
        return torch.tensor(positions), meta


def _kv_caches(cfg):
    c = cfg
    return [torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, c.num_key_value_heads, c.head_dim)
            for _ in range(c.num_hidden_layers)]


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "llama-linear"])
def pair(request, tmp_path_factory):
    """(our LoadedModel, the transformers model) from one saved random checkpoint."""
    torch.manual_seed(0)
    hf_cfg = _hf_configs()[request.param]
    cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
           "mistral": transformers.MistralForCausalLM,
           "llama-linear": transformers.LlamaForCausalLM}[request.param]
    hf = cls(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so loading them is checked too
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp(request.param)
    # Sharded save for llama exercises model.safetensors.index.json.
    hf.save_pretrained(path, max_shard_size="100KB" if request.param == "llama" else "1GB")
    ours = load_model(str(path), "float32", torch.device("cpu"), get_backend("auto", "cpu"))
    return ours, hf


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def test_architecture_parsed(pair):
    ours, hf = pair
    cfg = ours.config
    assert cfg.architecture == hf.config.model_type
    assert cfg.attention_bias == (cfg.architecture == "qwen2"
                                  or getattr(hf.config, "attention_bias", False))
    assert (ours.model.lm_head is None) == hf.config.tie_word_embeddings
    assert ours.tokenizer.vocab_size == 258  # no tokenizer.json saved: byte tokenizer


def test_prefill_then_cached_prefix_then_decode_match_transformers(pair):
    ours, hf = pair
    cfg = ours.config
    ids = torch.randint(0, cfg.vocab_size, (52,), generator=torch.Generator().manual_seed(1))
    ids = ids.tolist()
    expected = _hf_logits(hf, ids)
    caches = _kv_caches(cfg)
    seqs = PagedSeqs(1, 8)
    with torch.no_grad():
        # 1) 40-token prefill from scratch.
        pos, meta = seqs.step([(0, 40)])
        got = ours.model.compute_logits(ours.model(torch.tensor(ids[:40]), pos, caches, meta))
        torch.testing.assert_close(got, expected[:40], atol=1e-4, rtol=1e-4)
        # 2) 9 more tokens attending to the 40 cached ones (crosses block boundaries).
        pos, meta = seqs.step([(40, 9)])
        got = ours.model.compute_logits(ours.model(torch.tensor(ids[40:49]), pos, caches, meta))
        torch.testing.assert_close(got, expected[40:49], atol=1e-4, rtol=1e-4)
        # 3) single-token decode steps.
        for p in range(49, 52):
            pos, meta = seqs.step([(p, 1)])
            got = ours.model.compute_logits(ours.model(torch.tensor([ids[p]]), pos, caches, meta))
            torch.testing.assert_close(got[0], expected[p], atol=1e-4, rtol=1e-4)


def test_mixed_batch_prefill_and_decode_in_one_forward(pair):
    ours, hf = pair
    cfg = ours.config
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(0, cfg.vocab_size, (21,), generator=gen).tolist()  # decodes token 20
    b = torch.randint(0, cfg.vocab_size, (13,), generator=gen).tolist()  # prefills 13
    caches = _kv_caches(cfg)
    seqs = PagedSeqs(2, 4)
    with torch.no_grad():
        pos, meta = seqs.step([(0, 20)], seq_ids=[0])
        ours.model(torch.tensor(a[:20]), pos, caches, meta)
        pos, meta = seqs.step([(20, 1), (0, 13)])
        hidden = ours.model(torch.tensor([a[20], *b]), pos, caches, meta)
        got = ours.model.compute_logits(hidden)
    torch.testing.assert_close(got[0], _hf_logits(hf, a)[20], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1:], _hf_logits(hf, b), atol=1e-4, rtol=1e-4)


def test_packed_weights_match_transformers(pair):
    """The CPU engine's oneDNN-packed projections (with qkv bias, untied and tied output
    projections) give transformers' logits for a prefill and a decode step."""
    ours, hf = pair
    model = copy.deepcopy(ours.model)
    model.use_packed_weights()
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, PackedLinear) and isinstance(layer.mlp.down_proj, PackedLinear)
    assert model.packed_lm_head.transposed is not None  # the decode step below takes its single-row path
    ids = torch.randint(0, ours.config.vocab_size, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    expected = _hf_logits(hf, ids)
    caches = _kv_caches(ours.config)
    seqs = PagedSeqs(1, 4)
    with torch.inference_mode():
        pos, meta = seqs.step([(0, 29)])
        got = model.compute_logits(model(torch.tensor(ids[:29]), pos, caches, meta))
        torch.testing.assert_close(got, expected[:29], atol=1e-4, rtol=1e-4)
        pos, meta = seqs.step([(29, 1)])
        got = model.compute_logits(model(torch.tensor(ids[29:]), pos, caches, meta))
        torch.testing.assert_close(got[0], expected[29], atol=1e-4, rtol=1e-4)


def test_packing_refuses_a_model_it_cannot_pack(pair):
    ours, _ = pair
    model = copy.deepcopy(ours.model).to(torch.float64)
    with pytest.raises(ValueError, match="float32 model on a CPU"):
        model.use_packed_weights()
