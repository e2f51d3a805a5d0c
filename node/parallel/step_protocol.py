"""What rank 0 tells the other tensor-parallel ranks, over the group's broadcast.

Every command starts with a fixed-size int64 header ``[op, a, b, c, d, e, f, 0]``; its payload
follows in broadcasts whose sizes the header gives. Commands:

* ``FORWARD`` (a=T new tokens, b=B sequences, c=block-table width, d=max_query_len,
  e=max_seq_len): one int64 tensor ``[input_ids; positions; slot_mapping]`` (3T) and one
  int32 tensor ``[query_start_loc; seq_lens; block_tables]`` (B+1 + B + B*c). Every rank
  runs the same forward on its slice; the all-reduces inside keep them in step.
* ``READ_KV`` (a=n blocks): the block ids (int64 [n]); each worker sends rank 0 its heads of
  those blocks (point-to-point, tag ``KV_TAG``).
* ``WRITE_KV`` (a=n blocks): the block ids, then the whole model's KV of those blocks
  ``[L, 2, n, block_size, kv_heads, head_dim]``; each rank keeps its heads.
* ``GRAPHS`` (a=max batch, b=max model length, c=max prefill tokens, d=greedy): build CUDA
  graphs of the same shapes as rank 0's (node/cuda_graphs.py); d=1 when greedy rounds replay
  whole steps, each ending in a broadcast of rank 0's sampled tokens.
* ``CAPTURE``: capture every graph now, in rank 0's order (its warmup).
* ``DECODE_ROUND`` (as ``FORWARD``, f=number of steps): stage a greedy decode round's first
  inputs in the decode graphs' buffers and replay its first f greedy steps back to back.
* ``CONTINUE`` (a=number of steps): replay a more steps of the round.
* ``STOP``: the workers leave their loop.

A ``FORWARD`` replays a graph on every rank where rank 0's graphs can run it
(``CudaGraphRunner.can_run`` decides the same from the same metadata), else runs eagerly.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
from ultrakv.node.attention.base import AttentionMetadata
from ultrakv.node.parallel.process_group import ProcessGroup

HEADER_LEN = 8
KV_TAG = 17


class Op(IntEnum):
    FORWARD = 1
    READ_KV = 2
    WRITE_KV = 3
    STOP = 4
    GRAPHS = 5
    CAPTURE = 6
    DECODE_ROUND = 7
    CONTINUE = 8


@dataclass(frozen=True)
class GraphPlan:
    """The shapes of rank 0's CUDA graphs, which every rank captures alike."""

    max_batch: int
    max_model_len: int
    max_prefill_tokens: int
    greedy: bool


@dataclass
class Command:
    """A decoded command as a worker receives it."""

    op: Op
    input_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    meta: AttentionMetadata | None = None
    blocks: torch.Tensor | None = None
    kv: torch.Tensor | None = None
    num_steps: int = 0
    plan: GraphPlan | None = None


def _header(group: ProcessGroup, values: list[int]) -> None:
    header = torch.tensor(values + [0] * (HEADER_LEN - len(values)), dtype=torch.int64, device=group.device)
    group.broadcast(header)


def send_forward(group: ProcessGroup, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata, op: Op = Op.FORWARD, num_steps: int = 0) -> None:
    """Rank 0: tell the workers to run this forward (or, ``DECODE_ROUND``, a greedy round
    of ``num_steps`` steps from these inputs)."""
    b, width = meta.block_tables.shape
    _header(group, [op, input_ids.shape[0], b, width, meta.max_query_len, meta.max_seq_len, num_steps])
    group.broadcast(torch.cat([input_ids, positions, meta.slot_mapping]))
    group.broadcast(torch.cat([meta.query_start_loc, meta.seq_lens, meta.block_tables.flatten()]))


def send_graphs(group: ProcessGroup, plan: GraphPlan) -> None:
    _header(group, [Op.GRAPHS, plan.max_batch, plan.max_model_len, plan.max_prefill_tokens, int(plan.greedy)])


def send_capture(group: ProcessGroup) -> None:
    _header(group, [Op.CAPTURE])


def send_continue(group: ProcessGroup, num_steps: int) -> None:
    _header(group, [Op.CONTINUE, num_steps])


def send_read_kv(group: ProcessGroup, blocks: torch.Tensor) -> None:
    _header(group, [Op.READ_KV, blocks.shape[0]])
    group.broadcast(blocks)


def send_write_kv(group: ProcessGroup, blocks: torch.Tensor, kv: torch.Tensor) -> None:
    _header(group, [Op.WRITE_KV, blocks.shape[0]])
    group.broadcast(blocks)
    group.broadcast(kv)


def send_stop(group: ProcessGroup) -> None:
    _header(group, [Op.STOP])


def receive(group: ProcessGroup, kv_block_shape: tuple[int, int, int, int], kv_dtype: torch.dtype) -> Command:
    """A worker: the next command from rank 0 (blocks until it comes).

    ``kv_block_shape`` is ``(layers, block_size, kv_heads, head_dim)`` of the whole model,
    which sizes a ``WRITE_KV`` payload.
    """
    dev = group.device
    header = group.broadcast(torch.empty(HEADER_LEN, dtype=torch.int64, device=dev)).tolist()
    op = Op(header[0])
    if op == Op.GRAPHS:
        return Command(op, plan=GraphPlan(header[1], header[2], header[3], bool(header[4])))
    if op == Op.CONTINUE:
        return Command(op, num_steps=header[1])
    if op in (Op.FORWARD, Op.DECODE_ROUND):
        t, b, width, max_q, max_s, num_steps = header[1:7]
        i64 = group.broadcast(torch.empty(3 * t, dtype=torch.int64, device=dev))
        i32 = group.broadcast(torch.empty(2 * b + 1 + b * width, dtype=torch.int32, device=dev))
        meta = AttentionMetadata(
            query_start_loc=i32[: b + 1],
            seq_lens=i32[b + 1 : 2 * b + 1],
            block_tables=i32[2 * b + 1 :].view(b, width),
            slot_mapping=i64[2 * t :],
            max_query_len=max_q,
            max_seq_len=max_s,
        )
        return Command(op, input_ids=i64[:t], positions=i64[t : 2 * t], meta=meta, num_steps=num_steps)
    if op in (Op.READ_KV, Op.WRITE_KV):
        blocks = group.broadcast(torch.empty(header[1], dtype=torch.int64, device=dev))
        if op == Op.READ_KV:
            return Command(op, blocks=blocks)
        layers, block_size, heads, head_dim = kv_block_shape
        kv = torch.empty(layers, 2, header[1], block_size, heads, head_dim, dtype=kv_dtype, device=dev)
        return Command(op, blocks=blocks, kv=group.broadcast(kv))
    return Command(op)
