"""Rank 0's side of tensor parallelism: it starts the worker ranks, and its engine drives
them in lockstep.

The engine on rank 0 keeps its one scheduler, block pool and sessions; the workers
(``node/parallel/worker.py``, one process per further device) hold only their slice of the
model and of each KV block. Every forward rank 0 runs is first broadcast to them
(``step_protocol``), and the all-reduces inside the forward keep the ranks in step. KV reads
and writes for session export/import gather or spread the heads the same way. One lock
orders all of it: a group's collectives must be issued in the same order on every rank.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
import weakref

import torch
from ultrakv.node.attention.base import AttentionMetadata
from ultrakv.node.config import EngineConfig
from ultrakv.node.cuda_graphs import CudaGraphRunner
from ultrakv.node.parallel import step_protocol
from ultrakv.node.parallel.process_group import ProcessGroup, host_store
from ultrakv.node.parallel.sharding import TensorShard, kv_head_slice
from ultrakv.node.parallel.step_protocol import GraphPlan, Op

log = logging.getLogger("ultrakv.node.parallel")
READY_TIMEOUT_S = 600.0


def tensor_parallel_devices(device: torch.device, size: int) -> list[torch.device]:
    """The device of each rank: consecutive CUDA devices from ``device``'s index, or the
    CPU for every rank. ValueError when the machine has too few CUDA devices."""
    if device.type != "cuda":
        return [device] * size
    first = device.index or 0
    count = torch.cuda.device_count()
    if first + size > count:
        raise ValueError(f"tensor_parallel_size {size} needs {size} CUDA devices from cuda:{first}, "
                         f"this machine has {count}")
    return [torch.device("cuda", first + r) for r in range(size)]


def read_heads(kv_caches: list[torch.Tensor], blocks: torch.Tensor) -> torch.Tensor:
    """This rank's heads of ``blocks``: ``[L, 2, n, block_size, local_heads, head_dim]``."""
    return torch.stack([c.index_select(1, blocks) for c in kv_caches])


def write_heads(kv_caches: list[torch.Tensor], blocks: torch.Tensor, kv: torch.Tensor, shard: TensorShard) -> None:
    """Store this rank's heads of the whole model's ``kv`` ``[L, 2, n, bs, heads, D]`` in ``blocks``."""
    heads = kv[:, :, :, :, kv_head_slice(kv.shape[4], shard)]
    for layer, cache in enumerate(kv_caches):
        cache.index_copy_(1, blocks, heads[layer].to(cache.dtype))


class TensorParallelModel:
    """The model as rank 0's runner sees it: each forward is broadcast to the workers and
    then run on rank 0's slice; logits come from rank 0 alone (every rank ends a layer with
    the whole hidden state)."""

    def __init__(self, model: torch.nn.Module, tp: TensorParallelGroup):
        self.model = model
        self.config = model.config
        self._tp = tp

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                 meta: AttentionMetadata) -> torch.Tensor:
        with self._tp.command():
            step_protocol.send_forward(self._tp.group, input_ids, positions, meta)
            return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        return self.model.compute_logits(hidden, upcast)


