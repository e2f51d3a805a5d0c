"""Attention backends by name: ``torch`` (the PyTorch reference, CPU and CUDA)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from ultrakv.node.attention.base import AttentionBackend, AttentionMetadata, write_kv
from ultrakv.node.attention.torch_ref import TorchReferenceBackend

# name -> factory(device); GPU kernels register here under their own name.
BACKENDS: dict[str, Callable[[torch.device], AttentionBackend]] = {
    "torch": lambda device: TorchReferenceBackend(),
}


def get_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """The backend ``name`` (``EngineConfig.attention_backend``) for ``device``.

    ``auto`` picks the PyTorch reference for now.
    """
    device = torch.device(device)
    if name == "auto":
        name = "torch"
    factory = BACKENDS.get(name)
    if factory is None:
        raise ValueError(f"attention_backend must be one of {('auto', *BACKENDS)}, got {name!r}")
    return factory(device)


__all__ = ["BACKENDS", "AttentionBackend", "AttentionMetadata", "TorchReferenceBackend",
           "get_backend", "write_kv"]
