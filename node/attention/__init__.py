"""Attention backends by name: ``torch`` (the PyTorch reference, CPU and CUDA)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from ultrakv.node.attention.base import AttentionBackend, AttentionMetadata, write_kv
from ultrakv.node.attention.torch_ref import TorchReferenceBackend
from ultrakv.node.attention.triton_backend import TritonPagedBackend, triton_available

# name -> factory(device); GPU kernels register here under their own name.
BACKENDS: dict[str, Callable[[torch.device], AttentionBackend]] = {
    "torch": lambda device: TorchReferenceBackend(),
    "triton": lambda device: TritonPagedBackend(),
}


def get_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """The backend ``name`` (``EngineConfig.attention_backend``) for ``device``.

    ``auto`` picks the Triton kernels on CUDA when Triton imports, the PyTorch reference otherwise.
    """
    device = torch.device(device)
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available() else "torch"
    factory = BACKENDS.get(name)
    if factory is None:
        raise ValueError(f"attention_backend must be one of {('auto', *BACKENDS)}, got {name!r}")
    return factory(device)


__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "TorchReferenceBackend",
           "TritonPagedBackend", "get_backend", "write_kv"]