class TensorParallelGraphs(CudaGraphRunner):
    """Rank 0's CUDA graphs under tensor parallelism. Every rank holds graphs of the same
    shapes over its slice, the all-reduces captured in them, and captures and replays them in
    lockstep: before each replay rank 0 broadcasts the step's inputs (``FORWARD``), or a
    greedy round's first inputs and first chunk of steps (``DECODE_ROUND``) and then each
    later chunk (``CONTINUE``), and the workers replay theirs.
    A greedy step's graph ends with a broadcast of rank 0's sampled tokens, so the later steps
    of a round read the same tokens on every rank with nothing from the host in between.

    Without graphs a batch-1 llama-8b step over two H200s took 31 ms (eager launches on
    both ranks, three broadcasts a step); with them it is a replay per rank. A prefill step
    from host values (``run_prefill``) and the warmup's timing of prefill graphs
    (``rank_prefill_sizes``) are not used: a prefill goes through :meth:`run`, as the
    workers need its inputs anyway, and timing runs would have to be replayed everywhere.
    """

    lockstep = True

    def __init__(self, tp: TensorParallelGroup, model: torch.nn.Module, kv_caches: list[torch.Tensor],
                 block_size: int, device: torch.device, max_batch: int, max_model_len: int,
                 max_prefill_tokens: int):
        self._tp = tp
        self._plan = (max_batch, max_model_len, max_prefill_tokens)
        super().__init__(model, kv_caches, block_size, device, max_batch, max_model_len, max_prefill_tokens)

    @property
    def greedy(self):
        return self._greedy

    @greedy.setter
    def greedy(self, pick) -> None:
        # The sampled tokens go to every rank from inside the graph.
        self._greedy = None if pick is None else (lambda hidden: self._tp.group.broadcast(pick(hidden)))

    def announce(self) -> None:
        """Have every worker build graphs of these shapes (once, after the runner set ``greedy``)."""
        with self._tp.command():
            step_protocol.send_graphs(self._tp.group, GraphPlan(*self._plan, greedy=self._greedy is not None))

    def capture_all(self) -> int:
        with self._tp.command():
            step_protocol.send_capture(self._tp.group)
            return super().capture_all()

    def rank_prefill_sizes(self, replays: int = 5) -> dict:
        return {}

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        with self._tp.command():
            step_protocol.send_forward(self._tp.group, input_ids, positions, meta)
            return super().run(input_ids, positions, meta)

    @contextlib.contextmanager
    def greedy_round(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                     num_steps: int):
        """Around the launches of a greedy round's first chunk (:meth:`stage_decode`, then
        ``num_steps`` :meth:`replay_greedy`): the workers are told first, and no other
        command can come between (a chunk is launched whole, on every rank)."""
        with self._tp.command():
            step_protocol.send_forward(self._tp.group, input_ids, positions, meta, Op.DECODE_ROUND, num_steps)
            yield

    @contextlib.contextmanager
    def more_greedy_steps(self, num_steps: int):
        """Around the launches of a later chunk of the round: ``num_steps`` more replays."""
        with self._tp.command():
            step_protocol.send_continue(self._tp.group, num_steps)
            yield


