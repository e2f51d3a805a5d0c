"""Linear layers with their weights packed for oneDNN, for float32 inference on a CPU.

A decode step multiplies a few rows of activations by every weight matrix of the model, and
on a CPU that is almost all of its time. ``F.linear`` hands those products to the BLAS
PyTorch is built with (MKL), which is slow at them on the AMD EPYC machine this was
measured on: at 8 rows its kernel ran at half the speed of oneDNN's over a weight reordered
once into oneDNN's blocked layout (the vocabulary projection of smollm2-135m: 28 ms against
13 ms a step; see benchmarks/bench_smollm2_cpu.py). So on CPU the engine packs each weight
once, at load, and runs its products through oneDNN. Same float32 arithmetic, in another
summation order: results agree with ``F.linear`` to float32 rounding.

One row (decode at batch 1) is another matter: the product is a GEMV bound by memory
bandwidth, and there MKL streams a dense ``[in, out]`` copy of the weight about twice as fast
as either oneDNN's layout or ``F.linear``'s ``[out, in]`` (the vocabulary projection: 5 ms
against 10 ms). The vocabulary projection, the largest single product, keeps such a copy.
"""

from __future__ import annotations

import torch
from torch import nn

# How many rows the packed layout is tuned for: the decode batches this path is for.
PACK_ROWS = 8


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights of ``dtype`` on ``device`` can be packed here (a float32 CPU model
    and a PyTorch built with oneDNN)."""
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    """``F.linear(x, weight, bias)`` over a weight held only in oneDNN's packed layout.

    Inference only (no autograd through the packed weight). ``x``: [..., in_features].
    With ``row_copy`` a dense ``[in, out]`` copy of the weight serves single-row inputs
    (see the module docstring): faster at batch 1, at the cost of the weight's memory again.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, row_copy: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
        self.bias = None if bias is None else bias.detach()
        self.transposed = weight.detach().t().contiguous() if row_copy else None

    @classmethod
    def of(cls, linear: nn.Linear) -> PackedLinear:
        """The packed twin of ``linear`` (which may then be dropped)."""
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed is not None and x.dim() == 2 and x.shape[0] == 1:
            if self.bias is None:
                return torch.mm(x, self.transposed)
            return torch.addmm(self.bias, x, self.transposed)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
