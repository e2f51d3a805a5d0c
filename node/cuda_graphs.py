"""CUDA graphs for decode steps and short single-sequence prefills.

Eager, a step of a 16-layer model launches a few hundred kernels from Python, which costs
more than the GPU work itself for decode and for the short prefill of a conversation's next
turn. Such steps are captured once per shape and replayed after copying the step's inputs
into static buffers:

* decode (every sequence brings one token): keyed by (padded batch size, context bucket).
  Padded rows write nowhere (slot -1) and attend over one token of block 0.
* greedy decode: the same step with the logits, the argmax and the next step's inputs
  (node/step_advance.py) captured too, so the later steps of a multi-step round replay
  back to back with nothing from the host in between (:meth:`CudaGraphRunner.replay_greedy`).
* prefill of one sequence (<= ``max_prefill_tokens`` new tokens, the TTFT-critical case, a
  returning session's turn): keyed by (padded token count, context bucket). Padded tokens sit
  after the real ones, write nowhere and repeat the last real position; causal masking keeps
  real tokens from seeing them, and their outputs are dropped. The cached context is data:
  its length and block table are graph inputs. All of a step's inputs (token ids, positions,
  slots, context length, block table) live in one device buffer laid out like a pinned host
  buffer (:class:`PrefillGraphInputs`): the runner fills the host side with numpy and one
  copy sends it, so such a step costs one transfer and the replay, with no device-side
  copies or host tensor ops in between (the turn's fixed cost was most of its TTFT).
  A step pads to the smallest token bucket that holds it unless warmup measured a larger
  bucket of the same context faster (:meth:`CudaGraphRunner.rank_prefill_sizes`): cuBLAS's
  choice of kernel varies with the row count, so on an H100 llama-1b's down projection takes
  27 us at 224 rows and 20 us at 256.

The attention backend sizes its grids from ``meta.max_seq_len`` and ``max_query_len``, so a
capture fixes them; contexts are bucketed (x4 from 256 up to the model's limit) so short
contexts don't replay grids sized for the longest one.
"""

from __future__ import annotations

import bisect
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
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


@dataclass(frozen=True)
class PrefillShape:
    """The captured shape a single sequence's prefill step replays in: ``tokens`` new tokens
    (the step's count padded up to a bucket) over a context of at most ``context``."""

    tokens: int
    context: int


def prefill_shape(start: int, num_new: int, token_buckets: list[int], contexts: list[int],
                  faster: dict[PrefillShape, tuple[int, ...]] | None = None) -> PrefillShape | None:
    """The graph shape for one sequence bringing ``num_new`` tokens after ``start`` computed
    ones; None when no prefill graph fits (one token is a decode step; more than the largest
    bucket, or a padded sequence past the longest context, runs eagerly). ``faster`` (from
    :func:`faster_sizes`) names, per shape, larger token buckets of the same context that
    replay faster: the first whose padded end stays within the context is taken."""
    if num_new < 2 or not token_buckets or num_new > token_buckets[-1]:
        return None
    size = token_buckets[bisect.bisect_left(token_buckets, num_new)]
    end = start + size  # the padded tokens extend the sequence
    if end > contexts[-1]:
        return None
    shape = PrefillShape(size, contexts[bisect.bisect_left(contexts, end)])
    for larger in (faster or {}).get(shape, ()):
        if start + larger <= shape.context:
            return PrefillShape(larger, shape.context)
    return shape


def faster_sizes(replay_us: dict[PrefillShape, float], margin: float = 0.03) -> dict[PrefillShape, tuple[int, ...]]:
    """From measured replay times of the prefill graphs: for each shape, the larger token
    buckets of the same context whose replay took less than ``1 - margin`` of its time,
    fastest first (shapes with none are left out). The margin keeps measurement noise from
    trading a step's padding for nothing."""
    out = {}
    for shape, t in replay_us.items():
        larger = sorted((u, other.tokens) for other, u in replay_us.items()
                        if other.context == shape.context and other.tokens > shape.tokens and u < (1 - margin) * t)
        if larger:
            out[shape] = tuple(tokens for _, tokens in larger)
    return out


