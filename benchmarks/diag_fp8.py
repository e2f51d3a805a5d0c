"""The Triton KV write kernel's quantized bytes against ``quantization.quantize``, on a GPU.

For the same bf16 / fp16 keys (llama-1b and llama-8b head shapes, an 8x outlier channel, and
rows whose absmax makes the scale a power of two times 3, 5 or 9, where quotients land on
rounding ties), it writes the rows through the kernel and through the PyTorch reference (on
CPU and on the GPU) and prints how many value bytes and scales differ, the largest
difference in e4m3 / int8 steps, and a few differing values. Then it reruns the GPU test
that found the mismatch (attention over a long bf16 context, kernel against the reference).
Expected after the fix: 0 differing bytes everywhere and attention errors under 0.03.

Usage: python benchmarks/diag_fp8.py   (writes diag_fp8_<gpu>.json to the results folder)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))

from common import write  # noqa: E402
from kv_quant_cases import QuantCase, max_abs_err  # noqa: E402
from ultrakv.node.attention.triton_backend import TritonPagedBackend  # noqa: E402
from ultrakv.node.kv import quantization  # noqa: E402

STORAGE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}


def _rows(num_tokens: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(head_dim + kv_heads)
    x = torch.randn(num_tokens, kv_heads, head_dim, generator=g)
    x[..., 3] *= 8.0
    # Half the rows get an absmax of 7 * {3, 5, 9} * 2^e, so that scale = absmax / 448 is
    # exact, and three values of scale * (an odd number in [17, 31]): exact ties of the e4m3
    # grid (a step of 2 there), the case approximate division gets wrong.
    half = num_tokens // 2
    scale = torch.tensor([3.0, 5.0, 9.0])[torch.randint(0, 3, (half, kv_heads), generator=g)]
    scale = scale * 2.0 ** torch.randint(-12, -8, (half, kv_heads), generator=g).float()
    x[:half, :, 4:] *= 40 * scale[..., None]  # below 448 * scale: channel 3 sets the absmax
    x[:half, :, 3] = 448 * scale
    odd = 2 * torch.randint(8, 16, (half, kv_heads, 3), generator=g) + 1
    x[:half, :, :3] = scale[..., None] * odd
    return x.to(dtype)


def compare(name: str, x: torch.Tensor) -> dict:
    storage = STORAGE[name]
    t, kv_heads, head_dim = x.shape
    row = head_dim + quantization.SCALE_BYTES
    cache = torch.zeros(2, -(-t // 16), 16, kv_heads, row, dtype=torch.uint8, device="cuda").view(storage)
    xc = x.cuda()
    TritonPagedBackend().write_kv(xc, xc, cache, torch.arange(t, device="cuda"))
    got = cache[0].reshape(-1, kv_heads, row)[:t].view(torch.uint8).cpu()
    result = {}
    for where, want in (("cpu", quantization.quantize(x, storage)),
                        ("cuda", quantization.quantize(xc, storage).cpu())):
        want = want.view(torch.uint8)
        value_diff = got[..., :head_dim] != want[..., :head_dim]
        scale_diff = (got[..., head_dim:] != want[..., head_dim:]).any(-1)
        steps = (quantization.dequantize(got.view(storage), head_dim)
                 - quantization.dequantize(want.view(storage), head_dim)).abs()
        step = x.float().abs().amax(-1, keepdim=True) / quantization.qmax(storage)
        examples = []
        for idx in value_diff.nonzero()[:5].tolist():
            i, h, d = idx
            examples.append({"x": float(x[i, h, d]), "scale": float(got[i, h, head_dim:].view(torch.float32)),
                             "kernel_byte": int(got[i, h, d]), "ref_byte": int(want[i, h, d])})
        result[f"vs_{where}_reference"] = {
            "values": int(value_diff.numel()), "differing_values": int(value_diff.sum()),
            "differing_scales": int(scale_diff.sum()),
            "max_diff_in_steps_of_absmax_over_qmax": float((steps / step).max()),
            "examples": examples,
        }
    return result


def attention_errors(name: str, head_dim: int) -> dict:
    """tests/test_kv_quant_kernels.py::test_cuda_long_context_bf16's two cases."""
    storage = STORAGE[name]
    out = {}
    for label, prefix, new, seed in (("decode", [2000, 1, 700, 0], [1, 1, 1, 1], 5),
                                     ("prefill", [0, 300, 50], [500, 64, 1], 6)):
        case = QuantCase(prefix, new, 32, 8, head_dim, torch.bfloat16, seed, device="cuda")
        cache = case.cache(storage)
        got = TritonPagedBackend().forward(case.q.cuda(), case.k.cuda(), case.v.cuda(), cache,
                                           case.meta, case.scale)
        out[label] = max_abs_err(got, case.reference(storage))
    return out


def main() -> None:
    report = {"gpu": torch.cuda.get_device_name(), "write": {}, "attention": {}}
    for name in STORAGE:
        for dtype in (torch.bfloat16, torch.float16):
            for kv_heads, head_dim in ((8, 64), (8, 128)):
                key = f"{name}/{str(dtype).removeprefix('torch.')}/{kv_heads}x{head_dim}"
                report["write"][key] = r = compare(name, _rows(4096, kv_heads, head_dim, dtype))
                for where, d in r.items():
                    print(f"write {key} {where}: {d['differing_values']}/{d['values']} values, "
                          f"{d['differing_scales']} scales differ; max "
                          f"{d['max_diff_in_steps_of_absmax_over_qmax']:.3f} steps; {d['examples'][:2]}")
        for head_dim in (64, 128):
            report["attention"][f"{name}/{head_dim}"] = e = attention_errors(name, head_dim)
            print(f"attention {name} head_dim {head_dim}: max abs err {e} (test tolerance 0.03)")
    write(f"diag_fp8_{torch.cuda.get_device_name().replace(' ', '_')}.json", report)


if __name__ == "__main__":
    main()
