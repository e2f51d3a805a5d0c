"""What the KV tiers cost a request on the engine thread, step span by step span, on CPU.

The GPU benchmark (bench_kv_tiers.py on llama-1b) found the tiers making TTFT worse even when
the cost model skipped every disk hit: the overhead sat on the request's critical path, not
in loads. This reproduces it on CPU with a model whose KV block has llama-1b's shape (16
layers, 8 KV heads, head_dim 64, bf16: 512 KiB per 16-token block) but whose compute is
cheap (hidden size 64), so the tiers' own work is not drowned by the model's.

A multi-turn trace (sessions round robin, more than the pool holds) runs with tiers off, a
CPU tier, CPU + disk, and after a restart with the disk tier and without it; per config,
TTFT of the returning turns and the summed time of the engine-thread spans: ``step`` (all
of Engine.step), ``execute`` (the model step, where contention from the tiers' threads for
the GIL shows up), ``flush`` (offload of evicted blocks; on CUDA only their snapshot),
``settle`` (the rest of the offload, on CUDA inside ``execute``), ``prefetch``, ``plan``,
``load``.

    python benchmarks/profile_tier_overhead.py [--disk-loses] [--label before|after]
"""

from __future__ import annotations

import argparse
import functools
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, summary, write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402
from ultrakv.node.model import presets  # noqa: E402
from ultrakv.node.model.config import ModelConfig  # noqa: E402

PRESET = "kv-shape-1b"
# llama-1b's KV cache (16 layers x 8 KV heads x 64 dims; fp32) behind a model that costs little.
presets.PRESETS[PRESET] = ModelConfig(
    architecture="llama", vocab_size=320, hidden_size=64, intermediate_size=128,
    num_hidden_layers=16, num_attention_heads=8, num_key_value_heads=8, head_dim=64,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=10000.0,
    torch_dtype="float32", bos_token_id=256, eos_token_ids=[257])