class TensorParallelGroup:
    """Rank 0's handle on a tensor-parallel group: the worker processes, the process group
    and the KV operations that span every rank's heads."""

    def __init__(self, config: EngineConfig, devices: list[torch.device]):
        self.size = len(devices)
        self.shard = TensorShard(0, self.size)
        self.lock = threading.Lock()
        self._store = host_store()
        self._prefix = f"tp-{uuid.uuid4().hex}"
        self._devices = devices
        cfg = json.dumps(dataclasses.asdict(config))
        self._procs = [
            subprocess.Popen([sys.executable, "-m", "ultrakv.node.parallel.worker", "--rank", str(r),
                              "--world-size", str(self.size), "--store-port", str(self._store.port),
                              "--prefix", self._prefix, "--device", str(devices[r]),
                              "--parent-pid", str(os.getpid()), "--config", cfg])
            for r in range(1, self.size)
        ]
        # Workers must not outlive an engine that is dropped without shutdown().
        self._finalizer = weakref.finalize(self, _kill, list(self._procs))
        self.group: ProcessGroup | None = None
        self.broken: str | None = None  # why the ranks can no longer be kept in step

    @contextlib.contextmanager
    def command(self):
        """Hold the group's lock around a command and rank 0's share of the work it starts.

        An error in between leaves the workers inside a collective that rank 0 will never
        join, and whatever came next would meet it out of step (a hang on gloo; a hang or
        wrong sums on NCCL). So the group is broken for good: its workers are ended, every
        later command raises at once, and the engine reports no progress (the node turns
        NOT_SERVING and the coordinator moves its sessions)."""
        with self.lock:
            if self.broken is not None:
                raise RuntimeError(f"tensor-parallel group broken by an earlier error: {self.broken}")
            try:
                yield
            except BaseException as exc:
                self.broken = f"{type(exc).__name__}: {exc}"
                log.error("tensor-parallel group broken (rank 0 failed between a command and its "
                          "collectives: %s); ending the workers", self.broken)
                _kill(self._procs)
                raise

    def connect(self, num_blocks: int) -> int:
        """Wait for every worker to load its slice, join the group, and agree on the KV pool
        size (the smallest any rank can hold); returns it. RuntimeError if a worker died."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        pending = {r: f"{self._prefix}/ready/{r}" for r in range(1, self.size)}
        while pending:
            for rank, key in list(pending.items()):
                if self._store.check([key]):
                    del pending[rank]
            for rank, proc in enumerate(self._procs, start=1):
                if proc.poll() is not None:
                    self.shutdown()
                    raise RuntimeError(f"tensor-parallel worker rank {rank} exited with status "
                                       f"{proc.returncode} while loading (its log is above)")
            if time.monotonic() > deadline:
                self.shutdown()
                raise RuntimeError(f"tensor-parallel workers {sorted(pending)} not ready after "
                                   f"{READY_TIMEOUT_S:.0f} s")
            if pending:
                time.sleep(0.05)
        self.group = ProcessGroup(self._store, self._prefix, 0, self.size, self._devices[0])
        return self.group.all_reduce_min(num_blocks)

    def wrap(self, model: torch.nn.Module) -> TensorParallelModel:
        """``model`` (rank 0's slice) with its all-reduces wired to the group, as the runner drives it."""
        model.use_all_reduce(self.group.all_reduce)
        return TensorParallelModel(model, self)

    def read_kv(self, kv_caches: list[torch.Tensor], blocks: torch.Tensor) -> torch.Tensor:
        """Every head of ``blocks`` (gathered from all ranks): ``[L, 2, n, bs, heads, D]``."""
        with self.command():
            step_protocol.send_read_kv(self.group, blocks)
            local = read_heads(kv_caches, blocks)
            parts = [local] + [self.group.recv(torch.empty_like(local), r, step_protocol.KV_TAG)
                               for r in range(1, self.size)]
        return torch.cat(parts, dim=4)

    def write_kv(self, kv_caches: list[torch.Tensor], blocks: torch.Tensor, kv: torch.Tensor) -> None:
        """Store the whole model's ``kv`` of ``blocks``; each rank keeps its heads."""
        kv = kv.contiguous()
        with self.command():
            step_protocol.send_write_kv(self.group, blocks, kv)
        # After the command: the workers write their heads with no collective, so a failure
        # here (out of memory in a dtype cast, say) leaves the ranks in step.
        write_heads(kv_caches, blocks, kv, self.shard)

    def shutdown(self) -> None:
        """Stop the workers (politely over the group when it is up, else by signal)."""
        with self.lock:
            stopped = False
            if self.group is not None and self.broken is None:  # a broken group's workers are gone
                try:
                    step_protocol.send_stop(self.group)
                    stopped = True
                except Exception:  # a dead worker: the signal below ends the rest
                    log.debug("tensor-parallel stop broadcast failed", exc_info=True)
            # The workers exit on STOP without releasing the group (under NCCL a graceful
            # release is collective, and it hung even with every rank releasing at once);
            # rank 0 aborts its end once they are gone (ProcessGroup.release).
            for proc in self._procs:
                try:
                    proc.wait(timeout=30 if stopped else 0)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if self.group is not None:
                if not self.group.release():
                    log.warning("tensor-parallel group not released within 30 s; left to the process's exit")
                self.group = None
            self._finalizer.detach()


def _kill(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
