"""Decode-kernel time over a bf16 / int8 / fp8 KV cache, by launch shape (H100 tuning aid).

Llama-3.2-1B (32/8/64) and Llama-3-8B (32/8/128) heads at 8k context, batch 1 and 32, bf16
queries: the Triton decode kernels (plus the split-K reduce where the shape needs one) as
CUDA-graph replays over a working set far past L2, for a few ``DecodeConfig`` shapes, and the
one ``DecodeConfig.for_head_dim`` picks. Reports microseconds per step and KV bytes read per
second (a quantized cache reads 68 or 132 bytes per row against 128 or 256). A quantized
decode should be faster than bf16 here; if another shape beats the default, change
``DecodeConfig.for_head_dim``.

Usage: python benchmarks/sweep_decode_quant.py   (writes sweep_decode_quant_<gpu>.json)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_attention import Workload, time_graph_decode  # noqa: E402
from common import write  # noqa: E402
from ultrakv.node.attention.triton_backend import DecodeConfig, TritonPagedBackend  # noqa: E402
from ultrakv.node.kv import quantization  # noqa: E402

SHAPES = {"llama-1b": (32, 8, 64), "llama-8b": (32, 8, 128)}
STORAGE = {"auto": None, "int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
# num_stages 1 loads tiles straight into registers instead of through cp.async and shared
# memory, which a one-byte tile leaves with byte-wide shared-memory reads.
CONFIGS = [DecodeConfig(32, 4, 2), DecodeConfig(64, 4, 2), DecodeConfig(64, 4, 3),
           DecodeConfig(128, 4, 2), DecodeConfig(64, 8, 2), DecodeConfig(128, 8, 3),
           DecodeConfig(64, 4, 1), DecodeConfig(128, 4, 1)]
CONTEXT = 8192


def main() -> None:
    rows = []
    for model, (heads, kv_heads, head_dim) in SHAPES.items():
        for batch in (1, 32):
            w = Workload(batch, CONTEXT, 1, heads, kv_heads, head_dim, seed=batch)
            bf16_cache = w.kv_cache
            for name, storage in STORAGE.items():
                w.kv_cache = bf16_cache if storage is None else quantization.quantize(bf16_cache, storage)
                row_bytes = w.kv_cache.shape[-1] * w.kv_cache.element_size()
                kv_bytes = batch * CONTEXT * kv_heads * row_bytes * 2
                default = DecodeConfig.for_head_dim(head_dim, storage is not None)
                for cfg in [None, *CONFIGS]:
                    us = time_graph_decode(w, TritonPagedBackend(decode_config=cfg)) * 1e3
                    shape = cfg or default
                    rows.append({"model": model, "batch": batch, "context": CONTEXT, "kv": name,
                                 "block_n": shape.block_n, "num_warps": shape.num_warps,
                                 "num_stages": shape.num_stages, "default": cfg is None,
                                 "us": us, "kv_GBps": kv_bytes / (us * 1e-6) / 1e9})
                    r = rows[-1]
                    print(f"{model} b{batch} {name:8s} n{r['block_n']:<3d} w{r['num_warps']} "
                          f"s{r['num_stages']}{' (default)' if cfg is None else '          '} "
                          f"{us:8.1f} us {r['kv_GBps']:7.0f} GB/s", flush=True)
            w.kv_cache = bf16_cache
            del w
            torch.cuda.empty_cache()
    name = torch.cuda.get_device_name().replace(" ", "_")
    write(f"sweep_decode_quant_{name}.json", {"gpu": torch.cuda.get_device_name(), "rows": rows})


if __name__ == "__main__":
    main()
