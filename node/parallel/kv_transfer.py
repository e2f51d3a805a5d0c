"""A session's KV moved device to device over torch.distributed point-to-point.

Migration over gRPC copies every KV byte to host memory, frames it in chunks with a sha256
each, and copies it back onto the other device. Between engines that can form a process
group (the GPUs of one node, or nodes whose GPUs reach each other: NVLink, InfiniBand) the
KV can go in one ``send``/``recv`` instead, NCCL moving it GPU to GPU (gloo between CPU
processes, which is how the tests run it). gRPC stays the control plane: the session's
history, turns, tenant and fingerprint travel as before (a ``SessionState`` without KV);
only the tensor takes the link, and a move without a link falls back to the chunks.

Within one process (``EngineGroup.move_session``) no group is needed at all: the KV is
read straight onto the destination device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from ultrakv.cluster.session_state import SessionState
from ultrakv.node.parallel.process_group import ProcessGroup

KV_TAG = 29
_MAX_DIMS = 8
# Wire codes of the dtypes a KV tensor can have (float caches, and int8/fp8 quantized ones).
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.int8, torch.float8_e4m3fn]


class KVLink:
    """One end of a point-to-point KV link to ``peer`` in ``group``.

    Sends and receives are blocking and ordered: a header (dtype and shape, int64) then the
    tensor itself, on the group's device.
    """

    def __init__(self, group: ProcessGroup, peer: int):
        if peer == group.rank or not 0 <= peer < group.world_size:
            raise ValueError(f"peer must be another rank in [0, {group.world_size - 1}], got {peer}")
        self.group = group
        self.peer = peer

    def send(self, kv: torch.Tensor) -> None:
        """Send ``kv`` (any device: it is moved to the group's device first)."""
        if kv.dtype not in _DTYPES or kv.dim() > _MAX_DIMS:
            raise ValueError(f"KV must be one of {_DTYPES} with at most {_MAX_DIMS} dims, "
                             f"got {kv.dtype} with {kv.dim()}")
        header = [_DTYPES.index(kv.dtype), kv.dim(), *kv.shape] + [0] * (_MAX_DIMS - kv.dim())
        self.group.send(torch.tensor(header, dtype=torch.int64, device=self.group.device), self.peer, KV_TAG)
        self.group.send(kv.to(self.group.device).contiguous(), self.peer, KV_TAG)

    def recv(self) -> torch.Tensor:
        """The next tensor the peer sends, on the group's device."""
        header = torch.empty(2 + _MAX_DIMS, dtype=torch.int64, device=self.group.device)
        code, ndim, *dims = self.group.recv(header, self.peer, KV_TAG).tolist()
        kv = torch.empty(dims[:ndim], dtype=_DTYPES[code], device=self.group.device)
        return self.group.recv(kv, self.peer, KV_TAG)


def send_session(engine, session_id: str, link: KVLink, control: Callable[[SessionState], None]) -> SessionState:
    """Move a session out: ``control`` delivers its state without KV to the receiver (the
    gRPC control plane), then the KV goes over ``link``. Returns the state sent."""
    state = engine.export_session(session_id, kv_device=link.group.device)
    record = replace(state, kv=None)
    control(record)
    if state.kv is not None:
        link.send(state.kv)
    return record


def receive_session(engine, state: SessionState, link: KVLink) -> int:
    """Import a session whose KV comes over ``link`` (``state`` from the control plane says
    whether any does: ``kv_tokens``); returns the KV tokens taken in."""
    kv = link.recv() if state.kv_tokens else None
    return engine.import_session(replace(state, kv=kv))
