"""Turns a scheduled step into flat tensors, runs the model, and samples.

The batch is built with a handful of tensor ops (no per-token Python loops): positions and
cache slots come from each sequence's computed count and block table by repeat_interleave
and a gather. Only the last position of each sequence whose chunk reaches its end is turned
into logits and sampled.
"""

from __future__ import annotations

import torch
from ultrakv.node.attention.base import AttentionMetadata
from ultrakv.node.cuda_graphs import CudaGraphDecoder
from ultrakv.node.sampler import SamplingTensors, sample
from ultrakv.node.scheduler import ScheduledSeq


class ModelRunner:
    """Executes one scheduled step on the model and its paged KV cache."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        graphs: CudaGraphDecoder | None = None,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.graphs = graphs

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq]) -> list[int | None]:
        """Run one step; returns the sampled token for each scheduled item (None: mid-prefill)."""
        input_ids, positions, meta = self.prepare(scheduled)
        if self.graphs is not None and self.graphs.can_run(meta):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        rows = [i for i, item in enumerate(scheduled) if item.samples]
        if not rows:
            return [None] * len(scheduled)
        last = (meta.query_start_loc[1:] - 1).long()[torch.tensor(rows, device=self.device)]
        logits = self.model.compute_logits(hidden[last])
        tokens = sample(logits, self._sampling_tensors([scheduled[i] for i in rows])).tolist()
        out: list[int | None] = [None] * len(scheduled)
        for row, tok in zip(rows, tokens, strict=True):
            out[row] = int(tok)
        return out

    def prepare(self, scheduled: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        starts = [item.seq.num_computed_tokens for item in scheduled]
        lens = [item.num_new_tokens for item in scheduled]
        tokens: list[int] = []
        for item, start, n in zip(scheduled, starts, lens, strict=True):
            tokens.extend(item.seq.token_ids[start : start + n])
        max_blocks = max(len(item.seq.block_table) for item in scheduled)
        table = [item.seq.block_table + [0] * (max_blocks - len(item.seq.block_table)) for item in scheduled]

        starts_t = torch.tensor(starts, dtype=torch.int64)
        lens_t = torch.tensor(lens, dtype=torch.int64)
        block_tables = torch.tensor(table, dtype=torch.int32)
        qsl = torch.zeros(len(scheduled) + 1, dtype=torch.int32)
        torch.cumsum(lens_t, 0, out=qsl[1:])
        seq_idx = torch.repeat_interleave(torch.arange(len(scheduled)), lens_t)
        offset_in_chunk = torch.arange(int(qsl[-1])) - qsl[:-1].long()[seq_idx]
        positions = starts_t[seq_idx] + offset_in_chunk
        slots = block_tables[seq_idx, positions // bs].long() * bs + positions % bs
        seq_lens = (starts_t + lens_t).to(torch.int32)

        dev = self.device
        meta = AttentionMetadata(
            query_start_loc=qsl.to(dev, non_blocking=True),
            seq_lens=seq_lens.to(dev, non_blocking=True),
            block_tables=block_tables.to(dev, non_blocking=True),
            slot_mapping=slots.to(dev, non_blocking=True),
            max_query_len=max(lens),
            max_seq_len=int(seq_lens.max()),
        )
        input_ids = torch.tensor(tokens, dtype=torch.int64).to(dev, non_blocking=True)
        return input_ids, positions.to(dev, non_blocking=True), meta

    def _sampling_tensors(self, items: list[ScheduledSeq]) -> SamplingTensors:
        dev = self.device
        return SamplingTensors(
            temperature=torch.tensor(
                [float(i.seq.sampling.temperature) for i in items], dtype=torch.float32, device=dev
            ),
            top_k=torch.tensor([i.seq.sampling.top_k for i in items], dtype=torch.int64, device=dev),
            top_p=torch.tensor([float(i.seq.sampling.top_p) for i in items], dtype=torch.float32, device=dev),
            generators=[i.seq.generator for i in items],
        )
