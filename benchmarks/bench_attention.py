"""Paged-attention kernel benchmark: the Triton backend against the PyTorch reference.

For the Llama-3.2-1B (32 q heads, 8 kv heads, head_dim 64) and Llama-3-8B (32/8/128) head
shapes, at batch 1/64/256 and contexts 512/2048, bfloat16, block size 16, shuffled blocks:

* decode: one new token per sequence. The Triton decode kernels are timed as CUDA-graph replays
  (how the engine runs them; Python launch cost excluded) and eagerly through ``forward``
  (KV write + attention, launch cost included); the reference through its ``forward``. Achieved
  KV-read bandwidth (bytes of K and V in every context / time) is set against a measured
  device-to-device copy bandwidth (bytes read + written).
* prefill: every sequence's whole context is new (``ctx`` prompt tokens); Triton ``prefill``
  against the reference ``forward``; causal attention FLOP/s.

Small working sets are rotated over several block tables into one large cache, so repeated
runs read HBM rather than L2. Times are medians of ``triton.testing.do_bench``.

    python benchmarks/bench_attention.py [--sweep] [--out benchmarks/results]

Writes ``attention_<gpu>.json``; ``--sweep`` first times a few kernel launch shapes per head
dim and uses the fastest (the choices are recorded in the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import asdict
from pathlib import Path

import torch
import triton
import triton.testing
from ultrakv.node.attention.base import AttentionMetadata
from ultrakv.node.attention.torch_ref import TorchReferenceBackend
from ultrakv.node.attention.triton_backend import DecodeConfig, PrefillConfig, TritonPagedBackend

SHAPES = {"llama-1b": (32, 8, 64), "llama-8b": (32, 8, 128)}  # q heads, kv heads, head_dim
BATCHES = (1, 64, 256)
CONTEXTS = (512, 2048)
BLOCK_SIZE = 16
DTYPE = torch.bfloat16
ROTATE_BYTES = 512 << 20  # working set spread well past the 50 MB L2
MAX_SETS = 64

DECODE_SWEEP = [DecodeConfig(bn, w, s) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
PREFILL_SWEEP = [
    PrefillConfig(64, 64, 4, 2), PrefillConfig(64, 64, 4, 3), PrefillConfig(128, 64, 8, 2),
    PrefillConfig(128, 64, 8, 3), PrefillConfig(128, 32, 4, 3), PrefillConfig(64, 32, 4, 3),
    PrefillConfig(128, 128, 8, 2),
]


def median_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus bytes written."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


class Workload:
    """Sequences of ``ctx`` tokens (``new`` of them new this step) in one shared paged cache.

    ``sets`` block tables address disjoint, shuffled regions of the cache.
    """

    def __init__(self, batch, ctx, new, heads, kv_heads, head_dim, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        blocks_per_seq = math.ceil(ctx / BLOCK_SIZE)
        kv_bytes = batch * ctx * kv_heads * head_dim * 2 * DTYPE.itemsize
        self.kv_bytes = kv_bytes
        self.num_sets = max(1, min(MAX_SETS, ROTATE_BYTES // kv_bytes))
        num_blocks = self.num_sets * batch * blocks_per_seq
        self.kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, kv_heads, head_dim, generator=g,
                                    device="cuda", dtype=DTYPE)
        perm = torch.randperm(num_blocks, generator=g, device="cuda").to(torch.int32)
        tokens = batch * new
        self.q = torch.randn(tokens, heads, head_dim, generator=g, device="cuda", dtype=DTYPE)
        self.k = torch.randn(tokens, kv_heads, head_dim, generator=g, device="cuda", dtype=DTYPE)
        self.v = torch.randn_like(self.k)
        starts = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * new
        pos = torch.arange(ctx - new, ctx, device="cuda")
        self.metas = []
        for s in range(self.num_sets):
            tables = perm[s * batch * blocks_per_seq:(s + 1) * batch * blocks_per_seq]
            tables = tables.view(batch, blocks_per_seq)
            slots = (tables[:, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
            self.metas.append(AttentionMetadata(
                query_start_loc=starts,
                seq_lens=torch.full((batch,), ctx, device="cuda", dtype=torch.int32),
                block_tables=tables.contiguous(),
                slot_mapping=slots.flatten(),
                max_query_len=new,
                max_seq_len=ctx,
            ))
        self.scale = head_dim ** -0.5
        self._turn = 0

    def next_meta(self) -> AttentionMetadata:
        self._turn = (self._turn + 1) % self.num_sets
        return self.metas[self._turn]

    def forward(self, backend):
        return backend.forward(self.q, self.k, self.v, self.kv_cache, self.next_meta(),
                               self.scale)


def time_graph_decode(w: Workload, backend: TritonPagedBackend) -> float:
    """ms per decode step (attention kernels only) replayed from a CUDA graph over all sets."""
    for meta in w.metas:  # compile and warm outside capture
        backend.decode(w.q, w.kv_cache, meta, w.scale)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        for meta in w.metas:
            backend.decode(w.q, w.kv_cache, meta, w.scale)
    torch.cuda.current_stream().wait_stream(stream)
    return median_ms(graph.replay) / w.num_sets


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def sweep(log) -> dict[int, tuple[DecodeConfig, PrefillConfig]]:
    """Fastest decode and prefill launch shapes per head dim (checked against the default)."""
    best = {}
    for model, (heads, kv_heads, head_dim) in SHAPES.items():
        dec_ws = [Workload(b, 2048, 1, heads, kv_heads, head_dim) for b in (1, 64)]
        pre_w = Workload(4, 2048, 2048, heads, kv_heads, head_dim)
        base = TritonPagedBackend(DecodeConfig(), PrefillConfig())
        dec_ref = [base.decode(w.q, w.kv_cache, w.metas[0], w.scale) for w in dec_ws]
        pre_ref = base.prefill(pre_w.q, pre_w.kv_cache, pre_w.metas[0], pre_w.scale)
        scores = []
        for cfg in DECODE_SWEEP:
            be = TritonPagedBackend(decode_config=cfg)
            try:
                errs = [rel_err(be.decode(w.q, w.kv_cache, w.metas[0], w.scale), r)
                        for w, r in zip(dec_ws, dec_ref, strict=True)]
                ms = [time_graph_decode(w, be) for w in dec_ws]
            except Exception as e:  # a shape that does not compile (e.g. out of shared memory)
                log(f"{model} decode {cfg}: failed {type(e).__name__}: {str(e)[:120]}")
                continue
            ok = max(errs) < 1e-2
            log(f"{model} decode {cfg}: b1 {ms[0] * 1e3:.1f} us, b64 {ms[1] * 1e3:.1f} us, "
                f"err {max(errs):.1e}{'' if ok else ' WRONG'}")
            if ok:
                scores.append((ms[0] + ms[1], cfg))
        dec_best = min(scores, key=lambda s: s[0])[1]
        scores = []
        for cfg in PREFILL_SWEEP:
            be = TritonPagedBackend(prefill_config=cfg)
            try:
                err = rel_err(be.prefill(pre_w.q, pre_w.kv_cache, pre_w.metas[0], pre_w.scale),
                              pre_ref)
                ms = median_ms(lambda be=be, w=pre_w: be.prefill(w.q, w.kv_cache, w.metas[0],
                                                                 w.scale))
            except Exception as e:
                log(f"{model} prefill {cfg}: failed {type(e).__name__}: {str(e)[:120]}")
                continue
            ok = err < 1e-2
            log(f"{model} prefill {cfg}: {ms * 1e3:.1f} us, err {err:.1e}"
                f"{'' if ok else ' WRONG'}")
            if ok:
                scores.append((ms, cfg))
        best[head_dim] = (dec_best, min(scores, key=lambda s: s[0])[1])
        log(f"{model}: best {best[head_dim]}")
    return best


def bench_decode(model, heads, kv_heads, head_dim, batch, ctx, backend, copy_gbps) -> dict:
    w = Workload(batch, ctx, 1, heads, kv_heads, head_dim, seed=batch + ctx)
    graph_ms = time_graph_decode(w, backend)
    eager_ms = median_ms(lambda: w.forward(backend))
    ref = TorchReferenceBackend()
    ref_ms = median_ms(lambda: w.forward(ref))
    meta = w.metas[0]
    err = rel_err(backend.forward(w.q, w.k, w.v, w.kv_cache, meta, w.scale),
                  ref.forward(w.q, w.k, w.v, w.kv_cache, meta, w.scale))
    gbps = w.kv_bytes / (graph_ms * 1e-3) / 1e9
    return {
        "model": model, "batch": batch, "context": ctx, "kv_bytes": w.kv_bytes,
        "triton_graph_us": graph_ms * 1e3, "triton_eager_us": eager_ms * 1e3,
        "torch_ref_us": ref_ms * 1e3, "speedup_vs_ref_eager": ref_ms / eager_ms,
        "kv_read_GBps": gbps, "fraction_of_copy_bw": gbps / copy_gbps, "rel_err_vs_ref": err,
    }


def bench_prefill(model, heads, kv_heads, head_dim, batch, ctx, backend) -> dict:
    w = Workload(batch, ctx, ctx, heads, kv_heads, head_dim, seed=batch * ctx)
    meta = w.metas[0]
    backend.write_kv(w.k, w.v, w.kv_cache, meta.slot_mapping)
    tri_ms = median_ms(lambda: backend.prefill(w.q, w.kv_cache, meta, w.scale))
    flops = 4 * heads * head_dim * batch * ctx * (ctx + 1) / 2
    row = {"model": model, "batch": batch, "context": ctx, "tokens": batch * ctx,
           "triton_us": tri_ms * 1e3, "triton_TFLOPs": flops / (tri_ms * 1e-3) / 1e12,
           "torch_ref_us": None, "speedup_vs_ref": None, "rel_err_vs_ref": None}
    ref = TorchReferenceBackend()
    try:
        ref_out = ref.forward(w.q, w.k, w.v, w.kv_cache, meta, w.scale)
        out = backend.prefill(w.q, w.kv_cache, meta, w.scale)
        row["rel_err_vs_ref"] = rel_err(out, ref_out)
        del ref_out, out
        ref_ms = median_ms(lambda: ref.forward(w.q, w.k, w.v, w.kv_cache, meta, w.scale))
        row["torch_ref_us"] = ref_ms * 1e3
        row["speedup_vs_ref"] = ref_ms / tri_ms
    except torch.cuda.OutOfMemoryError:
        row["torch_ref_us"] = "out of memory"
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON")
    parser.add_argument("--sweep", action="store_true", help="tune launch shapes first")
    args = parser.parse_args()

    def log(msg: str) -> None:
        print(msg, flush=True)

    t0 = time.time()
    gpu = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps()
    log(f"{gpu}: device copy {copy_gbps:.0f} GB/s (read + write)")
    configs = sweep(log) if args.sweep else {}
    result = {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__,
        "dtype": str(DTYPE), "block_size": BLOCK_SIZE, "copy_bandwidth_GBps": copy_gbps,
        "configs": {}, "decode": [], "prefill": [],
    }
    for model, (heads, kv_heads, head_dim) in SHAPES.items():
        dec_cfg, pre_cfg = configs.get(
            head_dim, (DecodeConfig.for_head_dim(head_dim), PrefillConfig.for_head_dim(head_dim)))
        result["configs"][model] = {"decode": asdict(dec_cfg), "prefill": asdict(pre_cfg)}
        backend = TritonPagedBackend(dec_cfg, pre_cfg)
        for batch in BATCHES:
            for ctx in CONTEXTS:
                d = bench_decode(model, heads, kv_heads, head_dim, batch, ctx, backend, copy_gbps)
                result["decode"].append(d)
                log(f"decode  {model} b={batch:<3} ctx={ctx:<4} graph {d['triton_graph_us']:8.1f}"
                    f" us  eager {d['triton_eager_us']:8.1f} us  ref {d['torch_ref_us']:9.1f} us"
                    f"  {d['kv_read_GBps']:6.0f} GB/s ({d['fraction_of_copy_bw']:.0%} of copy)"
                    f"  err {d['rel_err_vs_ref']:.1e}")
                p = bench_prefill(model, heads, kv_heads, head_dim, batch, ctx, backend)
                torch.cuda.empty_cache()
                result["prefill"].append(p)
                ref = p["torch_ref_us"]
                ref_s = f"{ref:9.1f} us" if isinstance(ref, float) else str(ref)
                log(f"prefill {model} b={batch:<3} ctx={ctx:<4} triton {p['triton_us']:9.1f} us"
                    f" ({p['triton_TFLOPs']:5.1f} TFLOP/s)  ref {ref_s}"
                    f"  err {p['rel_err_vs_ref']}")
    result["wall_s"] = time.time() - t0
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    path = Path(args.out) / f"attention_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    log(f"wrote {path} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
