"""KV tiers benchmark: a multi-turn trace with more sessions than the block pool holds.

Sessions take turns round robin (every session's turn 1, then every turn 2, ...); each turn
adds ``--turn-tokens`` new prompt tokens to the session's history and generates
``--gen-tokens``. The pool holds a fraction of the sessions, so with tiers off a returning
session finds its history evicted and prefills it again. Measured for tiers off, a CPU tier
(``--cpu-blocks``, smaller than the working set), a CPU tier that holds every session
(``cpu_fits``: the tier as a host would size it, several times the GPU pool) and CPU + disk:
prefix hit rate (cached / prompt tokens of the turns after the first) and TTFT p50/p99.
``cpu_fits_layerwise`` is ``cpu_fits`` with layer-wise loads (EngineConfig.kv_tier_layerwise:
in a prefill that runs eagerly, each layer group's copies overlap the earlier layers'
compute; turns that a prefill graph takes load whole), the A/B of that switch: with
``--turn-tokens 2048`` the turns run eagerly (docs/kv-tiers.md).

Round robin is the worst case for a tier smaller than the working set: under LRU each
session's blocks are evicted just before it returns, so the small CPU tier hits only while
the histories still fit (turn 2) and the disk tier has to catch the rest.

Then a restart: the CPU+disk engine shuts down (its blocks persist to disk) and a new engine
starts on the same directory; every session's next turn arrives as its whole history plus
the new tokens (what a node restored from a history-only checkpoint sees). TTFT is measured
with the disk tier and without it, on two engines running side by side that take each turn
in alternation (which goes first alternates too), so a machine whose load drifts, as a shared
one's does, weighs on both alike.

TTFT is also given apart for the turns that found some of their history cached (``ttft_hit_s``)
and those that found none (``ttft_miss_s``): a tier's own cost on the critical path (offloads)
shows in the latter, what its loads save in the former.

``--configs`` runs a subset (``restart`` needs ``cpu_disk``); ``--torch-profile CONFIG``
records the last ``PROFILE_TURNS`` turns of that configuration with torch.profiler (CPU and
CUDA) into ``kv_tiers_<CONFIG>_torch_trace.json`` (a Chrome/Perfetto trace) and
``kv_tiers_<CONFIG>_torch_ops.txt`` (ops by self CPU time and by device time) next to the
results.

    python benchmarks/bench_kv_tiers.py                                  # CPU, tiny
    python benchmarks/bench_kv_tiers.py --device cuda --preset llama-1b  # GPU
    python benchmarks/bench_kv_tiers.py --device cuda --preset llama-1b --configs tiers_off cpu \
        --torch-profile cpu                                              # where a CPU-tier turn goes
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import machine, summary, write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402

CONFIGS = ("tiers_off", "cpu", "cpu_fits", "cpu_fits_layerwise", "cpu_disk", "restart")
TRACES = CONFIGS[:-1]  # the configurations that run the trace (restart runs after cpu_disk)
PROFILE_TURNS = 4  # turns recorded by --torch-profile (a llama-1b turn is ~10k trace events)
DEFAULTS = {  # per device: sessions, turns, turn tokens, generated tokens, pool blocks, CPU tier blocks
    "cpu": dict(sessions=24, turns=4, turn_tokens=64, gen_tokens=8, num_blocks=96, cpu_blocks=192),
    "cuda": dict(sessions=64, turns=4, turn_tokens=512, gen_tokens=32, num_blocks=1024, cpu_blocks=4096),
}


def _engine(args: argparse.Namespace, **tiers) -> Engine:
    engine = Engine(EngineConfig(model=args.preset, device=args.device, num_blocks=args.num_blocks,
                                 block_size=16, max_num_seqs=16, **tiers))
    engine.warmup()  # CUDA graphs and kernels compiled before any TTFT is taken (CPU: nothing)
    return engine


def _tier_gib(engine_bytes_per_block: int, blocks: int) -> float:
    return blocks * engine_bytes_per_block / 2**30


def _working_set_blocks(args: argparse.Namespace) -> int:
    """Blocks of every session's history at the end of the trace, plus a quarter."""
    per_session = args.turns * (args.turn_tokens + args.gen_tokens) // 16 + 1
    return per_session * args.sessions * 5 // 4