class PrefillGraphInputs:
    """The prefill graphs' static inputs, in one device buffer mirrored by a host buffer
    (pinned on CUDA) of the same byte layout::

        input ids  int64 [R] | positions int64 [R] | slots int64 [R] | seq len int32 [4] | block table int32 [W]

    (``R`` = the largest token bucket, ``W`` = the widest block table). :meth:`stage` fills
    the host side for one step with numpy, padded to the bucket; :meth:`send` copies the
    used bytes over in one transfer. Every field starts on a 16-byte boundary (Triton
    specializes on pointer alignment, so a capture and later replays agree). Works on any
    device, which lets the CPU tests check the staging against the runner's eager inputs.
    """

    def __init__(self, max_tokens: int, max_blocks: int, block_size: int, device: torch.device):
        rows = -(-max_tokens // 2) * 2  # int64 fields of 16-byte multiples
        self.block_size = block_size
        self._o_pos, self._o_slot, self._o_len = 8 * rows, 16 * rows, 24 * rows
        self._o_tab = self._o_len + 16
        nbytes = self._o_tab + 4 * max_blocks
        pin = device.type == "cuda"
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
        # Zeros: block-table entries past a sequence's blocks must always be valid block ids.
        self.device_buffer = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        h = self.host.numpy()
        self._ids = h[: self._o_pos].view(np.int64)
        self._pos = h[self._o_pos : self._o_slot].view(np.int64)
        self._slots = h[self._o_slot : self._o_len].view(np.int64)
        self._seq_len = h[self._o_len : self._o_tab].view(np.int32)
        self._table = h[self._o_tab :].view(np.int32)
        self._bytes = h  # the token ids and the table are packed in here (see stage)
        self._nbytes = nbytes
        # (device, host) views of the first n bytes, by n: slicing two tensors costs a send
        # more than the copy of a few kilobytes does.
        self._sent: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._block_offsets = np.arange(block_size, dtype=np.int64)
        # Scratch for stage's positions and slots, so that a step allocates no arrays.
        self._rows = np.arange(rows, dtype=np.int64)
        self._spanned = np.empty((rows // block_size + 2, block_size), dtype=np.int64)  # a step's blocks
        d = self.device_buffer
        self.input_ids = d[: self._o_pos].view(torch.int64)
        self.positions = d[self._o_pos : self._o_slot].view(torch.int64)
        self.slot_mapping = d[self._o_slot : self._o_len].view(torch.int64)
        self.seq_lens = d[self._o_len : self._o_len + 4].view(torch.int32)[:1]
        self.block_tables = d[self._o_tab :].view(torch.int32).view(1, max_blocks)
        # The host buffer is rewritten only once the previous step's copy has left it.
        self._copied = torch.cuda.Event() if pin else None

    def stage(self, token_ids: list[int], start: int, block_table: list[int], size: int) -> int:
        """Lay out one step, padded to ``size`` tokens, in the host buffer: ``token_ids`` at
        positions ``start..``, slots from ``block_table``; padded tokens repeat the last real
        position and write nowhere (slot -1), and the context length counts them. Returns the
        number of bytes to :meth:`send`: through the end of the block table, rounded up to 64
        table entries (the entries past it are stale, valid block ids, like the device's), so
        that few sizes are ever sent."""
        n, bs = len(token_ids), self.block_size
        if self._copied is not None:
            self._copied.synchronize()
        # struct packs a list of ints in one C loop; numpy would first infer the list's dtype.
        struct.pack_into(f"<{n}q", self._bytes, 0, *token_ids)
        self._ids[n:size] = 0
        pos = self._pos[:size]
        np.add(self._rows[:n], start, out=pos[:n])
        pos[n:] = start + n - 1
        struct.pack_into(f"<{len(block_table)}i", self._bytes, self._o_tab, *block_table)
        table = self._table[: len(block_table)]
        # The positions run on from ``start``: their slots are those of the blocks they span,
        # in order, less the offset of the first one (no per-token gather).
        first, skip = divmod(start, bs)
        last = (start + n - 1) // bs + 1
        spanned = self._spanned[: last - first]
        np.multiply(table[first:last, None], bs, out=spanned, dtype=np.int64)
        spanned += self._block_offsets
        self._slots[:n] = spanned.ravel()[skip : skip + n]
        self._slots[n:size] = -1
        self._seq_len[0] = start + size
        return min(self._o_tab + 256 * -(-len(block_table) // 64), self._nbytes)

    def send(self, nbytes: int) -> None:
        """Copy the first ``nbytes`` staged bytes to the device buffer (asynchronous on CUDA)."""
        views = self._sent.get(nbytes)
        if views is None:
            views = self._sent[nbytes] = (self.device_buffer[:nbytes], self.host[:nbytes])
        views[0].copy_(views[1], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def meta(self, size: int, context: int, query_start_loc: torch.Tensor) -> AttentionMetadata:
        """The metadata a graph of shape (``size``, ``context``) is captured with and reads."""
        return AttentionMetadata(
            query_start_loc=query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            slot_mapping=self.slot_mapping[:size],
            max_query_len=size,
            max_seq_len=context,
        )


class CudaGraphRunner:
    """Captures and replays the model's forward for decode steps and short prefills."""

    # True where several processes replay the same graphs in step (tensor parallelism,
    # node/parallel/tensor_parallel.py): a greedy round is then launched in chunks, each
    # inside ``greedy_round`` (the first) or ``more_greedy_steps``, and a short prefill goes
    # through :meth:`run` like any other step.
    lockstep = False

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
        self.block_size = block_size
        # Hidden states -> greedy tokens (the runner's logits + argmax); set, greedy decode
        # rounds replay "greedy" graphs (see replay_greedy).
        self.greedy: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.batch_sizes = padded_batch_sizes(max_batch)
        self.prefill_sizes = [t for t in PREFILL_TOKEN_BUCKETS if t <= max_prefill_tokens]
        self.buckets = context_buckets(max_model_len)
        self.max_batch = self.batch_sizes[-1]
        rows = self.max_batch
        max_blocks = padded_table_width(-(-max_model_len // block_size))
        dev = device
        # Decode graphs' inputs; the prefill graphs have their own (prefill_inputs).
        self.input_ids = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(self.max_batch, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(self.max_batch, max_blocks, dtype=torch.int32, device=dev)
        self.decode_qsl = torch.arange(self.max_batch + 1, dtype=torch.int32, device=dev)
        self.prefill_inputs = PrefillGraphInputs(self.prefill_sizes[-1] if self.prefill_sizes else 2, max_blocks,
                                                 block_size, dev)
        self.prefill_qsl = {t: torch.tensor([0, t], dtype=torch.int32, device=dev) for t in self.prefill_sizes}
        self.graphs: dict[tuple[str, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()
        # Captures go on streams of this runner's device. torch's default capture stream is one
        # per process, made on whichever device captured first: a second GPU's engine (data
        # parallel) then captured on the first GPU's stream, and its graphs came out empty
        # ("The CUDA Graph is empty ... captured on wrong device or stream" in the 2-GPU run).
        self._warm_stream = torch.cuda.Stream(device)
        self._capture_stream = torch.cuda.Stream(device)
        # Per prefill shape, the larger token buckets warmup measured faster (rank_prefill_sizes).
        self.faster_prefill: dict[PrefillShape, tuple[int, ...]] = {}

    def _prefill_shape(self, meta: AttentionMetadata) -> PrefillShape | None:
        if meta.num_seqs != 1:
            return None
        return prefill_shape(meta.max_seq_len - meta.max_query_len, meta.max_query_len, self.prefill_sizes,
                             self.buckets, self.faster_prefill)

    def prefill_shape(self, start: int, num_new: int) -> PrefillShape | None:
        """The graph shape for one sequence's step of ``num_new`` tokens after ``start``
        computed ones (None: it runs eagerly); see :meth:`run_prefill`."""
        return prefill_shape(start, num_new, self.prefill_sizes, self.buckets, self.faster_prefill)

    def can_run(self, meta: AttentionMetadata) -> bool:
        if meta.max_seq_len > self.buckets[-1]:
            return False
        if meta.is_decode_only:
            return meta.num_seqs <= self.max_batch
        return self._prefill_shape(meta) is not None

    def run_prefill(self, shape: PrefillShape, token_ids: list[int], start: int,
                    block_table: list[int]) -> torch.Tensor:
        """One sequence's prefill step from host values: staged in the pinned buffer, sent in
        one copy, replayed. Returns the hidden states of the ``len(token_ids)`` real tokens.
        (No inference-mode guard of its own: the runner's step holds one, and entering it
        costs the turn a few microseconds more; a replay records no autograd anyway.)"""
        inputs = self.prefill_inputs
        inputs.send(inputs.stage(token_ids, start, block_table, shape.tokens))
        key = ("prefill", shape.tokens, shape.context)
        graph, out = self.graphs.get(key) or self._capture(*key)
        graph.replay()
        return out[: len(token_ids)]

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Replay for a step whose inputs are already on the device (decode steps, and a
        single sequence's verify step of a speculative draft)."""
        n = input_ids.shape[0]
        width = meta.block_tables.shape[1]
        shape = None if meta.is_decode_only else self._prefill_shape(meta)
        if shape is not None:
            inputs, size = self.prefill_inputs, shape.tokens
            inputs.input_ids[:n].copy_(input_ids)
            inputs.positions[:n].copy_(positions)
            inputs.slot_mapping[:n].copy_(meta.slot_mapping)
            inputs.slot_mapping[n:size].fill_(-1)
            inputs.positions[n:size].copy_(positions[n - 1 :].expand(size - n))
            # The padded tokens extend the sequence; only they can see the unwritten slots.
            torch.add(meta.seq_lens, size - n, out=inputs.seq_lens)
            # Entries past the real table are stale but valid block ids: only padding reads them.
            inputs.block_tables[:, :width].copy_(meta.block_tables)
            kind, bucket = "prefill", shape.context
        else:
            kind, size = "decode", self.stage_decode(input_ids, positions, meta)
            bucket = self.buckets[bisect.bisect_left(self.buckets, meta.max_seq_len)]
        graph, out = self.graphs.get((kind, size, bucket)) or self._capture(kind, size, bucket)
        graph.replay()
        return out[:n]

    def stage_decode(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> int:
        """Copy a decode step's inputs (already on the device) into the decode graphs'
        buffers; returns the padded batch size its graphs are captured for."""
        n = input_ids.shape[0]
        size = self.batch_sizes[bisect.bisect_left(self.batch_sizes, n)]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, : meta.block_tables.shape[1]].copy_(meta.block_tables)
        if n < size:  # padded rows: write nowhere, attend over one token of block 0
            self.slot_mapping[n:size].fill_(-1)
            self.seq_lens[n:size].fill_(1)
            self.block_tables[n:size, 0].fill_(0)
        return size

    def replay_greedy(self, rows: int, max_seq_len: int) -> torch.Tensor:
        """One greedy decode step of the ``rows`` sequences staged by :meth:`stage_decode`
        (or left by the previous replay), the longest now ``max_seq_len`` tokens with this
        step's: replays the forward, the argmax and the advance of the buffers to the next
        step's inputs. Returns the step's tokens (a graph buffer, valid until the next replay)."""
        size = self.batch_sizes[bisect.bisect_left(self.batch_sizes, rows)]
        bucket = self.buckets[bisect.bisect_left(self.buckets, max_seq_len)]
        graph, tokens = self.graphs.get(("greedy", size, bucket)) or self._capture("greedy", size, bucket)
        graph.replay()
        return tokens[:rows]

    @torch.inference_mode()
    def capture_all(self) -> int:
        """Capture every decode and prefill shape now (at startup), so no request pays for a
        capture; returns how many graphs were captured. Dummy inputs write nowhere (slot -1)."""
        before = len(self.graphs)
        self.input_ids.zero_()
        self.slot_mapping.fill_(-1)
        self.block_tables.zero_()
        prefill = self.prefill_inputs
        prefill.device_buffer.zero_()
        prefill.slot_mapping.fill_(-1)
        for bucket in self.buckets:
            for size in self.batch_sizes:
                self.seq_lens.fill_(1)
                self.positions.zero_()
                for kind in ("decode", "greedy") if self.greedy is not None else ("decode",):
                    if (kind, size, bucket) not in self.graphs:
                        self._capture(kind, size, bucket)
            for size in self.prefill_sizes:
                if size > bucket or ("prefill", size, bucket) in self.graphs:
                    continue
                prefill.seq_lens.fill_(size)
                prefill.positions[:size].copy_(torch.arange(size, device=prefill.positions.device))
                self._capture("prefill", size, bucket)
        torch.cuda.synchronize()
        return len(self.graphs) - before

    @torch.inference_mode()
    def rank_prefill_sizes(self, replays: int = 5) -> dict[PrefillShape, float]:
        """Time every captured prefill graph (median of ``replays`` replays, microseconds) and
        let each step take a larger token bucket of its context where that replays faster
        (:func:`faster_sizes`). The replays run on dummy inputs that write nowhere (slot -1);
        the context is half way into its bucket, so attention weighs in as on a real turn.
        Returns the measured times."""
        prefill = self.prefill_inputs
        prefill.slot_mapping.fill_(-1)
        times: dict[PrefillShape, float] = {}
        for (kind, size, bucket), (graph, _) in sorted(self.graphs.items()):
            if kind != "prefill":
                continue
            lower = max([b for b in self.buckets if b < bucket], default=0)
            prefill.seq_lens.fill_(max(size, (lower + bucket) // 2))
            graph.replay()
            samples = []
            for _ in range(replays):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                samples.append(1e3 * start.elapsed_time(end))
            times[PrefillShape(size, bucket)] = sorted(samples)[len(samples) // 2]
        self.faster_prefill = faster_sizes(times)
        for shape, larger in sorted(self.faster_prefill.items(), key=lambda kv: (kv[0].context, kv[0].tokens)):
            log.info("prefill graphs: %d tokens over <= %d replay in %.0f us, %d tokens in %.0f us: steps take %d",
                     shape.tokens, shape.context, times[shape], larger[0],
                     times[PrefillShape(larger[0], shape.context)], larger[0])
        return times

    def _meta(self, kind: str, size: int, bucket: int) -> AttentionMetadata:
        if kind == "prefill":
            return self.prefill_inputs.meta(size, bucket, self.prefill_qsl[size])
        return AttentionMetadata(
            query_start_loc=self.decode_qsl[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size],
            slot_mapping=self.slot_mapping[:size],
            max_query_len=1,
            max_seq_len=bucket,
        )

    def _capture(self, kind: str, size: int, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        from ultrakv.node import step_advance  # Triton: imported where graphs are captured

        meta = self._meta(kind, size, bucket)
        inputs = self.prefill_inputs if kind == "prefill" else self
        args = (inputs.input_ids[:size], inputs.positions[:size], self.kv_caches, meta)
        # The step being replayed already holds its inputs in the buffers, so the warm-up run
        # (on a side stream: it compiles kernels and settles allocations) does the real work.
        stream = self._warm_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = self.model(*args)
            if kind == "greedy":  # compiled here; the advance runs on copies (it must run once)
                step_advance.advance(self.greedy(out), *self._decode_buffers(size, copies=True))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self._capture_stream):
            out = self.model(*args)
            if kind == "greedy":
                out = self.greedy(out)
                step_advance.advance(out, *self._decode_buffers(size))
        self.graphs[(kind, size, bucket)] = (graph, out)
        log.debug("captured %s graph: size=%d context<=%d", kind, size, bucket)
        return graph, out

    def _decode_buffers(self, size: int, copies: bool = False) -> tuple:
        """The decode buffers :func:`step_advance.advance` updates, for ``size`` rows."""
        bufs = (self.input_ids[:size], self.positions[:size], self.seq_lens[:size], self.slot_mapping[:size],
                self.block_tables[:size])
        if copies:
            bufs = tuple(b.clone() for b in bufs)
        return (*bufs, self.block_size)
