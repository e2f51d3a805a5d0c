"""A torch.distributed process group of our own: NCCL between CUDA devices, gloo on CPU.

The group is built directly on a ``TCPStore`` (rank 0 hosts it on a free port) instead of
through ``init_process_group``: a process can then hold several groups at once (one per
engine, one per KV-transfer pair), none of them the process-global default, and tests can
start and stop them freely.
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one group meet: the store's address and a key prefix of its own."""

    host: str
    port: int
    prefix: str
    world_size: int


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA tensors, ``gloo`` for CPU ones."""
    return "nccl" if device.type == "cuda" else "gloo"


def host_store(host: str = "127.0.0.1", timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
    """A TCPStore served by this process on a free port (``store.port``)."""
    return dist.TCPStore(host, 0, None, True, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def join_store(host: str, port: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> dist.TCPStore:
    """A client of the TCPStore that another rank hosts."""
    return dist.TCPStore(host, port, None, False, timeout=datetime.timedelta(seconds=timeout_s))


class ProcessGroup:
    """One rank's end of a group; blocking collectives and point-to-point on tensors of
    ``device`` (CUDA tensors over NCCL, CPU tensors over gloo)."""

    def __init__(self, store: dist.Store, prefix: str, rank: int, world_size: int,
                 device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size - 1}], got {rank}")
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.backend = backend_for(self.device)
        timeout = datetime.timedelta(seconds=timeout_s)
        prefixed = dist.PrefixStore(prefix, store)
        if self.backend == "nccl":
            torch.cuda.set_device(self.device)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
        else:
            self._pg = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        self._pg.allreduce([tensor]).wait()
        return tensor

    def all_reduce_min(self, value: int) -> int:
        """The smallest of every rank's ``value``."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self._pg.allreduce([t], opts).wait()
        return int(t.item())

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """``root``'s ``tensor`` into every rank's ``tensor`` (same shape and dtype)."""
        self._pg.broadcast(tensor, root).wait()
        return tensor

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        self._pg.send([tensor], dst, tag).wait()

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> torch.Tensor:
        self._pg.recv([tensor], src, tag).wait()
        return tensor

    def release(self, timeout_s: float = 30.0) -> bool:
        """Release this rank's end once the other ranks have exited (they leave without
        releasing theirs): NCCL's communicators are aborted, which waits for no peer; gloo's
        are shut down. False when that failed or took over ``timeout_s``."""
        if self.backend != "nccl":
            shutdown = getattr(self._pg, "shutdown", None)
            if shutdown is not None:
                shutdown()
            return True
        end = self._pg.abort
        ended = threading.Event()
        ok = []

        def run() -> None:
            try:
                end()
                ok.append(True)
            except Exception:  # the caller logs that it was not released
                pass
            finally:
                ended.set()

        # On a thread of its own: an NCCL release can block on a peer that is gone.
        threading.Thread(target=run, name="ultrakv-nccl-release", daemon=True).start()
        return ended.wait(timeout_s) and bool(ok)