def _trace(args: argparse.Namespace) -> list[list[list[int]]]:
    """Per turn, per session: the new prompt tokens."""
    rng = random.Random(args.seed)
    vocab = 250 if args.preset == "tiny" else 32000
    return [[[rng.randrange(1, vocab) for _ in range(args.turn_tokens)] for _ in range(args.sessions)]
            for _ in range(args.turns)]


def _torch_profile(label: str, args: argparse.Namespace):
    """A torch.profiler context for the turns of configuration ``label`` (nothing unless
    --torch-profile names it); writes its trace and op tables on exit."""
    if args.torch_profile != label:
        return contextlib.nullcontext()
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])

    @contextlib.contextmanager
    def recording():
        with profile(activities=activities) as prof:
            yield
        out_dir = Path(os.environ.get("ULTRAKV_RESULTS_DIR", Path(__file__).parent / "results"))
        prof.export_chrome_trace(str(out_dir / f"kv_tiers_{label}_torch_trace.json"))
        ops = prof.key_averages()
        device = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        (out_dir / f"kv_tiers_{label}_torch_ops.txt").write_text(
            f"{PROFILE_TURNS} returning turns of '{label}', by self CPU time:\n"
            + ops.table(sort_by="self_cpu_time_total", row_limit=40)
            + "\nby self device time:\n" + ops.table(sort_by=device, row_limit=40))
        print(f"wrote {out_dir}/kv_tiers_{label}_torch_trace.json and _torch_ops.txt")

    return recording()


def run_trace(engine: Engine, trace: list[list[list[int]]], args: argparse.Namespace, label: str = "") -> dict:
    sp = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)
    ttft, cached, prompt = [], 0, 0
    hit, miss = [], []  # TTFT of the turns that found some of their history cached, or none
    t0 = time.perf_counter()
    profiled = len(trace) * len(trace[0]) - PROFILE_TURNS  # the last turns are recorded
    n = 0
    with contextlib.ExitStack() as recording:
        for turn, prompts in enumerate(trace):
            for s, tokens in enumerate(prompts):
                if n == profiled:
                    recording.enter_context(_torch_profile(label, args))
                n += 1
                (out,) = engine.generate([tokens], sp, session_ids=[f"s{s}"])
                if turn:  # the first turn of a session has nothing to find
                    ttft.append(out.ttft_s)
                    (hit if out.cached_tokens else miss).append(out.ttft_s)
                    cached += out.cached_tokens
                    prompt += out.prompt_tokens
    stats = engine.stats()
    return {"wall_s": time.perf_counter() - t0, "hit_rate": cached / prompt if prompt else 0.0,
            "cached_tokens": cached, "prompt_tokens": prompt, "ttft_s": summary(ttft),
            "ttft_hit_s": summary(hit) if hit else None, "ttft_miss_s": summary(miss) if miss else None,
            "tier_hits": {t: v["hits"] for t, v in stats["kv_tiers"].items() if isinstance(v, dict) and "hits" in v},
            "preemptions": stats["requests"]["preemptions"], **_cost(stats)}


def _cost(stats: dict) -> dict:
    """The tiers' load-or-recompute figures: hit blocks recomputed (``skipped``) and the
    cost model's estimates at the end (node/kv/tier_cost.py); disk writes dropped."""
    tiers = stats["kv_tiers"]
    out = {"skipped_blocks": tiers["skipped"], "cost": tiers["cost"]} if "cost" in tiers else {}
    if "disk" in tiers:  # blocks the bounded write queue dropped: future misses
        out["disk_dropped_writes"] = tiers["disk"]["dropped"]
    return out


