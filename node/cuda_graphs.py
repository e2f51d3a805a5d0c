"""CUDA graphs for decode steps and short single-sequence prefills.

Eager, a step of a 16-layer model launches a few hundred kernels from Python, which costs
more than the GPU work itself for decode and for the short prefill of a conversation's next
turn. Such steps are captured once per shape and replayed after copying the step's inputs
into static buffers:

* decode (every sequence brings one token): keyed by (padded batch size, context bucket).
  Padded rows write nowhere (slot -1) and attend over one token of block 0.
* prefill of one sequence (<= ``max_prefill_tokens`` new tokens, the TTFT-critical case):
  keyed by (padded token count, context bucket). Padded tokens sit after the real ones, write
  nowhere and repeat the last real position; causal masking keeps real tokens from seeing
  them, and their outputs are dropped.

The attention backend sizes its grids from ``meta.max_seq_len`` and ``max_query_len``, so a
capture fixes them; contexts are bucketed (x4 from 256 up to the model's limit) so short
contexts don't replay grids sized for the longest one.
"""

from __future__ import annotations

import bisect
import logging

import torch
from ultrakv.node.attention.base import AttentionMetadata, padded_table_width

log = logging.getLogger("ultrakv.node.cuda_graphs")

# Fine steps: padding is wasted compute, and a short prefill is the next turn's whole TTFT.
PREFILL_TOKEN_BUCKETS = (16, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def padded_batch_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every multiple of 16 up to ``max_batch``."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch + 1, 16))
    if not sizes or sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


def context_buckets(max_model_len: int, first: int = 256, factor: int = 4) -> list[int]:
    buckets = []
    b = first
    while b < max_model_len:
        buckets.append(b)
        b *= factor
    buckets.append(max_model_len)
    return buckets


class CudaGraphRunner:
    """Captures and replays the model's forward for decode steps and short prefills."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        max_batch: int,
        max_model_len: int,
        max_prefill_tokens: int = PREFILL_TOKEN_BUCKETS[-1],
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.batch_sizes = padded_batch_sizes(max_batch)
        self.prefill_sizes = [t for t in PREFILL_TOKEN_BUCKETS if t <= max_prefill_tokens]
        self.buckets = context_buckets(max_model_len)
        self.max_batch = self.batch_sizes[-1]
        rows = max(self.max_batch, self.prefill_sizes[-1] if self.prefill_sizes else 0)
        max_blocks = padded_table_width(-(-max_model_len // block_size))
        dev = device
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(self.max_batch, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(self.max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.decode_qsl = torch.arange(self.max_batch + 1, dtype=torch.int32, device=dev)
        self.prefill_qsl = {t: torch.tensor([0, t], dtype=torch.int32, device=dev) for t in self.prefill_sizes}
        self.graphs: dict[tuple[str, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _is_prefill(self, meta: AttentionMetadata) -> bool:
        if meta.is_decode_only or meta.num_seqs != 1 or not self.prefill_sizes:
            return False
        if meta.max_query_len > self.prefill_sizes[-1]:
            return False
        size = self.prefill_sizes[bisect.bisect_left(self.prefill_sizes, meta.max_query_len)]
        # The padded sequence must stay inside the model's context (and the block tables).
        return meta.max_seq_len + size - meta.max_query_len <= self.buckets[-1]

    def can_run(self, meta: AttentionMetadata) -> bool:
        if meta.max_seq_len > self.buckets[-1]:
            return False
        if meta.is_decode_only:
            return meta.num_seqs <= self.max_batch
        return self._is_prefill(meta)

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = input_ids.shape[0]
        bucket = self.buckets[bisect.bisect_left(self.buckets, meta.max_seq_len)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        width = meta.block_tables.shape[1]
        if self._is_prefill(meta):
            kind, size = "prefill", self.prefill_sizes[bisect.bisect_left(self.prefill_sizes, n)]
            pad = size - n
            self.slot_mapping[n:size].fill_(-1)
            self.positions[n:size].copy_(positions[n - 1 :].expand(pad))
            # The padded tokens extend the sequence; only they can see the unwritten slots.
            torch.add(meta.seq_lens, pad, out=self.seq_lens[:1])
            # Entries past the real table are stale but valid block ids: only padding reads them.
            self.block_tables[:1, :width].copy_(meta.block_tables)
            bucket = self.buckets[bisect.bisect_left(self.buckets, min(meta.max_seq_len + pad, self.buckets[-1]))]
        else:
            kind, size = "decode", self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
            self.seq_lens[:n].copy_(meta.seq_lens)
            self.block_tables[:n, :width].copy_(meta.block_tables)
            if n < size:  # padded rows: write nowhere, attend over one token of block 0
                self.slot_mapping[n:size].fill_(-1)
                self.seq_lens[n:size].fill_(1)
                self.block_tables[n:size, 0].fill_(0)
        graph, out = self.graphs.get((kind, size, bucket)) or self._capture(kind, size, bucket)
        graph.replay()
        return out[:n]

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every decode and prefill shape now (at startup), so no request pays for a
        capture; returns how many graphs were captured. Dummy inputs write nowhere (slot -1)."""
        before = len(self.graphs)
        self.input_ids.zero_()
        self.slot_mapping.fill_(-1)
        self.block_tables.zero_()
        for bucket in self.buckets:
            for size in self.batch_sizes:
                self.seq_lens.fill_(1)
                self.positions.zero_()
                if ("decode", size, bucket) not in self.graphs:
                    self._capture("decode", size, bucket)
            for size in self.prefill_sizes:
                if size > bucket or ("prefill", size, bucket) in self.graphs:
                    continue
                self.seq_lens[:1].fill_(size)
                self.positions[:size].copy_(torch.arange(size, device=self.positions.device))
                self._capture("prefill", size, bucket)
        torch.cuda.synchronize()
        return len(self.graphs) - before

    def _meta(self, kind: str, size: int, bucket: int) -> AttentionMetadata:
        if kind == "prefill":
            return AttentionMetadata(
                query_start_loc=self.prefill_qsl[size],
                seq_lens=self.seq_lens[:1],
                block_tables=self.block_tables[:1],
                slot_mapping=self.slot_mapping[:size],
                max_query_len=size,
                max_seq_len=bucket,
            )
        return AttentionMetadata(
            query_start_loc=self.decode_qsl[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            max_query_len=1,
            max_seq_len=bucket,
        )

    def _capture(self, kind: str, size: int, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        meta = self._meta(kind, size, bucket)
        args = (self.input_ids[:size], self.positions[:size], self.kv_caches, meta)
        # The step being replayed already holds its inputs in the buffers, so the warm-up run
        # (on a side stream: it compiles kernels and settles allocations) does the real work.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(*args)
        self.graphs[(kind, size, bucket)] = (graph, out)
        log.debug("captured %s graph: size=%d context<=%d", kind, size, bucket)
        return graph, out
