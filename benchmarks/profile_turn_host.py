"""The host side of a returning session's time to first token, span by span.

A conversation runs as in bench_gpu.py's multi-turn test (turns of 200 new tokens, 100
generated each); on its last turn the first step (the prefill that yields the first token) is
timed piece by piece with ``time.perf_counter_ns`` around the engine's own methods:
tokenizing, admission, scheduling (block hashing and the prefix match within it), building
the step's inputs (``prepare``, or the prefill graph's staging), the forward, sampling and
reading the token, and the bookkeeping before the token is stamped. On CPU the forward is the
model itself; everything else is the fixed cost a GPU pays on top of its kernels. Medians over
``--sessions`` conversations.

    python benchmarks/profile_turn_host.py [--model tiny] [--sessions 12] [--staged] [--loop] [--label after]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import write  # noqa: E402
from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402
from ultrakv.node.cuda_graphs import (  # noqa: E402
    PREFILL_TOKEN_BUCKETS,
    PrefillGraphInputs,
    context_buckets,
    prefill_shape,
)
from ultrakv.node.outputs import GenerateRequest, StreamDelta  # noqa: E402
from ultrakv.node.scheduler import ScheduledSeq  # noqa: E402
from ultrakv.node.sequence import Sequence  # noqa: E402


class Spans:
    """Nanoseconds spent in wrapped methods while ``on``, summed per label."""

    def __init__(self) -> None:
        self.on = False
        self.ns: dict[str, int] = {}
        self.first_start: dict[str, int] = {}  # perf_counter_ns when a label was first entered
        self.last_end: dict[str, int] = {}  # perf_counter_ns when a label was last left

    def wrap(self, obj: object, name: str, label: str) -> None:
        if not hasattr(obj, name):
            return  # not in this version of the code
        fn = getattr(obj, name)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not self.on:
                return fn(*args, **kwargs)
            t0 = time.perf_counter_ns()
            self.first_start.setdefault(label, t0)
            try:
                return fn(*args, **kwargs)
            finally:
                t1 = self.last_end[label] = time.perf_counter_ns()
                self.ns[label] = self.ns.get(label, 0) + t1 - t0

        setattr(obj, name, timed)


class StagedPrefill:
    """The prefill graphs' host path on a CPU (``--staged``): a step that is one sequence's
    short prefill is staged into :class:`PrefillGraphInputs` and sent as on a GPU, and the
    model then runs eagerly on the staged, padded inputs (a graph replays that forward). The
    host spans are then those of a GPU's lone-prefill path, not of the general batch builder
    a CPU engine uses."""

    lockstep = False  # as CudaGraphRunner on one GPU: no ranks to keep in step

    def __init__(self, engine: Engine):
        self.prefill_sizes = list(PREFILL_TOKEN_BUCKETS)
        self.buckets = context_buckets(engine.max_model_len)
        self.prefill_inputs = PrefillGraphInputs(self.prefill_sizes[-1], engine.runner._max_blocks,
                                                 engine.config.block_size, engine.device)
        self.model, self.kv_caches = engine.model, engine.kv_caches
        self.qsl = {t: torch.tensor([0, t], dtype=torch.int32) for t in self.prefill_sizes}

    def prefill_shape(self, start: int, num_new: int):
        return prefill_shape(start, num_new, self.prefill_sizes, self.buckets)

    def can_run(self, meta) -> bool:
        return False  # everything else runs eagerly, as a CPU engine does

    def run_prefill(self, shape, token_ids: list[int], start: int, block_table: list[int]) -> torch.Tensor:
        inputs = self.prefill_inputs
        inputs.send(inputs.stage(token_ids, start, block_table, shape.tokens))
        return self.replay(shape)[: len(token_ids)]

    def replay(self, shape) -> torch.Tensor:
        inputs = self.prefill_inputs
        meta = inputs.meta(shape.tokens, shape.context, self.qsl[shape.tokens])
        return self.model(inputs.input_ids[: shape.tokens], inputs.positions[: shape.tokens], self.kv_caches, meta)


def instrument(engine: Engine, spans: Spans) -> None:
    sched, runner = engine.scheduler, engine.runner
    spans.wrap(engine, "_prompt_for", "tokenize")
    spans.wrap(engine, "add_request", "add_request")
    spans.wrap(sched, "schedule", "schedule")
    spans.wrap(sched, "block_hashes_of", "block_hashing")
    spans.wrap(sched, "_hashes_to_first_miss", "block_hashing")
    spans.wrap(sched, "reserve", "reserve_blocks")
    spans.wrap(engine.pool, "match_prefix", "prefix_match")
    spans.wrap(runner, "execute", "execute")
    spans.wrap(runner, "prepare", "prepare")
    spans.wrap(runner, "_forward", "forward")
    if isinstance(runner.graphs, StagedPrefill):  # the forward is the model alone
        spans.wrap(runner.graphs, "replay", "forward")
        spans.wrap(runner.graphs.prefill_inputs, "stage", "stage")
        spans.wrap(runner.graphs.prefill_inputs, "send", "send")
    elif runner.graphs is not None:
        spans.wrap(runner.graphs, "run_prefill", "forward")
        spans.wrap(runner.graphs.prefill_inputs, "stage", "stage")
        spans.wrap(runner.graphs.prefill_inputs, "send", "send")
        spans.wrap(torch.cuda.CUDAGraph, "replay", "graph_replay")  # the launch the device waits for
    spans.wrap(runner, "_sample", "sample")
    spans.wrap(sched, "on_step_done", "commit_blocks")
    spans.wrap(sched, "hash_ahead", "hash_ahead")
    spans.wrap(engine, "_after_step", "after_step")
    spans.wrap(engine, "_detokenize", "detokenize")
    spans.wrap(engine, "_emit", "emit")
    spans.wrap(engine, "step", "step")


def measure_turn(engine: Engine, spans: Spans, sid: str, prompt: list[int]) -> dict:
    """The first step of one turn, spans on; the turn is then run to its end."""
    request = GenerateRequest(prompt=prompt, sampling=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                              session_id=sid)
    spans.ns, spans.first_start, spans.last_end = {}, {}, {}
    delivered: list[int] = []  # when the listener got the first token (as a server's stream would)

    def listener(delta: StreamDelta) -> None:
        if delta.token_ids and not delivered:
            delivered.append(time.perf_counter_ns())

    spans.on = True
    t0, t0_mono = time.perf_counter_ns(), time.monotonic()
    seq = engine.add_request(request, listener)
    engine.step()
    spans.on = False
    ttft_ns = (seq.first_token_time - seq.arrival_time) * 1e9
    total_ns = time.perf_counter_ns() - t0
    step = (list(seq.token_ids), seq.num_cached_tokens, list(seq.block_table))
    while engine.has_unfinished():
        engine.step()
    ns = dict(spans.ns)
    ns["step"] = step
    ns["ttft"] = ttft_ns
    ns["add_to_token"] = total_ns
    # From add_request to the forward's launch: the host work ahead of the device's.
    ns["add_to_forward"] = spans.first_start.get("forward", t0) - t0
    # From the forward's end (on a GPU: its launch returning) to the token in the listener's
    # hands: sampling, reading the token, the step's bookkeeping, the delta.
    ns["forward_to_delivered"] = delivered[0] - spans.last_end.get("forward", t0)
    ns["add_to_delivered"] = delivered[0] - t0
    # What a GPU's TTFT pays on the host (the rest overlaps its kernels): from the arrival
    # stamp to the forward's launch, and from the step's token read (the end of execute,
    # where a GPU waits for the device) to the token delivered.
    arrival = t0 + (seq.arrival_time - t0_mono) * 1e9
    launch = spans.first_start.get("graph_replay", spans.first_start.get("forward", t0))
    ns["arrival_to_forward"] = launch - arrival
    ns["token_read_to_delivered"] = delivered[0] - spans.last_end.get("execute", t0)
    ns["host_critical"] = ns["arrival_to_forward"] + ns["token_read_to_delivered"]
    ns["cached_tokens"] = seq.num_cached_tokens
    ns["prompt_tokens"] = seq.num_prompt_tokens
    return ns


async def loop_turn(engine: Engine, spans: Spans, sid: str, prompt: list[int]) -> dict:
    """One turn as a server runs it (``--loop``): handed to the engine thread from this event
    loop (``stream_to``), its deltas handed back through the loop's mailbox. Nanoseconds: the
    call itself (validation and admission), the engine thread's wake-up for it, and the first
    token's trip from the engine thread's ``_emit`` to this loop's callback."""
    loop = asyncio.get_running_loop()
    first: asyncio.Future[int] = loop.create_future()
    done: asyncio.Future[None] = loop.create_future()

    def on_delta(delta: StreamDelta) -> None:
        if delta.token_ids and not first.done():
            first.set_result(time.perf_counter_ns())
        if delta.finished and not done.done():
            done.set_result(None)

    request = GenerateRequest(prompt=prompt, sampling=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
                              session_id=sid)
    spans.ns, spans.first_start, spans.last_end = {}, {}, {}
    spans.on = True
    t0 = time.perf_counter_ns()
    engine.stream_to(request, on_delta)
    t1 = time.perf_counter_ns()
    delivered = await first
    spans.on = False
    await done
    return {
        "stream_to_call": t1 - t0,
        "engine_wake": spans.first_start["step"] - t1,
        "emit_to_loop": delivered - spans.first_start["emit"],
        "stream_to_first_token": delivered - t0,
    }


