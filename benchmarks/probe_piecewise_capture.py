"""How long warmup's piecewise-graph capture takes, and where (CUDA).

Times ``PiecewiseForward.capture_all`` as the engine runs it (each piece under
``torch.cuda.graph``, which synchronizes the device and empties the caching allocator's
cache before every capture), against the same captures made with ``capture_begin`` /
``capture_end`` on one side stream after a single synchronization, and reports the time per
graph. The replayed pieces of both are compared on one step.

    python benchmarks/probe_piecewise_capture.py [--models smollm2-shape llama-1b]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import write  # noqa: E402
from ultrakv.node import Engine, EngineConfig  # noqa: E402


@torch.inference_mode()
def capture_direct(pw) -> int:
    """Every piece at every count, captured back to back on one side stream."""
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    count = 0
    with torch.cuda.stream(stream):
        for n in pw.sizes:
            for i in range(len(pw.layers) + 1):
                pw._piece(i, n)  # the eager run torch's capture guide asks for
            pieces = []
            for i in range(len(pw.layers) + 1):
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=pw.pool)
                pw._piece(i, n)
                graph.capture_end()
                pieces.append(graph)
            pw.graphs[n] = pieces
            count += len(pieces)
    torch.cuda.synchronize()
    return count


@torch.inference_mode()
def replayed(pw, n: int) -> torch.Tensor:
    torch.manual_seed(0)
    pw.residual[:n].normal_()
    pw.hidden[:n].normal_()
    for i in range(len(pw.layers) + 1):
        pw.attn_out[:n].fill_(0.01 * (i + 1))
        pw.graphs[n][i].replay()
    torch.cuda.synchronize()
    return pw.hidden[:n].float().clone()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-shape", "llama-1b"])
    args = p.parse_args()
    out: dict = {"models": {}}
    for model in args.models:
        engine = Engine(EngineConfig(model=model, device="cuda"))
        t0 = time.perf_counter()
        engine.warmup()
        warmup_s = time.perf_counter() - t0
        pw = engine.runner.piecewise
        n_probe = pw.sizes[len(pw.sizes) // 2]
        t0 = time.perf_counter()
        count = pw.capture_all()
        as_engine_s = time.perf_counter() - t0
        reference = replayed(pw, n_probe)
        t0 = time.perf_counter()
        count_direct = capture_direct(pw)
        direct_s = time.perf_counter() - t0
        same = torch.equal(replayed(pw, n_probe), reference)
        row = {"warmup_s": warmup_s, "graphs": count, "capture_all_s": as_engine_s,
               "capture_all_ms_per_graph": 1000 * as_engine_s / count,
               "direct_s": direct_s, "direct_ms_per_graph": 1000 * direct_s / count_direct,
               "replays_equal": same, "probe_tokens": n_probe}
        print(model, row, flush=True)
        out["models"][model] = row
        engine.shutdown()
        del engine, pw
        torch.cuda.empty_cache()
    write(f"piecewise_capture_{torch.cuda.get_device_name().replace(' ', '_')}.json", out)


if __name__ == "__main__":
    main()
