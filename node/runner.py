"""Turns a scheduled step into flat tensors, runs the model, and samples.

The batch is built on the host with a handful of numpy ops on views of pinned staging
buffers (no per-token Python loops): positions and cache slots come from each sequence's
computed count and block table by a repeat and a gather. Everything the device needs goes
over in two copies (one int64 buffer, one int32), so a step costs two transfers, not one per
tensor. A step that is one sequence's short prefill (the next turn of a conversation) skips
all that: its inputs are staged straight into the prefill CUDA graph's buffer and sent in one
copy (node/cuda_graphs.py). Only the last position of each sequence whose chunk reaches its
end becomes logits; an all-greedy batch samples with one argmax and no other host-device
round trip.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch
from ultrakv.node import kernel_variants
from ultrakv.node.attention.base import AttentionMetadata, padded_table_width
from ultrakv.node.attention.triton_backend import triton_available
from ultrakv.node.cuda_graphs import CudaGraphRunner
from ultrakv.node.piecewise_graphs import PiecewiseForward
from ultrakv.node.sampler import SamplingTensors, sample
from ultrakv.node.scheduler import ScheduledSeq
from ultrakv.node.step_shapes import row_bucket, row_buckets, token_bucket, token_buckets


class LayerLoads(Protocol):
    """KV blocks on their way into the caches layer by layer (node/kv/tiers.py, layer-wise
    loads), which the model's layer hook puts in place as the forward reaches them."""

    def layers_ready(self) -> None: ...


