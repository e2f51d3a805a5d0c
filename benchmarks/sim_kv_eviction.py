"""Eviction policies on multi-turn traces, simulated: hit rate per (GPU pool, CPU tier) policy.

The real ``BlockPool``, ``KVTiers`` and ``HostTier`` run the trace exactly as the scheduler
drives them (prefix match in the pool, then the leading run the CPU tier holds loaded back,
the rest allocated and committed block by block, everything freed at the end of the turn);
only the model is left out and the KV caches are one float per token, so every policy pair
runs in seconds. What is measured is what a policy decides: which blocks are still cached
when a session comes back.

Two traces:

* ``round_robin``: ``bench_kv_tiers.py``'s trace (its CPU defaults): every session's turn 1,
  then every turn 2, ...; each turn adds new prompt tokens and generates some.
* ``zipf_one_shot``: sessions chosen by Zipf popularity (a few return often, most rarely),
  a conversation restarting after ``--max-turns`` turns, and a share of stateless one-shot
  requests with a prompt never seen again (one-hit wonders).

Hit rate = cached prompt tokens / prompt tokens over the turns after a session's first.
``--engine-check lru/lru,s3fifo/s3fifo`` also runs those (GPU pool / CPU tier) pairs through
the real engine (``tiny`` on CPU) on the round-robin trace with ``bench_kv_tiers.py``'s own
code, to see how far the simulation is from it.

    python benchmarks/sim_kv_eviction.py        # writes results/kv_eviction_sim.json
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from common import machine, write  # noqa: E402
from ultrakv.cluster.block_hashing import hash_token_blocks  # noqa: E402
from ultrakv.node.config import EVICTION_POLICIES  # noqa: E402
from ultrakv.node.kv.block_pool import BlockPool  # noqa: E402
from ultrakv.node.kv.host_tier import HostTier  # noqa: E402
from ultrakv.node.kv.tiers import BlockIdentity, KVTiers  # noqa: E402

BLOCK_SIZE = 16
VOCAB = 250


@dataclass
class Request:
    """One turn: the session (None: a one-shot request) and its new prompt tokens."""

    session: str | None
    new_tokens: list[int]
    first_turn: bool


@dataclass
class Tally:
    cached_tokens: int = 0
    prompt_tokens: int = 0
    gpu_blocks: int = 0
    cpu_blocks: int = 0
    histories: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        rate = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        return {"hit_rate": round(rate, 4), "cached_tokens": self.cached_tokens,
                "prompt_tokens": self.prompt_tokens, "gpu_hit_blocks": self.gpu_blocks,
                "cpu_hit_blocks": self.cpu_blocks}


def round_robin(args: argparse.Namespace) -> list[Request]:
    rng = random.Random(args.seed)  # the same prompts as bench_kv_tiers.py's trace
    turns = [[[rng.randrange(1, VOCAB) for _ in range(args.turn_tokens)]
              for _ in range(args.sessions)] for _ in range(args.turns)]
    return [Request(f"s{s}", tokens, turn == 0)
            for turn, prompts in enumerate(turns) for s, tokens in enumerate(prompts)]


def zipf_one_shot(args: argparse.Namespace) -> list[Request]:
    rng = random.Random(args.seed)
    weights = [1.0 / (rank + 1) ** args.zipf for rank in range(args.zipf_sessions)]
    turns_of: dict[int, int] = {}
    generation: dict[int, int] = {}
    out = []
    for _ in range(args.requests):
        tokens = [rng.randrange(1, VOCAB) for _ in range(args.turn_tokens)]
        if rng.random() < args.one_shot:
            out.append(Request(None, [rng.randrange(1, VOCAB) for _ in range(args.turn_tokens)], True))
            continue
        s = rng.choices(range(args.zipf_sessions), weights)[0]
        turn = turns_of.get(s, 0)
        if turn == args.max_turns:  # the conversation ends; the user starts a new one
            generation[s] = generation.get(s, 0) + 1
            turn = 0
        turns_of[s] = turn + 1
        out.append(Request(f"z{s}.{generation.get(s, 0)}", tokens, turn == 0))
    return out


def run(trace: list[Request], gpu_policy: str, cpu_policy: str | None,
        args: argparse.Namespace) -> Tally:
    """The trace through a pool under ``gpu_policy`` and a CPU tier under ``cpu_policy``
    (None: no CPU tier)."""
    pool = BlockPool(args.num_blocks, BLOCK_SIZE, gpu_policy)
    tiers = None
    if cpu_policy is not None:
        caches = [torch.zeros(2, args.num_blocks, BLOCK_SIZE, 1, 1)]
        host = HostTier(args.cpu_blocks, KVTiers.block_shape(caches), torch.float32, cpu_policy)
        tiers = KVTiers(caches, BlockIdentity("sim", "auto", BLOCK_SIZE), host, None)
        pool.on_evict, pool.on_commit = tiers.on_evict, tiers.on_commit
    rng = random.Random(args.seed + 1)
    tally = Tally()
    for req in trace:
        history = tally.histories.get(req.session, []) if req.session else []
        tokens = history + req.new_tokens
        hashes = hash_token_blocks(tokens[:-1], BLOCK_SIZE)  # the last token is always computed
        blocks = pool.match_prefix(hashes)
        gpu = len(blocks)
        n = min(tiers.available(hashes[gpu:]), pool.num_free) if tiers is not None else 0
        if n:
            fresh = pool.allocate(n)
            loaded = tiers.load(hashes[gpu:gpu + n], fresh)
            for block, h in zip(fresh[:loaded], hashes[gpu:], strict=False):
                pool.commit(block, h)
            pool.free(fresh[loaded:])
            blocks += fresh[:loaded]
        if not req.first_turn:
            tally.cached_tokens += len(blocks) * BLOCK_SIZE
            tally.prompt_tokens += len(tokens)
            tally.gpu_blocks += gpu
            tally.cpu_blocks += len(blocks) - gpu
        full = tokens + [rng.randrange(1, VOCAB) for _ in range(args.gen_tokens)]
        needed = -(-len(full) // BLOCK_SIZE) - len(blocks)
        blocks += pool.allocate(needed)
        if tiers is not None:
            tiers.flush()  # the engine flushes before its model step writes into the caches
        for block, h in list(zip(blocks, hash_token_blocks(full, BLOCK_SIZE), strict=False)):
            pool.commit(block, h)
        pool.free(blocks)
        if req.session:
            tally.histories[req.session] = full
    return tally


def engine_check(gpu_policy: str, cpu_policy: str, args: argparse.Namespace) -> dict:
    """The round-robin trace through the real engine with these policies, measured as
    ``bench_kv_tiers.py`` measures its CPU-tier run."""
    import bench_kv_tiers as bench

    bench_args = argparse.Namespace(preset="tiny", device="cpu", num_blocks=args.num_blocks,
                                    sessions=args.sessions, turns=args.turns,
                                    turn_tokens=args.turn_tokens, gen_tokens=args.gen_tokens,
                                    seed=args.seed)
    probe = bench._engine(bench_args)
    cpu_gib = bench._tier_gib(probe._bytes_per_block(), args.cpu_blocks)
    probe.shutdown()
    engine = bench._engine(bench_args, eviction_policy=gpu_policy, kv_cpu_gib=cpu_gib,
                           kv_cpu_eviction_policy=cpu_policy)
    try:
        out = bench.run_trace(engine, bench._trace(bench_args), bench_args)
    finally:
        engine.shutdown()
    return {"hit_rate": round(out["hit_rate"], 4), "cached_tokens": out["cached_tokens"],
            "prompt_tokens": out["prompt_tokens"], "tier_hits": out["tier_hits"],
            "ttft_p50_s": out["ttft_s"]["p50"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # bench_kv_tiers.py's CPU defaults
    p.add_argument("--sessions", type=int, default=24)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--turn-tokens", type=int, default=64)
    p.add_argument("--gen-tokens", type=int, default=8)
    p.add_argument("--num-blocks", type=int, default=96)
    p.add_argument("--cpu-blocks", type=int, default=192)
    # the Zipf trace
    p.add_argument("--zipf-sessions", type=int, default=200)
    p.add_argument("--zipf", type=float, default=1.0, help="popularity exponent")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--max-turns", type=int, default=8)
    p.add_argument("--one-shot", type=float, default=0.3, help="share of one-shot requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine-check", default="", metavar="GPU/CPU,...",
                   help="policy pairs to run through the real engine too")
    p.add_argument("--out", default="kv_eviction_sim.json")
    args = p.parse_args()
    traces = {"round_robin": round_robin(args), "zipf_one_shot": zipf_one_shot(args)}
    results: dict = {}
    for label, trace in traces.items():
        results[label] = {}
        for gpu in EVICTION_POLICIES:
            for cpu in EVICTION_POLICIES:
                results[label][f"gpu={gpu},cpu={cpu}"] = run(trace, gpu, cpu, args).to_dict()
        # the pool alone (tiers off): what the GPU policy does by itself
        for gpu in EVICTION_POLICIES:
            results[label][f"gpu={gpu},cpu=off"] = run(trace, gpu, None, args).to_dict()
    if args.engine_check:
        results["engine_round_robin"] = {
            f"gpu={gpu},cpu={cpu}": engine_check(gpu, cpu, args)
            for gpu, cpu in (pair.split("/") for pair in args.engine_check.split(","))}
    write(args.out, {"host": machine(), "workload": vars(args), "results": results})
    for label, rows in results.items():
        if label == "engine_round_robin":
            for pair, r in rows.items():
                print(f"engine, round robin, {pair}: hit rate {r['hit_rate']:.3f}")
            continue
        print(f"{label}: hit rate, rows GPU pool policy, columns CPU tier policy")
        print(f"{'':8s}" + "".join(f"{c:>8s}" for c in (*EVICTION_POLICIES, "off")))
        for gpu in EVICTION_POLICIES:
            print(f"{gpu:8s}" + "".join(f"{rows[f'gpu={gpu},cpu={c}']['hit_rate']:8.3f}"
                                         for c in (*EVICTION_POLICIES, "off")))


if __name__ == "__main__":
    main()
