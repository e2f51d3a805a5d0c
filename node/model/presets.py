"""Synthetic models: real shapes, seeded random weights (like vLLM's dummy load format).

``tiny`` is for tests (fast on CPU); ``llama-1b``, ``llama-8b`` and ``smollm2-shape`` have the
exact shapes of Llama-3.2-1B, Llama-3-8B and SmolLM2-135M for benchmarks. All use the byte tokenizer (ids < 258; the
128256-entry vocabularies are kept so the embedding and lm_head cost what they really cost).
"""

from __future__ import annotations

import math

import torch
from ultrakv.node.model.config import ModelConfig
from ultrakv.node.model.llama import LlamaForCausalLM
from ultrakv.node.parallel.sharding import WHOLE, TensorShard, shard_parameter
from ultrakv.node.tokenizer import ByteTokenizer

_BYTE_SPECIALS = {"bos_token_id": ByteTokenizer.BOS, "eos_token_ids": [ByteTokenizer.EOS]}

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        architecture="llama", vocab_size=320, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
        torch_dtype="float32", **_BYTE_SPECIALS),
    "llama-1b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=True, torch_dtype="bfloat16", **_BYTE_SPECIALS),
    "llama-8b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
        torch_dtype="bfloat16", **_BYTE_SPECIALS),
    # SmolLM2-135M's shapes (the real default model, smollm2-135m) with random weights: its
    # speed on a GPU where the packaged GGUF cannot be brought (benchmarks).
    "smollm2-shape": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, torch_dtype="bfloat16", **_BYTE_SPECIALS),
}


def preset_config(name: str) -> ModelConfig:
    """A copy of preset ``name``'s config; ValueError listing the presets if unknown."""
    if name not in PRESETS:
        raise ValueError(f"model must be one of the presets {sorted(PRESETS)} or a checkpoint "
                         f"directory, got {name!r}")
    return ModelConfig(**PRESETS[name].to_dict())


@torch.no_grad()
def init_random_weights(model: LlamaForCausalLM, seed: int, full_config: ModelConfig | None = None,
                        shard: TensorShard = WHOLE) -> None:
    """Fill every parameter from a generator seeded with ``seed`` on the model's device.

    Matrices get N(0, 1/fan_in), so activations and logits stay O(1) at every width (greedy
    output then depends on the input); norms get 1 and biases 0. Values are drawn in place
    in the parameter's own dtype and device, so an 8B model fills in well under a second on
    a GPU. Identical on every process with the same seed, device type and dtype.

    A tensor-parallel slice (``model`` built from the shard config of ``full_config``) draws
    each whole parameter, one at a time, and keeps its ``shard``: its weights are exactly
    the single-process model's.
    """
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    full_shapes = None
    if shard.size > 1:
        with torch.device("meta"):
            whole = LlamaForCausalLM(full_config, model.attn)
        full_shapes = {name: p.shape for name, p in whole.named_parameters()}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        elif full_shapes is None:
            param.normal_(0.0, 1.0 / math.sqrt(param.shape[1]), generator=gen)
        else:
            full = torch.empty(full_shapes[name], dtype=param.dtype, device=device)
            full.normal_(0.0, 1.0 / math.sqrt(full.shape[1]), generator=gen)
            param.copy_(shard_parameter(name, full, full_config, shard))