def input_building_us(engine: Engine, step: tuple[list[int], int, list[int]], iters: int = 2000) -> dict:
    """Median cost of building one turn's step inputs: the runner's general path
    (``prepare``: flat tensors and metadata for any batch) and the prefill graph's (staging
    into the graph's pinned buffer padded to the bucket, and the copy to the device buffer)."""
    tokens, start, table = step
    seq = Sequence("bench", tokens, len(tokens), SamplingParams(max_tokens=1))
    seq.num_computed_tokens, seq.block_table = start, table
    items = [ScheduledSeq(seq, len(tokens) - start)]
    runner = engine.runner
    inputs = PrefillGraphInputs(PREFILL_TOKEN_BUCKETS[-1], runner._max_blocks, engine.config.block_size, engine.device)
    shape = prefill_shape(start, len(tokens) - start, list(PREFILL_TOKEN_BUCKETS),
                          context_buckets(engine.max_model_len))

    def timed(fn) -> float:
        out = []
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            fn()
            out.append(time.perf_counter_ns() - t0)
        return round(statistics.median(out) / 1e3, 1)

    return {
        "prepare": timed(lambda: runner.prepare(items)),
        "graph_stage_and_send": timed(lambda: inputs.send(inputs.stage(tokens[start:], start, table, shape.tokens))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--sessions", type=int, default=12)
    ap.add_argument("--label", default="", help="suffix of the results file (e.g. before / after)")
    ap.add_argument("--staged", action="store_true",
                    help="on CPU, run lone short prefills through the prefill graphs' staging (see StagedPrefill)")
    ap.add_argument("--loop", action="store_true",
                    help="then the same turns handed over from an event loop to the engine thread (see loop_turn)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a 2-core shared machine: one thread times steadier
    engine = Engine(EngineConfig(model=args.model, device=args.device, max_num_seqs=256, max_num_batched_tokens=8192,
                                 max_model_len=4096, num_blocks=4096 if args.device == "cpu" else None))
    engine.warmup()
    if args.staged and args.device == "cpu":
        engine.runner.graphs = StagedPrefill(engine)
        engine.scheduler.graph_prefill_tokens = engine.runner.graphs.prefill_sizes[-1]
    spans = Spans()
    instrument(engine, spans)
    rng = random.Random(0)
    toks = lambda n: [rng.randrange(1, 256) for _ in range(n)]  # noqa: E731
    reply = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    runs = []
    for s in range(args.sessions):
        sid = f"s{s}"
        for _ in range(args.turns - 1):
            engine.generate([toks(200)], reply, session_ids=[sid])
        runs.append(measure_turn(engine, spans, sid, toks(200)))
    keys = sorted({k for r in runs for k in r} - {"cached_tokens", "prompt_tokens", "step"})
    med_us = {k: round(statistics.median(r.get(k, 0) for r in runs) / 1e3, 1) for k in keys}
    if args.device == "cpu":  # the forward runs synchronously: the rest of the TTFT is host work
        med_us["host_in_ttft"] = round(statistics.median(
            (r["ttft"] - r.get("forward", 0)) for r in runs) / 1e3, 1)
        med_us["host_to_delivered"] = round(statistics.median(
            (r["add_to_delivered"] - r.get("forward", 0)) for r in runs) / 1e3, 1)
    if args.loop:  # the engine thread steps from here on; generate() waits for it
        engine.start_background_loop()
        hops = []
        for s in range(args.sessions):
            sid = f"loop{s}"
            for _ in range(args.turns - 1):
                engine.generate([toks(200)], reply, session_ids=[sid])
            hops.append(asyncio.run(loop_turn(engine, spans, sid, toks(200))))
        for k in hops[0]:
            med_us[f"loop.{k}"] = round(statistics.median(h[k] for h in hops) / 1e3, 1)
        engine.shutdown()
    building = input_building_us(engine, runs[-1]["step"])
    print(f"turn {args.turns}: cached {runs[-1]['cached_tokens']} of {runs[-1]['prompt_tokens']} tokens")
    for k, v in {**med_us, **{f"inputs.{k}": v for k, v in building.items()}}.items():
        print(f"  {k:22s} {v:10.1f} us")
    gpu = torch.cuda.get_device_name(0).replace(" ", "_") if args.device.startswith("cuda") else "cpu"
    write(f"turn_host_{gpu}_{args.model}{'_' + args.label if args.label else ''}.json", {
        "model": args.model,
        "device": args.device,
        "turn": args.turns,
        "new_tokens_per_turn": 200,
        "generated_per_turn": 100,
        "sessions": args.sessions,
        "staged": args.staged,
        "loop": args.loop,
        "cached_tokens": runs[-1]["cached_tokens"],
        "prompt_tokens": runs[-1]["prompt_tokens"],
        "median_us": med_us,
        "step_inputs_us": building,
        "notes": "spans of the first step of the last turn; 'forward' is the model (on a GPU: the launch, or "
                 "the graph's staging and replay); add_to_forward: from add_request to the forward's start; "
                 "host_in_ttft (CPU only) = TTFT - forward; forward_to_delivered: from the forward's end to the "
                 "token in a listener's hands (host_to_delivered, CPU only: add_request to that, less the forward); "
                 "hash_ahead runs while a GPU computes the step; host_critical = arrival_to_forward (arrival stamp "
                 "to the forward's start; on CUDA to the prefill graph's replay) + token_read_to_delivered (end of "
                 "execute, where a GPU waits for the token, to the listener): the host time a GPU's TTFT pays, "
                 "the rest overlapping its kernels; staged: on CPU the lone prefill goes through the prefill "
                 "graphs' staging (StagedPrefill) as on a GPU; tokenize is called twice per request (validation, "
                 "then admission) and runs before the arrival stamp; loop.* (--loop): the same turns handed "
                 "over from an asyncio loop (stream_to) to the engine thread: the call, the engine thread's "
                 "wake-up after it, the first token from the engine's emit to the loop's callback, and in all",
    })


if __name__ == "__main__":
    main()
