"""Which implementation runs a hot-path operation where two are kept for A/B measurement.

A kernel that replaces another is switched on by default only with GPU figures behind it;
the one it replaced stays selectable so the next GPU session can measure both in one run
(``benchmarks/gpu_session.sh kernels-ab``). The choice is read once per process from the
environment, e.g. ``ULTRAKV_KERNELS=prefill_attention=per_head,argmax=torch``:

* ``prefill_attention``: ``gqa`` (default) packs every query head of a kv head into one
  program for a returning session's turn (few new tokens over a long cached context), split
  over the context and merged in the same launch; ``per_head`` is the kernel pair it
  replaced (one program per query head, a second launch merging the slices).
* ``argmax``: greedy sampling's argmax over the vocabulary; ``split`` (default) is a Triton
  kernel that splits each row over many programs (CUDA, or Triton's interpreter);
  ``torch`` is ``torch.argmax`` (one block per row on CUDA: 28 us for a 128k vocabulary).
* ``gemv``: the model's projections at one token (decode at batch 1), with fused kernels
  on; ``triton`` (default) is a Triton GEMV with the residual add, RMSNorm and SwiGLU fused
  in (``node/model/gemv.py``; on an H100 with llama-1b its matrices ran 1.0-1.6x faster than
  cuBLAS's and batch-1 decode 5% faster before tuning); ``cublas`` is ``F.linear``.
* ``launch``: how the decode step's Triton kernels (GEMVs, RMSNorm, RoPE + KV write, decode
  attention, argmax) are launched: ``pdl`` (default) with programmatic dependent launch on
  Hopper and later (``node/grid_dependency.py``; on an H100, llama-1b batch-1 decode 715-758
  -> 784-796 tok/s in interleaved runs, batch 64 +1-2%, llama-8b batch 1 166 -> 168);
  ``serial`` launches them as any kernel.
* ``eager_steps``: how a step no CUDA graph of its own replays (several sequences, a prompt
  past the prefill graphs) runs, up to 2048 tokens: ``piecewise`` (default) replays graphs
  of every layer's part around its attention, captured per padded token count
  (``node/piecewise_graphs.py``); ``eager`` launches every kernel from Python.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields

ENV = "ULTRAKV_KERNELS"

_CHOICES = {
    "prefill_attention": ("gqa", "per_head"),
    "argmax": ("split", "torch"),
    "gemv": ("triton", "cublas"),
    "launch": ("pdl", "serial"),
    "eager_steps": ("piecewise", "eager"),
}


@dataclass(frozen=True)
class KernelVariants:
    """The implementation chosen for each switchable operation (see the module docstring)."""

    prefill_attention: str = "gqa"
    argmax: str = "split"
    gemv: str = "triton"
    launch: str = "pdl"
    eager_steps: str = "piecewise"

    def __post_init__(self) -> None:
        for f in fields(self):
            value, allowed = getattr(self, f.name), _CHOICES[f.name]
            if value not in allowed:
                raise ValueError(f"{ENV}: {f.name} must be one of {allowed}, got {value!r}")

    @classmethod
    def parse(cls, spec: str) -> KernelVariants:
        """``name=value`` pairs separated by commas (empty: every default)."""
        values: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name.strip() not in _CHOICES:
                raise ValueError(f"{ENV} entries must be name=value with name one of "
                                 f"{tuple(_CHOICES)}, got {item!r}")
            values[name.strip()] = value.strip()
        return cls(**values)


@functools.cache
def current() -> KernelVariants:
    """The process's choice, from ``$ULTRAKV_KERNELS`` (read once)."""
    return KernelVariants.parse(os.environ.get(ENV, ""))
