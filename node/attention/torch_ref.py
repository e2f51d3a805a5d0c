"""The PyTorch reference attention over paged blocks (CPU and CUDA).

Correct for any mix of sequences in one step (prefill from scratch, prefill after a cached
prefix, single-token decode): each sequence's context is gathered from its blocks into a
padded batch, and a mask gives every new token exactly the keys at or before its own
position. Simple and exact rather than fast; the GPU kernels are measured against it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ultrakv.node.attention.base import AttentionBackend, AttentionMetadata, write_kv


class TorchReferenceBackend(AttentionBackend):
    """Gather-from-blocks + ``scaled_dot_product_attention`` in float32."""

    name = "torch"

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
        block_size = kv_cache.shape[2]
        max_q, max_s = meta.max_query_len, meta.max_seq_len
        device = q.device

        # Context of every sequence, padded to max_seq_len: [B, S, kv_heads, D].
        num_ctx_blocks = -(-max_s // block_size)
        tables = meta.block_tables[:, :num_ctx_blocks].long()
        keys = kv_cache[0][tables].flatten(1, 2)[:, :max_s]
        values = kv_cache[1][tables].flatten(1, 2)[:, :max_s]

        # Scatter the flat queries into a padded [B, max_query_len, H, D] batch.
        starts = meta.query_start_loc.long()
        q_lens = starts[1:] - starts[:-1]
        seq_of_token = torch.repeat_interleave(
            torch.arange(num_seqs, device=device), q_lens, output_size=num_tokens)
        row_of_token = torch.arange(num_tokens, device=device) - starts[seq_of_token]
        padded_q = q.new_zeros(num_seqs, max_q, num_heads, head_dim)
        padded_q[seq_of_token, row_of_token] = q

        # New token r of sequence i sits at position (seq_len - q_len + r) of its context and
        # sees keys 0..that position; keys past seq_len are padding.
        seq_lens = meta.seq_lens.long()
        q_pos = (seq_lens - q_lens)[:, None] + torch.arange(max_q, device=device)[None, :]
        k_pos = torch.arange(max_s, device=device)
        mask = (k_pos[None, None, :] <= q_pos[:, :, None]) & (
            k_pos[None, None, :] < seq_lens[:, None, None])
        # Padded query rows of an empty (seq_len 0) padding sequence would see no key at all,
        # and SDPA turns an all-masked row into NaN; let them see key 0 (output discarded).
        mask[:, :, 0] |= ~mask.any(dim=-1)

        out = F.scaled_dot_product_attention(
            padded_q.transpose(1, 2).float(),            # [B, H, Lq, D]
            keys.transpose(1, 2).float(),                # [B, KVH, S, D]
            values.transpose(1, 2).float(),
            attn_mask=mask[:, None, :, :],
            scale=scale,
            enable_gqa=num_heads != keys.shape[2],
        )
        return out.transpose(1, 2)[seq_of_token, row_of_token].to(q.dtype)