def _align(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class ModelRunner:
    """Executes one scheduled step on the model and its paged KV cache."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        device: torch.device,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        graphs: CudaGraphRunner | None = None,
        pad_eager_steps: bool | None = None,
        piecewise: PiecewiseForward | None = None,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.graphs = graphs
        # Eager steps' layers around their attention, replayed per padded token count.
        self.piecewise = piecewise
        # Set by the engine with layer-wise tier loads: an eager step's layer loop paces them
        # (the model's hook); a step that replays a CUDA graph readies them all first (a graph
        # calls no hook). The scheduler loads layer-wise only for prefills that will not
        # replay a graph, so this is a safety net, not the path.
        self.layer_loads: LayerLoads | None = None
        pin = device.type == "cuda"
        # An eager step's tokens and sampled rows padded to a fixed set of counts (see
        # node/step_shapes.py), on CUDA where cuBLAS pays for each new shape; the padding
        # extends the last sequence, so its context may run up to that far past the model's.
        self.pad_eager_steps = pin if pad_eager_steps is None else pad_eager_steps
        self.max_num_batched_tokens, self.max_num_seqs = max_num_batched_tokens, max_num_seqs
        max_pad = token_bucket(max_num_batched_tokens) - 1
        self._max_blocks = padded_table_width(math.ceil((max_model_len + max_pad) / block_size))
        # int64: input ids, positions, slots (T each) and the rows to sample (<= B)
        t = _align(token_bucket(max_num_batched_tokens), 2)
        self._stage64 = torch.empty(3 * t + row_bucket(max_num_seqs), dtype=torch.int64, pin_memory=pin)
        # int32: query_start_loc (B+1), seq_lens (B), block tables (B x max blocks)
        self._stage32 = torch.empty(
            _align(max_num_seqs + 1, 4) + _align(max_num_seqs, 4) + max_num_seqs * self._max_blocks,
            dtype=torch.int32, pin_memory=pin,
        )
        self._host64, self._host32 = self._stage64.numpy(), self._stage32.numpy()
        # The staging buffers are reused; a step must not overwrite them while the previous
        # step's copies may still be in flight (a step that samples nothing never syncs).
        self._copied = torch.cuda.Event() if pin else None
        # Pinned landing buffers for decode steps' tokens (see decode_steps), one per step
        # that can be queued or being read at once.
        self._token_ring = [torch.empty(max_num_seqs, dtype=torch.int64, pin_memory=True)
                            for _ in range(8)] if pin else []
        # Greedy rows' argmax: one split Triton launch on CUDA (node/sampling_kernels.py),
        # unless ULTRAKV_KERNELS picks torch.argmax (node/kernel_variants.py).
        self._split_argmax = None
        if device.type == "cuda" and kernel_variants.current().argmax == "split" and triton_available():
            from ultrakv.node.sampling_kernels import SplitArgmax

            self._split_argmax = SplitArgmax(device)
        if graphs is not None and triton_available():
            graphs.greedy = self._greedy  # greedy decode rounds replay whole steps

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq],
                while_running: Callable[[], None] | None = None) -> list[int | None]:
        """Run one step; returns the sampled token for each scheduled item (None: mid-prefill).

        ``while_running`` is called once the step's work is queued on the device and before
        its tokens are waited for: host work that would otherwise sit on the step's critical
        path (the KV tiers' offload bookkeeping) runs while the device computes."""
        rows = [i for i, item in enumerate(scheduled) if item.samples]
        graphed = self._prefill_graph_step(scheduled)
        if graphed is not None:
            hidden = graphed
            selected = hidden[-1:]  # one sequence: its last token is the row to sample
        else:
            input_ids, positions, meta, last = self.prepare(scheduled, rows, pad=self.pad_eager_steps)
            hidden = self._forward(input_ids, positions, meta)
            # Decode steps sample every row, and row i is token i: no gather needed.
            selected = hidden if hidden.shape[0] == len(rows) else hidden[last]
        if not rows:
            if while_running is not None:
                while_running()
            return [None] * len(scheduled)
        sampled = self._sample(selected, self._sampling_for([scheduled[i] for i in rows]), len(rows))
        if while_running is not None:
            while_running()
        tokens = sampled.tolist()
        out: list[int | None] = [None] * len(scheduled)
        for row, tok in zip(rows, tokens, strict=True):
            out[row] = int(tok)
        return out

    @torch.inference_mode()
    def warm_matmuls(self) -> int:
        """Run every matrix product of an eager step once at each padded row count it can
        meet (node/step_shapes.py): each distinct linear layer at every token bucket, the
        output projection at every row bucket, so cuBLAS meets no new shape while serving.
        Returns how many products ran. (Under tensor parallelism only this rank's slices.)"""
        model = self.model if isinstance(self.model, torch.nn.Module) else self.model.model  # tensor parallel
        layers: dict[tuple, torch.nn.Linear] = {}
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                layers.setdefault((tuple(w.shape), w.dtype, module.bias is not None), module)
        ran = 0
        for n in token_buckets(self.max_num_batched_tokens):
            for module in layers.values():
                module(torch.zeros(n, module.in_features, dtype=module.weight.dtype, device=self.device))
                ran += 1
        hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
        if hasattr(model, "compute_logits") and hidden_size is not None:
            dtype = next(model.parameters()).dtype
            for n in row_buckets(self.max_num_seqs):
                model.compute_logits(torch.zeros(n, hidden_size, dtype=dtype, device=self.device))
                ran += 1
        return ran

    def execute_decode_steps(self, scheduled: list[ScheduledSeq], num_steps: int) -> list[list[int]]:
        """Run ``num_steps`` decode steps back to back; returns each step's tokens (row i is
        ``scheduled[i]``). :meth:`decode_steps` without reading any step early."""
        return list(self.decode_steps(scheduled, num_steps))

    def decode_steps(
        self,
        scheduled: list[ScheduledSeq],
        num_steps: int,
        keep_going: Callable[[], bool] | None = None,
        lookahead: int = 3,
    ) -> Iterator[list[int]]:
        """Run up to ``num_steps`` decode steps back to back, yielding each step's tokens (row
        i is ``scheduled[i]``) as soon as the device has them.

        Only the first step's inputs come from the host. Each later step is derived on the
        device from the one before: the sampled tokens become the input ids, positions and
        context lengths advance by one, and cache slots are looked up in the block tables
        (which the scheduler has already extended for every step). On CUDA up to
        ``lookahead`` steps are queued ahead of the one being read, and each step's tokens
        come back through a pinned buffer and an event: the caller handles step i's tokens
        (streams them, checks stops) while the device computes steps i+1.., so the host's
        work per token overlaps the GPU's instead of adding to it. Before each further launch
        ``keep_going()`` is asked; once it says no, nothing more is launched and the steps
        already queued are still yielded (their tokens are valid for the rows still going).
        """
        input_ids, positions, meta, _ = self.prepare(scheduled)
        if not meta.is_decode_only or num_steps < 1:
            raise ValueError(f"decode_steps needs a decode-only batch and num_steps >= 1, got {num_steps}")
        if self._token_ring:
            lookahead = min(lookahead, len(self._token_ring) - 1)
        return self._decode_steps(input_ids, positions, meta, self._sampling_for(scheduled), len(scheduled),
                                  num_steps, keep_going, max(1, lookahead))

    @torch.inference_mode()
    def _decode_steps(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                      sampling: SamplingTensors | None, rows: int, num_steps: int,
                      keep_going: Callable[[], bool] | None, lookahead: int) -> Iterator[list[int]]:
        bs = self.block_size
        tables = meta.block_tables
        cuda = self.device.type == "cuda"
        queued: deque[tuple[torch.Tensor, torch.cuda.Event | None]] = deque()
        launched = 0
        # A greedy round on CUDA graphs replays whole steps: the graph's last kernel turns
        # its buffers into the next step's inputs, so only the first step sends any.
        graphed = (sampling is None and self.graphs is not None and self.graphs.greedy is not None
                   and self.graphs.can_run(meta) and meta.max_seq_len + num_steps - 1 <= self.graphs.buckets[-1])
        if graphed and self.layer_loads is not None:  # a graph calls no hook
            self.layer_loads.layers_ready()
        # Graphs replayed in step by several processes (tensor parallelism): the other ranks
        # are told of each chunk of steps before it is launched, and a chunk is launched whole
        # (a command between two of its steps would meet them inside a replay). A chunk of
        # ``lookahead`` steps goes whenever the queue runs down to one step, so the devices
        # stay busy and the round still stops within a chunk of ``keep_going`` saying so.
        lockstep = graphed and self.graphs.lockstep

        def launch() -> None:
            nonlocal input_ids, positions, meta, launched
            if graphed:
                if not launched:
                    self.graphs.stage_decode(input_ids, positions, meta)
                input_ids = self.graphs.replay_greedy(rows, meta.max_seq_len + launched)
            else:
                if launched:
                    positions = positions + 1
                    block = tables.gather(1, (positions // bs).unsqueeze(1)).squeeze(1)
                    meta = AttentionMetadata(
                        query_start_loc=meta.query_start_loc,
                        seq_lens=meta.seq_lens + 1,
                        block_tables=tables,
                        slot_mapping=block.long() * bs + positions % bs,
                        max_query_len=1,
                        max_seq_len=meta.max_seq_len + 1,
                    )
                input_ids = self._sample(self._forward(input_ids, positions, meta), sampling)
            launched += 1
            if not cuda:
                queued.append((input_ids, None))
                return
            # One pinned buffer per queued step: a buffer is read before it is reused.
            host = self._token_ring[launched % len(self._token_ring)][:rows]
            host.copy_(input_ids, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            queued.append((host, done))

        def launch_chunk(steps: int) -> None:
            told = (self.graphs.greedy_round(input_ids, positions, meta, steps) if not launched
                    else self.graphs.more_greedy_steps(steps))
            with told:
                for _ in range(steps):
                    launch()

        if lockstep:
            launch_chunk(min(num_steps, lookahead))
        else:
            while launched < min(num_steps, lookahead):
                launch()
        stopped = False
        while queued:
            tokens, done = queued.popleft()
            if done is not None:
                done.synchronize()
            yield tokens.tolist()
            if stopped or launched >= num_steps or (lockstep and len(queued) > 1):
                continue
            stopped = keep_going is not None and not keep_going()
            if not stopped:
                if lockstep:
                    launch_chunk(min(lookahead, num_steps - launched))
                else:
                    launch()

    @torch.inference_mode()
    def execute_verify(self, scheduled: list[ScheduledSeq]) -> list[list[int]]:
        """One forward over every sequence's last token and its draft; returns, per sequence,
        the greedy token after each computed position (``1 + len(draft)`` of them)."""
        input_ids, positions, meta, _ = self.prepare(scheduled, rows=[])
        hidden = self._forward(input_ids, positions, meta)
        ids = self._greedy(hidden).tolist()
        out, start = [], 0
        for item in scheduled:
            out.append(ids[start : start + item.num_new_tokens])
            start += item.num_new_tokens
        return out

    def _prefill_graph_step(self, scheduled: list[ScheduledSeq]) -> torch.Tensor | None:
        """The hidden states of a step that is one sequence's prefill (a returning session's
        turn, a short prompt) replayed in a prefill graph straight from host values, skipping
        :meth:`prepare`; None when the step is not one (it then runs through :meth:`prepare`)."""
        if self.graphs is None or self.graphs.lockstep or len(scheduled) != 1 or scheduled[0].draft:
            return None
        item = scheduled[0]
        seq, start, n = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
        shape = self.graphs.prefill_shape(start, n)
        if shape is None:
            return None
        if self.layer_loads is not None:  # a graph calls no hook: every layer's blocks go in first
            self.layer_loads.layers_ready()
        return self.graphs.run_prefill(shape, seq.token_ids[start : start + n], start, seq.block_table)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.graphs is not None and self.graphs.can_run(meta):
            if self.layer_loads is not None:  # a graph calls no hook: every layer's blocks go in first
                self.layer_loads.layers_ready()
            return self.graphs.run(input_ids, positions, meta)
        if self.piecewise is not None and not meta.is_decode_only and self.piecewise.covers(input_ids.shape[0]):
            return self.piecewise.forward(input_ids, positions, meta)
        return self.model(input_ids, positions, self.kv_caches, meta)

    def _sampling_for(self, items: list[ScheduledSeq]) -> SamplingTensors | None:
        """The rows' sampling tensors; None for an all-greedy batch (a plain argmax)."""
        if all(i.seq.sampling.temperature == 0 for i in items):
            return None
        return self._sampling_tensors(items)

    def _sample(self, hidden: torch.Tensor, sampling: SamplingTensors | None, rows: int | None = None) -> torch.Tensor:
        """Tokens [N] (on the device) for the rows of ``hidden``, or its first ``rows`` (the
        rest padding); nothing waits for them."""
        if sampling is None:
            return self._greedy(hidden)[:rows]
        return sample(self.model.compute_logits(hidden)[:rows], sampling)

    def _greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._split_argmax is not None:
            return self._split_argmax(self.model.compute_logits(hidden, upcast=False))
        return self.model.compute_logits(hidden).argmax(dim=-1)

    def prepare(
        self, scheduled: list[ScheduledSeq], rows: list[int] | None = None, pad: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Flat inputs and metadata on the device, plus the flat index of each sampled row.

        ``pad``: a step that is not decode-only runs at a :func:`token_bucket` of tokens and
        a :func:`row_bucket` of sampled rows (node/step_shapes.py). The padding tokens
        extend the last sequence, as a prefill graph's do: id 0, its last position again, no
        cache slot (-1), so only they can see the keys past its real end; the padding rows
        repeat its last sampled row."""
        bs = self.block_size
        nseq = len(scheduled)
        rows = rows if rows is not None else [i for i, item in enumerate(scheduled) if item.samples]
        starts = [item.seq.num_computed_tokens for item in scheduled]
        lens = [item.num_new_tokens for item in scheduled]
        tokens: list[int] = []
        for item, start, n in zip(scheduled, starts, lens, strict=True):
            tokens.extend(item.seq.token_ids[start : start + n])
            tokens.extend(item.draft)  # the context ends inside this chunk: drafts follow it
        num_tokens = len(tokens)
        pad = pad and max(lens) > 1
        padded = token_bucket(num_tokens) if pad else num_tokens
        extra = padded - num_tokens
        num_rows = row_bucket(len(rows)) if pad and rows else len(rows)
        # Every tensor below starts on a 16-byte boundary and the tables' row stride is a
        # multiple of 16: Triton specializes kernels on pointer alignment and on integers
        # being 1 or a multiple of 16, so a layout that varied with the batch would compile a
        # new variant mid-serving for some batch shapes. This one gives one variant for all.
        width = padded_table_width(max(max(len(item.seq.block_table) for item in scheduled),
                                       -(-(starts[-1] + lens[-1] + extra) // bs)))
        t = _align(padded, 2)
        o_seq = _align(nseq + 1, 4)
        o_tab = o_seq + _align(nseq, 4)

        if self._copied is not None:
            self._copied.synchronize()
        # Filled through numpy views of the staging buffers: for the few sequences of a
        # latency-bound step a numpy op costs a microsecond where a torch op costs several.
        h64, h32 = self._host64, self._host32
        ids, pos, slots = h64[:num_tokens], h64[t : t + num_tokens], h64[2 * t : 2 * t + num_tokens]
        if extra:
            h64[num_tokens:padded] = 0
            h64[2 * t + num_tokens : 2 * t + padded] = -1
        qsl, seq_lens = h32[: nseq + 1], h32[o_seq : o_seq + nseq]
        tables = h32[o_tab : o_tab + nseq * width].reshape(nseq, width)
        ids[:] = tokens
        tables[:] = 0
        for i, item in enumerate(scheduled):
            tables[i, : len(item.seq.block_table)] = item.seq.block_table
        starts_a = np.array(starts, dtype=np.int64)
        lens_a = np.array(lens, dtype=np.int64)
        qsl[0] = 0
        np.cumsum(lens_a, out=qsl[1:])
        if nseq == 1:
            pos[:] = np.arange(starts[0], starts[0] + num_tokens)
            slots[:] = tables[0, pos // bs].astype(np.int64) * bs + pos % bs
        else:
            seq_idx = np.repeat(np.arange(nseq), lens_a)
            pos[:] = starts_a[seq_idx] + np.arange(num_tokens) - qsl[:-1][seq_idx]
            slots[:] = tables[seq_idx, pos // bs].astype(np.int64) * bs + pos % bs
        np.add(starts_a, lens_a, out=seq_lens)
        if rows:
            h64[3 * t : 3 * t + len(rows)] = qsl[1:][rows] - 1
            h64[3 * t + len(rows) : 3 * t + num_rows] = h64[3 * t + len(rows) - 1]
        if extra:
            h64[t + num_tokens : t + padded] = pos[-1]
            qsl[nseq] += extra
            seq_lens[nseq - 1] += extra
            lens[-1] += extra

        dev = self.device
        d64 = self._stage64[: 3 * t + num_rows].to(dev, non_blocking=True)
        d32 = self._stage32[: o_tab + nseq * width].to(dev, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        meta = AttentionMetadata(
            query_start_loc=d32[: nseq + 1],
            seq_lens=d32[o_seq : o_seq + nseq],
            block_tables=d32[o_tab:].view(nseq, width),
            slot_mapping=d64[2 * t : 2 * t + padded],
            max_query_len=max(lens),
            max_seq_len=max(s + n for s, n in zip(starts, lens, strict=True)),
        )
        return d64[:padded], d64[t : t + padded], meta, d64[3 * t :]

    def _sampling_tensors(self, items: list[ScheduledSeq]) -> SamplingTensors:
        dev = self.device
        ks = [i.seq.sampling.top_k for i in items]
        max_top_k = 0 if not any(ks) else (max(ks) if all(ks) else self.model.config.vocab_size)
        return SamplingTensors(
            temperature=torch.tensor([float(i.seq.sampling.temperature) for i in items], dtype=torch.float32).to(dev),
            top_k=torch.tensor([i.seq.sampling.top_k for i in items], dtype=torch.int64).to(dev),
            top_p=torch.tensor([float(i.seq.sampling.top_p) for i in items], dtype=torch.float32).to(dev),
            generators=[i.seq.generator for i in items],
            max_top_k=max_top_k,
            any_top_p=any(i.seq.sampling.top_p < 1.0 for i in items),
        )
