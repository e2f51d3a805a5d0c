"""CUDA graphs for decode steps: one graph replay instead of hundreds of kernel launches.

A decode step (every sequence brings one token) has a shape fixed by the batch size, so it
is captured once per (padded batch size, context-length bucket) the first time that shape
is seen, and replayed after copying the step's inputs into static buffers. Padded rows write
nowhere (slot -1) and attend over one token of block 0; their outputs are dropped.

The attention backend sizes its decode grid from ``meta.max_seq_len``; capturing at the
model's full context for every step would make short-context decode launch mostly idle
programs, so contexts are bucketed (x4 from 256 up to the model's limit).
"""

from __future__ import annotations

import bisect
import logging

import torch
from ultrakv.node.attention.base import AttentionMetadata

log = logging.getLogger("ultrakv.node.cuda_graphs")


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


class CudaGraphDecoder:
    """Captures and replays the model's forward for decode-only steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        max_batch: int,
        max_model_len: int,
        hidden_size: int,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.batch_sizes = padded_batch_sizes(max_batch)
        self.buckets = context_buckets(max_model_len)
        self.max_batch = self.batch_sizes[-1]
        max_blocks = -(-max_model_len // block_size)
        dev = device
        self.input_ids = torch.zeros(self.max_batch, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(self.max_batch, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((self.max_batch,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(self.max_batch, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(self.max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(self.max_batch + 1, dtype=torch.int32, device=dev)
        self.hidden_size = hidden_size
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def can_run(self, meta: AttentionMetadata) -> bool:
        return meta.is_decode_only and meta.num_seqs <= self.max_batch and meta.max_seq_len <= self.buckets[-1]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = meta.num_seqs
        batch = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        bucket = self.buckets[bisect.bisect_left(self.buckets, meta.max_seq_len)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables)
        if n < batch:  # padded rows: write nowhere, attend over one token of block 0
            self.slot_mapping[n:batch].fill_(-1)
            self.seq_lens[n:batch].fill_(1)
            self.block_tables[n:batch, 0].fill_(0)
        graph, out = self.graphs.get((batch, bucket)) or self._capture(batch, bucket)
        graph.replay()
        return out[:n]

    def _meta(self, batch: int, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            block_tables=self.block_tables[:batch],
            slot_mapping=self.slot_mapping[:batch],
            max_query_len=1,
            max_seq_len=bucket,
        )

    def _capture(self, batch: int, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        meta = self._meta(batch, bucket)
        args = (self.input_ids[:batch], self.positions[:batch], self.kv_caches, meta)
        # The step being replayed already holds its inputs in the buffers; a warm-up run on a
        # side stream compiles kernels and settles allocations before capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.model(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.model(*args)
        self.graphs[(batch, bucket)] = (graph, out)
        log.debug("captured decode graph: batch=%d context<=%d", batch, bucket)
        return graph, out
