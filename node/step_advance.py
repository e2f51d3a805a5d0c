"""The next decode step's inputs, derived on the device from the step before, in one launch.

In a multi-step decode round each step after the first takes its inputs from the one before:
the sampled tokens become the input ids, every position and context length grows by one, and
each row's cache slot is looked up in its block table (which the scheduler has already
extended for the whole round). Written as torch ops this is a dozen small launches per
token, outside the step's CUDA graph: on an H100 about 50 us of each llama-1b batch-1 token
(4% of it). :func:`advance` does it in one Triton launch, captured at the end of a greedy
decode graph (node/cuda_graphs.py), so a round's later steps replay with nothing sent from
the host.

Padded rows of a captured batch (slot -1) stay as they are: they write nowhere and attend
over one token. A row whose next position falls past its block table's width gets slot -1
too (the round cannot continue past it, and the table is never read out of bounds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from ultrakv.node import grid_dependency
from ultrakv.node.grid_dependency import await_predecessor


@triton.jit
def _advance_kernel(
    SAMPLED, IDS, POS, SEQ, SLOT, TABLE,
    rows, width, stride_table,
    PAGE: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    await_predecessor(PDL)
    r = tl.arange(0, BLOCK)
    rmask = r < rows
    slot = tl.load(SLOT + r, mask=rmask, other=-1)
    live = rmask & (slot >= 0)
    pos = tl.load(POS + r, mask=live, other=0) + 1
    page = pos // PAGE
    inside = live & (page < width)
    block = tl.load(TABLE + r * stride_table + page, mask=inside, other=0).to(tl.int64)
    tl.store(IDS + r, tl.load(SAMPLED + r, mask=live, other=0), mask=live)
    tl.store(POS + r, pos, mask=live)
    tl.store(SEQ + r, tl.load(SEQ + r, mask=live, other=0) + 1, mask=live)
    tl.store(SLOT + r, tl.where(inside, block * PAGE + pos % PAGE, -1), mask=live)


def advance(sampled: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, seq_lens: torch.Tensor,
            slot_mapping: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> None:
    """Turn one decode step's buffers into the next step's, in place: rows ``[0, n)`` of the
    ``n``-row buffers (``sampled`` int64 [n], ``input_ids``/``positions``/``slot_mapping``
    int64 [n], ``seq_lens`` int32 [n], ``block_tables`` int32 [n, width])."""
    rows, width = block_tables.shape
    pdl = grid_dependency.enabled(sampled.device)
    _advance_kernel[(1,)](
        sampled, input_ids, positions, seq_lens, slot_mapping, block_tables,
        rows, width, block_tables.stride(0),
        PAGE=block_size, BLOCK=max(16, triton.next_power_of_2(rows)), PDL=pdl,
        num_warps=1, launch_pdl=pdl,
    )


def advance_reference(sampled: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                      seq_lens: torch.Tensor, slot_mapping: torch.Tensor, block_tables: torch.Tensor,
                      block_size: int) -> None:
    """:func:`advance` in torch ops (what the tests hold the kernel to)."""
    live = slot_mapping >= 0
    pos = positions + 1
    page = pos // block_size
    inside = live & (page < block_tables.shape[1])
    block = block_tables.gather(1, page.clamp(max=block_tables.shape[1] - 1).unsqueeze(1)).squeeze(1).long()
    input_ids.copy_(torch.where(live, sampled, input_ids))
    seq_lens.copy_(torch.where(live, seq_lens + 1, seq_lens))
    slot_mapping.copy_(torch.where(inside, block * block_size + pos % block_size,
                                   torch.where(live, -1, slot_mapping)))
    positions.copy_(torch.where(live, pos, positions))
