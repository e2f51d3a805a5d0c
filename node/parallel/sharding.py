"""Megatron-style splits of the Llama decoder over ``size`` tensor-parallel ranks (pure logic).

Column-parallel (rows of the weight split, no communication): q, k and v projections and the
MLP's gate and up projections. Row-parallel (columns split, outputs summed by an all-reduce):
the attention output projection and the MLP's down projection. Each rank therefore holds
``num_attention_heads / size`` query heads and ``num_key_value_heads / size`` KV heads (the
query heads of a group stay on the rank of their KV head, so GQA needs no communication),
and its KV cache holds only those heads. Embeddings, norms and the LM head are replicated:
every rank ends a layer with the full hidden state, which only rank 0 turns into logits.

Names are Hugging Face checkpoint names (``...self_attn.q_proj.weight``) or the model's own
fused names (``...self_attn.qkv_proj.weight``, ``...mlp.gate_up_proj.weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from ultrakv.node.model.config import ModelConfig

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
_ROW = ("o_proj", "down_proj")


@dataclass(frozen=True)
class TensorShard:
    """Which slice of the model a process holds: ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tensor parallel rank must be in [0, {self.size - 1}], got {self.rank}")


WHOLE = TensorShard()  # the whole model: no tensor parallelism


def check_divisible(config: ModelConfig, size: int) -> None:
    """ValueError naming the field when ``config`` cannot be split ``size`` ways."""
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, name)
        if value % size:
            raise ValueError(f"tensor_parallel_size {size} must divide the model's {name} ({value}); "
                             f"use a tensor_parallel_size that divides it")


def shard_config(config: ModelConfig, size: int) -> ModelConfig:
    """The config of one rank's slice: heads, KV heads and the MLP width divided by ``size``.

    Building the decoder from it gives every projection its sharded shape, and the KV cache
    sized from it holds the rank's heads only.
    """
    check_divisible(config, size)
    if size == 1:
        return config
    return replace(config, num_attention_heads=config.num_attention_heads // size,
                   num_key_value_heads=config.num_key_value_heads // size,
                   intermediate_size=config.intermediate_size // size)


def shard_checkpoint_tensor(name: str, tensor: torch.Tensor, shard: TensorShard) -> torch.Tensor:
    """The part of checkpoint tensor ``name`` (HF naming) that ``shard`` holds.

    A row-parallel bias is added once, after the all-reduce would have summed it ``size``
    times: rank 0 keeps it and the others get zeros.
    """
    if shard.size == 1:
        return tensor
    parts = name.split(".")
    proj = parts[-2] if len(parts) >= 2 else ""
    if proj in _COLUMN:
        return tensor.chunk(shard.size, dim=0)[shard.rank]
    if proj in _ROW:
        if parts[-1] == "bias":
            return tensor if shard.rank == 0 else torch.zeros_like(tensor)
        return tensor.chunk(shard.size, dim=1)[shard.rank]
    return tensor


def shard_parameter(name: str, full: torch.Tensor, config: ModelConfig, shard: TensorShard) -> torch.Tensor:
    """The part of the model's full (unsharded) parameter ``name`` that ``shard`` holds.

    Fused projections are split into their checkpoint parts, each part sharded, and the
    rank's pieces concatenated again, so ``qkv_proj`` of a rank is [its q; its k; its v].
    """
    if shard.size == 1:
        return full
    prefix, _, leaf = name.rpartition(".")
    module = prefix.rpartition(".")[2]
    base = prefix.rpartition(".")[0]
    if module == "qkv_proj":
        pieces = full.split([config.q_size, config.kv_size, config.kv_size], dim=0)
        names = ("q_proj", "k_proj", "v_proj")
    elif module == "gate_up_proj":
        pieces = full.split(config.intermediate_size, dim=0)
        names = ("gate_proj", "up_proj")
    else:
        return shard_checkpoint_tensor(name, full, shard)
    return torch.cat([shard_checkpoint_tensor(f"{base}.{n}.{leaf}", p, shard)
                      for n, p in zip(names, pieces, strict=True)])


def kv_head_slice(num_kv_heads: int, shard: TensorShard) -> slice:
    """The KV heads (of the whole model's ``num_kv_heads``) that ``shard``'s cache holds."""
    per_rank = num_kv_heads // shard.size
    return slice(shard.rank * per_rank, (shard.rank + 1) * per_rank)
