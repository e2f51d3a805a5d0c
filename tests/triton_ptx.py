"""What a Triton kernel compiles to on an H100, on a machine without a GPU.

Triton's interpreter runs kernels with NumPy's arithmetic, which hides what the CUDA backend
chooses (approximate fp32 division, scalar vs vector loads). Triton compiles for a named GPU
without one being present, so a test can read the PTX a real launch would run: the kernel
is specialized on its arguments exactly as a launch specializes it (pointer and integer
divisibility by 16, integers equal to 1 folded in).
"""

from __future__ import annotations

import re

H100 = 90  # compute capability of the lent GPU


def hopper_ptx(kernel, args: tuple, constexprs: dict, num_warps: int = 4, num_stages: int = 2,
               launch_pdl: bool = False) -> str:
    """PTX of ``kernel`` for sm_90 as launched with ``args`` (its non-constexpr parameters,
    in order: CPU tensors stand in for device ones), ``constexprs`` and launch options."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    names = [p.name for p in kernel.params if not p.is_constexpr]
    if len(names) != len(args):
        raise ValueError(f"{kernel.__name__} takes {len(names)} runtime arguments, got {len(args)}")
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            continue
        ty, key = native_specialize_impl(BaseBackend, args[names.index(p.name)], False, True, True)
        signature[p.name] = ty
        if ty == "constexpr":
            consts[p.name] = key
        elif isinstance(key, str):
            attrs[(i,)] = BaseBackend.parse_attr(key)
    src = ASTSource(kernel, signature, consts, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", H100, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages,
                                       "launch_pdl": launch_pdl})
    return compiled.asm["ptx"]


def instructions(ptx: str, prefix: str) -> set[str]:
    """The distinct PTX opcodes (with their modifiers) that start with ``prefix``."""
    return set(re.findall(rf"\b({re.escape(prefix)}[\w.]*)", ptx))


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kw)`` records the
    launch instead of running it, so a test compiles exactly what a backend would launch."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((args, kw))

    def ptx(self, index: int = -1) -> str:
        """PTX for sm_90 of the recorded launch ``index``."""
        args, kw = self.launches[index]
        kw = dict(kw)
        options = {k: kw.pop(k) for k in ("num_warps", "num_stages", "launch_pdl") if k in kw}
        return hopper_ptx(self.kernel, args, kw, **options)
