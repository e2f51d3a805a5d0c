"""The attention interface: one flat batch of new tokens against a paged KV cache.

A step's batch is flat: ``T`` new tokens from ``B`` sequences laid end to end (sequence
``i`` owns rows ``query_start_loc[i]:query_start_loc[i+1]``). Each sequence brings a block
table; its context (cached tokens followed by the new ones) lives in those blocks.

KV cache layout, one tensor per layer::

    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]   # [0] keys, [1] values

(a quantized cache, ``kv_cache_dtype`` int8 / fp8_e4m3, is int8 / float8_e4m3fn with each
row's float32 scale packed behind it: last dim ``head_dim + 4``; ``node/kv/quantization.py``.)

Token ``j`` of a sequence (0-based position in its context) lives in block
``block_tables[i, j // block_size]`` at offset ``j % block_size``. ``slot_mapping[t]`` is the
flat slot (``block * block_size + offset``) where new token ``t`` is written; -1 means
"don't write" (a padded row, e.g. in a CUDA graph replay).

A backend writes the new keys and values into the cache and then computes causal
attention of each new token over its sequence's context up to and including itself.
Backends are interchangeable: the PyTorch reference (CPU and CUDA) and the GPU kernels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from ultrakv.node.kv import quantization

TABLE_WIDTH_MULTIPLE = 16


def padded_table_width(num_blocks: int) -> int:
    """Block-table row width for ``num_blocks`` blocks: a multiple of 16, so the tables' row
    stride falls in one Triton specialization class for every batch (Triton specializes
    integer arguments on being 1 or a multiple of 16)."""
    return max(1, -(-num_blocks // TABLE_WIDTH_MULTIPLE)) * TABLE_WIDTH_MULTIPLE


@dataclass
class AttentionMetadata:
    """Where each new token sits; built once per step by the runner, shared by all layers.

    query_start_loc: int32 [B+1], cumulative new-token counts (query_start_loc[0] == 0).
    seq_lens:        int32 [B], context length of each sequence after this step
                     (cached tokens + new tokens).
    block_tables:    int32 [B, max_blocks_per_seq], padded with 0 past each sequence's blocks.
    slot_mapping:    int64 [T], flat cache slot of each new token (-1: skip).
    max_query_len:   largest new-token count in the batch (python int).
    max_seq_len:     largest context length in the batch (python int).
    """

    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @property
    def is_decode_only(self) -> bool:
        """Every sequence brings exactly one new token."""
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Writes new K/V into the paged cache, then attends each new query over its context."""

    name: str = "abstract"
    # True when a decode-only forward launches with shapes fixed by the padded batch and no
    # host syncs, so the runner may capture it in a CUDA graph.
    supports_cuda_graphs: bool = False
    # True when the backend has ``forward_qkv``: ``forward`` from the qkv projection's output
    # with RoPE fused into its KV write (the model uses it when its fused kernels are on).
    fuses_rope: bool = False

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k: torch.Tensor,  # [T, num_kv_heads, head_dim]
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        """Store k/v at ``meta.slot_mapping``; return causal attention output for q."""


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values into their cache slots (rows with slot -1 are skipped).

    A quantized cache (int8 / fp8, see ``node/kv/quantization.py``) gets each row quantized
    with its scale packed behind it; the scatter then moves bytes (CPU has no fp8 index_copy).
    """
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    if quantization.is_quantized(kv_cache.dtype):
        k = quantization.quantize(k, kv_cache.dtype).view(torch.uint8)
        v = quantization.quantize(v, kv_cache.dtype).view(torch.uint8)
        kv_cache = kv_cache.view(torch.uint8)
    flat = kv_cache.view(2, num_blocks * block_size, kv_cache.shape[3], kv_cache.shape[4])
    valid = slot_mapping >= 0
    if bool(valid.all()):
        flat[0].index_copy_(0, slot_mapping, k)
        flat[1].index_copy_(0, slot_mapping, v)
    else:
        idx = slot_mapping[valid]
        flat[0].index_copy_(0, idx, k[valid])
        flat[1].index_copy_(0, idx, v[valid])