class Spans:
    """Seconds spent in wrapped methods, summed per label."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self.cpu_s: dict[str, float] = {}  # the engine thread's CPU time: robust to a loaded machine
        self.calls: dict[str, int] = {}

    def wrap(self, obj: object, name: str, label: str) -> None:
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.s[label] = self.s.get(label, 0.0) + time.perf_counter() - t0
                self.cpu_s[label] = self.cpu_s.get(label, 0.0) + time.thread_time() - c0
                self.calls[label] = self.calls.get(label, 0) + 1

        setattr(obj, name, timed)


def _engine(args: argparse.Namespace, spans: Spans, **tiers) -> Engine:
    engine = Engine(EngineConfig(model=PRESET, device="cpu", num_blocks=args.num_blocks, block_size=16,
                                 max_num_seqs=8, **tiers))
    engine.warmup()
    spans.wrap(engine, "step", "step")
    spans.wrap(engine.runner, "execute", "execute")
    if engine.tiers is not None and args.disk_loses:  # as on the GPU: every disk hit is skipped
        cost = engine.tiers.cost
        load_seconds = cost.load_seconds
        cost.load_seconds = lambda source: 1.0 if source == "disk" else load_seconds(source)
    if engine.tiers is not None:
        for name in ("flush", "settle", "prefetch", "plan", "load"):
            spans.wrap(engine.tiers, name, name)
    return engine


def _result(ttft: list[float], cached: int, prompt: int, spans: Spans, engine: Engine) -> dict:
    out = {"hit_rate": cached / prompt if prompt else 0.0, "ttft_s": summary(ttft),
           "ttft_median_ms": statistics.median(ttft) * 1e3,
           "spans_ms": {k: round(v * 1e3, 2) for k, v in spans.s.items()},
           "spans_cpu_ms": {k: round(v * 1e3, 2) for k, v in spans.cpu_s.items()}, "span_calls": dict(spans.calls)}
    tiers = engine.stats().get("kv_tiers", {})
    for key in ("skipped", "prefetched", "offloaded", "loaded"):
        if key in tiers:
            out[key] = tiers[key]
    if "disk" in tiers:
        out["disk"] = {k: tiers["disk"][k] for k in ("hits", "writes", "dropped")}
    if "cpu" in tiers:
        out["cpu_hits"] = tiers["cpu"]["hits"]
    return out


def run_trace(engine: Engine, spans: Spans, trace: list[list[list[int]]], args: argparse.Namespace) -> dict:
    sp = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)
    ttft, cached, prompt = [], 0, 0
    spans.s.clear()
    spans.cpu_s.clear()
    spans.calls.clear()
    for turn, prompts in enumerate(trace):
        for s, tokens in enumerate(prompts):
            (out,) = engine.generate([tokens], sp, session_ids=[f"s{s}"])
            if turn:
                ttft.append(out.ttft_s)
                cached += out.cached_tokens
                prompt += out.prompt_tokens
    return _result(ttft, cached, prompt, spans, engine)


def run_after_restart(engine: Engine, spans: Spans, histories: list[list[int]], args: argparse.Namespace) -> dict:
    sp = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)
    rng = random.Random(args.seed + 1)
    ttft, cached, prompt = [], 0, 0
    spans.s.clear()
    spans.cpu_s.clear()
    spans.calls.clear()
    for tokens in histories:
        (out,) = engine.generate([tokens + [rng.randrange(1, 250) for _ in range(args.turn_tokens)]], sp)
        ttft.append(out.ttft_s)
        cached += out.cached_tokens
        prompt += out.prompt_tokens
    return _result(ttft, cached, prompt, spans, engine)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--turn-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=4)
    p.add_argument("--num-blocks", type=int, default=32)
    p.add_argument("--cpu-blocks", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--disk-loses", action="store_true",
                   help="make the cost model judge every disk load slower than recomputing (as measured on "
                        "an H100 with llama-1b), so disk hits are skipped as there")
    p.add_argument("--label", default="")
    p.add_argument("--out")
    args = p.parse_args()
    rng = random.Random(args.seed)
    trace = [[[rng.randrange(1, 250) for _ in range(args.turn_tokens)] for _ in range(args.sessions)]
             for _ in range(args.turns)]
    disk_dir = Path(tempfile.mkdtemp(prefix="ultrakv-tier-overhead-"))
    results: dict = {}
    try:
        for label, tiers in (("tiers_off", {}), ("cpu", {"cpu": True}), ("cpu_disk", {"cpu": True, "disk": True})):
            spans = Spans()
            kw = {}
            engine = _engine(args, Spans())  # the bytes per block, for the CPU tier's size
            gib = args.cpu_blocks * engine._bytes_per_block() / 2**30
            engine.shutdown()
            if tiers.get("cpu"):
                kw["kv_cpu_gib"] = gib
            if tiers.get("disk"):
                kw["kv_disk_dir"] = str(disk_dir)
            engine = _engine(args, spans, **kw)
            results[label] = run_trace(engine, spans, trace, args)
            if label == "cpu_disk":
                histories = [list(engine.sessions.history(f"s{s}")) for s in range(args.sessions)]
            engine.shutdown()
        for label, kw in (("restart_with_disk", {"kv_disk_dir": str(disk_dir)}), ("restart_without_disk", {})):
            spans = Spans()
            engine = _engine(args, spans, **kw)
            results[label] = run_after_restart(engine, spans, histories, args)
            engine.shutdown()
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
    write(args.out or f"tier_overhead_cpu{'_' + args.label if args.label else ''}.json",
          {"host": machine(), "label": args.label, "model": PRESET,
           "workload": {k: getattr(args, k) for k in ("sessions", "turns", "turn_tokens", "gen_tokens",
                                                       "num_blocks", "cpu_blocks", "seed", "disk_loses")},
           "results": results})
    for label, r in results.items():
        spans = " ".join(f"{k}={v:.0f}/{r['spans_cpu_ms'][k]:.0f}" for k, v in r["spans_ms"].items())
        print(f"{label:22s} hit={r['hit_rate']:.3f} ttft p50={r['ttft_s']['p50'] * 1e3:.1f} "
              f"p99={r['ttft_s']['p99'] * 1e3:.1f} ms | spans wall/cpu ms: {spans}")


if __name__ == "__main__":
    main()
