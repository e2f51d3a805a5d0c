"""The PyTorch reference attention over paged blocks (CPU and CUDA).

Correct for any mix of sequences in one step (prefill from scratch, prefill after a cached
prefix, single-token decode): each sequence's context is gathered from its blocks into a
padded batch, and a mask gives every new token exactly the keys at or before its own
position. Simple and exact rather than fast; the GPU kernels are measured against it.
A quantized cache (int8 / fp8) is dequantized while the context is gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from ultrakv.node.attention.base import AttentionBackend, AttentionMetadata, write_kv
from ultrakv.node.kv import quantization


class TorchReferenceBackend(AttentionBackend):
    """Gather-from-blocks + ``scaled_dot_product_attention`` in float32.

    What depends only on the step (block indices, the causal mask, where each token sits in
    the padded batch) is computed once per step and shared by every layer: on a CPU, for a
    small model, those index ops cost as much as the attention itself when redone per layer.
    A decode-only step needs no padding at all: each sequence's query heads are grouped under
    their KV head, so grouped-query attention runs without repeating keys and values.
    """

    name = "torch"

    def __init__(self) -> None:
        self._plan: _StepPlan | None = None

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta.slot_mapping)
        num_tokens, num_heads, head_dim = q.shape
        num_seqs = meta.num_seqs
        num_kv_heads = kv_cache.shape[3]
        plan = self._plan_for(meta, kv_cache.shape[2], q.device)

        # Context of every sequence, padded to max_seq_len: [2, B, S, kv_heads, D]. Whole
        # blocks are copied with index_select over a [2, blocks, block elements] view: on a
        # CPU that is an order of magnitude faster than advanced indexing with the 2-D table.
        quantized = quantization.is_quantized(kv_cache.dtype)
        cache = kv_cache.view(torch.uint8) if quantized else kv_cache  # CPU cannot index fp8
        blocks = cache.view(2, cache.shape[1], -1).index_select(1, plan.flat_tables)
        kv = blocks.view(2, num_seqs, -1, *cache.shape[3:])[:, :, : meta.max_seq_len]
        if quantized:  # dequantized as the context is built
            kv = quantization.dequantize(kv.view(kv_cache.dtype), head_dim)
        keys = kv[0].transpose(1, 2).float()  # [B, KVH, S, D]
        values = kv[1].transpose(1, 2).float()

        if plan.decode:
            # One query per sequence: its heads, grouped by KV head, are the query rows.
            grouped = q.reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim).float()
            out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=plan.mask, scale=scale)
            return out.reshape(num_tokens, num_heads, head_dim).to(q.dtype)

        # Scatter the flat queries into a padded [B, max_query_len, H, D] batch.
        padded_q = q.new_zeros(num_seqs, meta.max_query_len, num_heads, head_dim)
        padded_q[plan.seq_of_token, plan.row_of_token] = q
        out = F.scaled_dot_product_attention(
            padded_q.transpose(1, 2).float(),  # [B, H, Lq, D]
            keys,
            values,
            attn_mask=plan.mask,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        return out.transpose(1, 2)[plan.seq_of_token, plan.row_of_token].to(q.dtype)

    def _plan_for(self, meta: AttentionMetadata, block_size: int, device: torch.device) -> _StepPlan:
        if self._plan is None or self._plan.meta is not meta:
            self._plan = _StepPlan.build(meta, block_size, device)
        return self._plan


@dataclass
class _StepPlan:
    """Per-step indices and mask, shared by every layer of one forward pass."""

    meta: AttentionMetadata  # held, so the identity check cannot match a recycled object
    flat_tables: torch.Tensor  # [B * blocks covering max_seq_len], int64, row-major
    mask: torch.Tensor  # [B, 1, Lq, S] bool (decode: [B, 1, 1, S])
    decode: bool
    seq_of_token: torch.Tensor | None = None  # [T]: sequence of each new token
    row_of_token: torch.Tensor | None = None  # [T]: its row in the padded batch

    @classmethod
    def build(cls, meta: AttentionMetadata, block_size: int, device: torch.device) -> _StepPlan:
        max_q, max_s = meta.max_query_len, meta.max_seq_len
        tables = meta.block_tables[:, : -(-max_s // block_size)].reshape(-1).long()
        seq_lens = meta.seq_lens.long()
        k_pos = torch.arange(max_s, device=device)
        num_tokens = int(meta.slot_mapping.shape[0])
        if max_q == 1 and num_tokens == meta.num_seqs:
            # The single new token is the last of its context: it sees every key before seq_len.
            # A padding sequence (seq_len 0) would see none, and SDPA turns an all-masked row
            # into NaN: let it see key 0 (its output is discarded).
            mask = k_pos[None, :] < seq_lens.clamp(min=1)[:, None]
            return cls(meta, tables, mask[:, None, None, :], decode=True)
        starts = meta.query_start_loc.long()
        q_lens = starts[1:] - starts[:-1]
        seq_of_token = torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), q_lens,
                                               output_size=num_tokens)
        row_of_token = torch.arange(num_tokens, device=device) - starts[seq_of_token]
        # New token r of sequence i sits at position (seq_len - q_len + r) of its context and
        # sees keys 0..that position; keys past seq_len are padding.
        q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]
        mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < seq_lens[:, None, None])
        # Padded query rows (and an empty padding sequence) would see no key at all; let them
        # see key 0 (output discarded).
        mask[:, :, 0] |= ~mask.any(dim=-1)
        return cls(meta, tables, mask[:, None, :, :], decode=False,
                   seq_of_token=seq_of_token, row_of_token=row_of_token)
