"""Greedy sampling's argmax over the vocabulary as one Triton launch split over many programs.

``torch.argmax`` over one row of 128k logits runs a single block on CUDA: 28 us of every
llama-1b decode token on an H100 (2% of the step). :class:`SplitArgmax` spreads each row over
``cdiv(vocab, CHUNK)`` programs; each finds its chunk's maximum and first index, stores them,
and the last program of the row to arrive (an arrival counter, as the split-K decode
attention merges its partitions) reduces the row's partials and re-arms the counter. The
logits may be in the model's dtype: its conversion to float32 is exact, so the argmax is the
same and the cast kernel is skipped.

Ties go to the lowest index, as ``torch.argmax``; a NaN counts as +inf (``torch.argmax``
returns the first NaN itself, which differs only in a row holding both +inf and NaN).
Imported only where it runs (Triton must be there); ``node/kernel_variants.py`` chooses it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from ultrakv.node import grid_dependency
from ultrakv.node.grid_dependency import await_predecessor

# Logits per program: 63 programs for a 128k vocabulary at batch 1, each loading 8 KiB of
# float32; at most MAX_CHUNKS of them per row (the merge loads a row's partials in one tile).
CHUNK = 2048
MAX_CHUNKS = 256


@triton.jit
def _split_argmax_kernel(
    X, OUT, PART_V, PART_I, ARRIVED,
    n, stride_x,
    CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr,
):
    await_predecessor(PDL)
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    mask = offs < n
    x = tl.load(X + row * stride_x + offs, mask=mask, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN as +inf (tl.max does not order NaN)
    best = tl.max(x, 0)
    idx = tl.min(tl.where((x == best) & mask, offs, n), 0)
    part = row * num_chunks + c
    tl.store(PART_V + part, best)
    tl.store(PART_I + part, idx)
    # The last of the row's programs merges: stores before the release, loads (.cg: written on
    # other SMs) after the acquire; it zeroes the counter for the next launch.
    tl.debug_barrier()
    if tl.atomic_add(ARRIVED + row, 1, sem="acq_rel") == num_chunks - 1:
        offs_c = tl.arange(0, BLOCK_C)
        cmask = offs_c < num_chunks
        v = tl.load(PART_V + row * num_chunks + offs_c, mask=cmask, other=float("-inf"), cache_modifier=".cg")
        i = tl.load(PART_I + row * num_chunks + offs_c, mask=cmask, other=n, cache_modifier=".cg")
        top = tl.max(v, 0)
        # Chunks are in index order, so the lowest index among the chunks holding the top
        # value is the row's first maximum.
        tl.store(OUT + row, tl.min(tl.where((v == top) & cmask, i, n), 0).to(tl.int64))
        tl.atomic_xchg(ARRIVED + row, 0, sem="relaxed")


class SplitArgmax:
    """``argmax(logits, dim=-1)`` for ``logits`` [N, V] in one launch (see the module
    docstring); int64 [N] on the logits' device, as ``torch.argmax`` returns."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        # Arrival counters per row (zero between launches); they only grow, and a replaced
        # buffer is kept alive in case a CUDA graph captured it.
        self._arrived = torch.zeros(256, dtype=torch.int32, device=self.device)
        self._retired: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        rows, n = logits.shape
        if logits.stride(-1) != 1:
            raise ValueError("logits must have unit stride in the vocabulary dimension")
        num_chunks = triton.cdiv(n, CHUNK)
        if num_chunks > MAX_CHUNKS:
            raise ValueError(f"vocabulary must be at most {MAX_CHUNKS * CHUNK} for the split argmax, got {n}")
        out = torch.empty(rows, dtype=torch.int64, device=logits.device)
        if rows == 0:
            return out
        if self._arrived.numel() < rows:
            self._retired.append(self._arrived)
            self._arrived = torch.zeros(max(rows, 2 * self._arrived.numel()), dtype=torch.int32, device=self.device)
        part_v = torch.empty(rows * num_chunks, dtype=torch.float32, device=logits.device)
        part_i = torch.empty(rows * num_chunks, dtype=torch.int32, device=logits.device)
        pdl = grid_dependency.enabled(logits.device)
        _split_argmax_kernel[(rows, num_chunks)](
            logits, out, part_v, part_i, self._arrived, n, logits.stride(0),
            CHUNK=CHUNK, BLOCK_C=triton.next_power_of_2(num_chunks), PDL=pdl, num_warps=4,
            launch_pdl=pdl,
        )
        return out
