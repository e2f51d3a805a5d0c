"""Paged attention cases for the quantized KV cache tests (CPU reference and Triton kernels).

A case is a few sequences with a cached prefix and some new tokens, laid out in shuffled
blocks of a cache of any storage dtype (float, int8, fp8). Its reference is float32 causal
attention over each sequence's dense keys and values, either the exact float ones or the ones
a quantized cache really holds (quantize then dequantize), so a test can separate the
quantization error from a kernel's own error.
"""

from __future__ import annotations

import torch
from ultrakv.node.attention.base import AttentionMetadata, write_kv
from ultrakv.node.kv import quantization

BLOCK_SIZE = 16


class QuantCase:
    """Sequence i has ``prefix_lens[i]`` tokens cached and ``new_lens[i]`` new ones."""

    def __init__(self, prefix_lens, new_lens, num_heads, num_kv_heads, head_dim, dtype, seed,
                 device="cpu"):
        g = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)
        self.prefix_lens, self.new_lens = list(prefix_lens), list(new_lens)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.dtype = dtype
        seq_lens = [p + n for p, n in zip(self.prefix_lens, self.new_lens, strict=True)]
        blocks_per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
        self.num_blocks = sum(blocks_per_seq) + 5
        perm = torch.randperm(self.num_blocks, generator=g)
        tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
        used = 0
        for i, nb in enumerate(blocks_per_seq):
            tables[i, :nb] = perm[used:used + nb].to(torch.int32)
            used += nb
        # Keys with an outlier channel, as real models have: a per-row scale must cope.
        self.keys = []
        for s in seq_lens:
            k = torch.randn(s, num_kv_heads, head_dim, generator=g)
            k[..., 3] *= 8.0
            self.keys.append(k.to(dtype))
        self.values = [torch.randn(s, num_kv_heads, head_dim, generator=g).to(dtype)
                       for s in seq_lens]
        self.prefix_slots, new_slots = [], []
        for i, (p, s) in enumerate(zip(self.prefix_lens, seq_lens, strict=True)):
            pos = torch.arange(s)
            slots = tables[i, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE
            self.prefix_slots.append(slots[:p])
            new_slots.append(slots[p:])
        self.q = torch.randn(sum(self.new_lens), num_heads, head_dim, generator=g).to(dtype)
        self.k = torch.cat([k[p:] for k, p in zip(self.keys, self.prefix_lens, strict=True)])
        self.v = torch.cat([v[p:] for v, p in zip(self.values, self.prefix_lens, strict=True)])
        starts = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        starts[1:] = torch.cumsum(torch.tensor(self.new_lens), 0)
        self.meta = AttentionMetadata(
            query_start_loc=starts.to(self.device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
            block_tables=tables.to(self.device),
            slot_mapping=torch.cat(new_slots).to(self.device),
            max_query_len=max(self.new_lens),
            max_seq_len=max(seq_lens),
        )
        self.scale = head_dim ** -0.5

    def cache(self, storage: torch.dtype) -> torch.Tensor:
        """A cache of ``storage`` holding every sequence's prefix (through the reference
        write path; the new tokens are for the backend under test to write)."""
        row = quantization.row_width(self.head_dim, storage)
        cache = torch.zeros(2, self.num_blocks, BLOCK_SIZE, self.num_kv_heads, row,
                            dtype=torch.uint8 if quantization.is_quantized(storage) else storage)
        cache = cache.view(storage)
        k = torch.cat([k[:p] for k, p in zip(self.keys, self.prefix_lens, strict=True)])
        v = torch.cat([v[:p] for v, p in zip(self.values, self.prefix_lens, strict=True)])
        write_kv(k, v, cache, torch.cat(self.prefix_slots))
        return cache.to(self.device)

    def reference(self, storage: torch.dtype | None = None) -> torch.Tensor:
        """Float32 causal attention; with ``storage`` quantized, over the keys and values such
        a cache holds (quantized, then dequantized)."""
        outs, row = [], 0
        group = self.num_heads // self.num_kv_heads
        for i, (p, n) in enumerate(zip(self.prefix_lens, self.new_lens, strict=True)):
            k, v = self.keys[i].float(), self.values[i].float()
            if storage is not None and quantization.is_quantized(storage):
                k = quantization.dequantize(quantization.quantize(k, storage), self.head_dim)
                v = quantization.dequantize(quantization.quantize(v, storage), self.head_dim)
            q = self.q[row:row + n].float().transpose(0, 1)
            k = k.repeat_interleave(group, 1).transpose(0, 1)
            v = v.repeat_interleave(group, 1).transpose(0, 1)
            scores = (q @ k.transpose(1, 2)) * self.scale
            q_pos = p + torch.arange(n)
            scores.masked_fill_(torch.arange(p + n)[None, None, :] > q_pos[None, :, None],
                                float("-inf"))
            outs.append((scores.softmax(-1) @ v).transpose(0, 1))
            row += n
        return torch.cat(outs)


def max_abs_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().float().cpu()
    assert not torch.isnan(out).any(), "output has NaN"
    return float((out - ref).abs().max())