def run_after_restart(engines: dict[str, Engine], histories: dict[str, list[int]],
                      args: argparse.Namespace) -> dict[str, dict]:
    """Each session's next turn on every engine of ``engines``, in alternation."""
    sp = SamplingParams(max_tokens=args.gen_tokens, temperature=0.0, ignore_eos=True)
    rng = random.Random(args.seed + 1)
    ttft: dict[str, list[float]] = {label: [] for label in engines}
    cached = dict.fromkeys(engines, 0)
    prompt = dict.fromkeys(engines, 0)
    order = list(engines)
    for tokens in histories.values():
        new = [rng.randrange(1, 250) for _ in range(args.turn_tokens)]
        for label in order:
            (out,) = engines[label].generate([tokens + new], sp)
            ttft[label].append(out.ttft_s)
            cached[label] += out.cached_tokens
            prompt[label] += out.prompt_tokens
        order.reverse()
    return {label: {"hit_rate": cached[label] / prompt[label] if prompt[label] else 0.0,
                    "cached_tokens": cached[label], "prompt_tokens": prompt[label],
                    "ttft_s": summary(ttft[label]), **_cost(engine.stats())}
            for label, engine in engines.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="tiny", help="tiny (CPU) or llama-1b (GPU)")
    for name in DEFAULTS["cpu"]:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default: {DEFAULTS['cpu'][name]} "
                       f"on CPU, {DEFAULTS['cuda'][name]} on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                   help="the configurations to run (restart needs cpu_disk)")
    p.add_argument("--torch-profile", choices=TRACES, help="record this configuration's last turns "
                   "with torch.profiler")
    p.add_argument("--out", help="result file name under benchmarks/results/")
    args = p.parse_args()
    if "restart" in args.configs and "cpu_disk" not in args.configs:
        p.error("--configs restart needs cpu_disk (the restart reads what it wrote)")
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    trace = _trace(args)
    disk_dir = Path(tempfile.mkdtemp(prefix="ultrakv-kv-tier-"))
    results: dict = {}
    try:
        probe = Engine(EngineConfig(model=args.preset, device=args.device, num_blocks=args.num_blocks, block_size=16))
        bytes_per_block = probe._bytes_per_block()  # what a tier of N blocks takes
        probe.shutdown()
        del probe
        cpu_gib = _tier_gib(bytes_per_block, args.cpu_blocks)
        tiers = {"tiers_off": {}, "cpu": {"kv_cpu_gib": cpu_gib},
                 "cpu_fits": {"kv_cpu_gib": _tier_gib(bytes_per_block, _working_set_blocks(args))},
                 "cpu_fits_layerwise": {"kv_cpu_gib": _tier_gib(bytes_per_block, _working_set_blocks(args)),
                                        "kv_tier_layerwise": True},
                 "cpu_disk": {"kv_cpu_gib": cpu_gib, "kv_disk_dir": str(disk_dir)}}
        for label in (c for c in TRACES if c in args.configs):
            engine = _engine(args, **tiers[label])
            results[label] = run_trace(engine, trace, args, label)
            if label == "cpu_disk" and "restart" in args.configs:
                histories = {sid: list(engine.sessions.history(sid)) for sid in (f"s{s}" for s in range(args.sessions))}
            t0 = time.perf_counter()
            engine.shutdown()  # write-back: the GPU and CPU tiers' blocks go to disk now
            persist_s = time.perf_counter() - t0
        if "restart" in args.configs:
            restarted = {"restart_with_disk": _engine(args, kv_disk_dir=str(disk_dir)),
                         "restart_without_disk": _engine(args)}
            results.update(run_after_restart(restarted, histories, args))
            results["restart_with_disk"]["shutdown_persist_s"] = persist_s
            for engine in restarted.values():
                engine.shutdown()
    finally:
        shutil.rmtree(disk_dir, ignore_errors=True)
    name = args.out or f"kv_tiers_{args.device}_{args.preset}.json"
    write(name, {"host": machine(), "workload": {k: getattr(args, k) for k in (*DEFAULTS["cpu"], "seed")}
                 | {"device": args.device, "preset": args.preset, "bytes_per_block": bytes_per_block},
                 "results": results})
    for label, r in results.items():
        print(f"{label:22s} hit_rate={r['hit_rate']:.3f} ttft p50={r['ttft_s']['p50'] * 1e3:.1f} ms "
              f"p99={r['ttft_s']['p99'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
