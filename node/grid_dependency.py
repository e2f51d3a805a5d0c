"""Programmatic dependent launch (Hopper and later) for the kernels of a decode step.

A batch-1 decode step on llama-1b is about 120 kernel launches in a CUDA graph, most of them
a few microseconds long; between two of them the GPU drains the first grid, then schedules
the next one's blocks, which then load their first inputs: about 1-2 us a launch with no
memory traffic. Launched with programmatic stream serialization, a kernel's blocks are
scheduled while its predecessor still runs and wait in ``griddepcontrol.wait`` until the
predecessor has finished and its writes are visible, so the scheduling overlaps the
predecessor's tail.

Every kernel launched so must call :func:`await_predecessor` before it touches memory (reads
the predecessor may still be writing, or writes over what it may still be reading): that is
its first statement, under ``PDL``, a ``tl.constexpr`` that is true exactly when the launch
sets ``launch_pdl`` (:func:`enabled`). Waiting for the predecessor's completion is
transitive (it waited for its own before finishing), and a kernel launched without the
attribute is ordered as always. The wait is followed by the trigger that lets the successor
be scheduled: all of this grid's blocks are resident by then, so the successor's waiting
blocks only take room this grid does not use.

On by default (``ULTRAKV_KERNELS=launch=serial`` turns it off, ``node/kernel_variants.py``);
ignored off CUDA, before compute capability 9.0 and under Triton's interpreter.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from ultrakv.node import kernel_variants


@triton.jit
def await_predecessor(PDL: tl.constexpr):
    """Wait for the previous kernel in the stream (and its writes), then let the next one be
    scheduled; nothing without ``PDL``."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def enabled(device: torch.device) -> bool:
    """Whether kernels launched on ``device`` use programmatic dependent launch."""
    return device.type == "cuda" and _supported(device.index or 0)


@functools.cache
def _supported(index: int) -> bool:
    if kernel_variants.current().launch != "pdl" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9
