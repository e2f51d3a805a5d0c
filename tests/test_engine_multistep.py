"""Multi-step decoding (``num_scheduler_steps`` > 1): several decode steps per scheduling
round, tokens fed forward on the device. The outputs must be exactly those of one step per
round, limits must hold to the token, nothing may leak, and streams and aborts must behave.
(The greedy-vs-transformers check with multi-step on is in test_engine_parity.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import random
from types import SimpleNamespace

import pytest
import torch
from ultrakv.node import Engine, EngineConfig, GenerateRequest, SamplingParams
from ultrakv.node.kv.block_pool import BlockPool
from ultrakv.node.scheduler import ScheduledSeq, Scheduler
from ultrakv.node.sequence import Sequence

# Greedy and seeded sampling, top-k/top-p, limits from 1 to 64 tokens.
PARAMS = [
    SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=33, temperature=0.8, seed=1, ignore_eos=True),
    SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=25, temperature=0.7, top_k=20, top_p=0.9, seed=5, ignore_eos=True),
    SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True),
]


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in lengths]


def _engine(steps: int, **kw) -> Engine:
    cfg = dict(model="tiny", device="cpu", dtype="float32", num_blocks=128, num_scheduler_steps=steps)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def single_step_outputs():
    engine = _engine(1)
    return engine.generate(_prompts(0, [3, 17, 40, 5, 90, 33]), PARAMS)


@pytest.mark.parametrize("steps", [2, 8])
def test_outputs_equal_one_step_per_round_and_nothing_leaks(steps, single_step_outputs):
    engine = _engine(steps)
    free = engine.pool.num_free
    outs = engine.generate(_prompts(0, [3, 17, 40, 5, 90, 33]), PARAMS)
    for out, ref, sp in zip(outs, single_step_outputs, PARAMS, strict=True):
        assert out.token_ids == ref.token_ids
        assert len(out.token_ids) == sp.max_tokens and out.finish_reason == "length"
    stats = engine.stats()["tokens"]
    # Same forward passes (no stop token, so nothing computed past a limit), far fewer rounds.
    assert stats["steps"] == 64
    assert stats["schedules"] < 64 // steps + 8, stats
    assert engine.pool.num_used == 0 and engine.pool.num_free == free


def test_a_backlog_behind_a_full_batch_keeps_multi_step_on(single_step_outputs):
    engine = _engine(8, max_num_seqs=2)  # six requests, two seats: four wait at first
    outs = engine.generate(_prompts(0, [3, 17, 40, 5, 90, 33]), PARAMS)
    assert [o.token_ids for o in outs] == [o.token_ids for o in single_step_outputs]
    stats = engine.stats()["tokens"]
    assert stats["schedules"] < stats["steps"] // 2, stats
    assert engine.pool.num_used == 0


def test_stop_token_mid_round_discards_the_rest():
    prompt = [[9, 9, 9]]
    free = _engine(1).generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))[0]
    stop_tok = free.token_ids[5]
    first = free.token_ids.index(stop_tok)
    engine = _engine(8)
    out = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop_tok]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[: first + 1]
    assert engine.pool.num_used == 0

    # A stop string cut mid-round gives the same text as one step per round.
    text = free.text
    needle = next((text[i : i + 2] for i in range(3, len(text) - 2) if "\ufffd" not in text[i : i + 2]), None)
    if needle is None:
        pytest.skip("generated text has no printable pair to stop on")
    sp = SamplingParams(max_tokens=24, temperature=0.0, stop=[needle], ignore_eos=True)
    out = engine.generate(prompt, sp)[0]
    assert out.finish_reason == "stop" and out.text == text[: text.index(needle)]


def test_sequences_stopping_early_in_a_round_leave_the_others_their_own_tokens():
    """Rows keep their sequence when others drop out of a round at different steps (one by a
    stop token at step 0-1, one by a stop token later), and the prefix cache they fill serves
    a later request the same tokens as a fresh engine."""
    prompts = [[9, 9, 9], [4, 8, 15, 16], [23, 42], [1, 2, 3, 4, 5]]
    free_sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    free = _engine(1).generate(prompts, [free_sp] * 4)
    stop_early, stop_later = free[0].token_ids[1], free[2].token_ids[4]
    params = [
        SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[stop_early]),
        free_sp,
        SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=[stop_later]),
        free_sp,
    ]
    engine = _engine(8)
    outs = engine.generate(prompts, params)
    assert outs[0].token_ids == free[0].token_ids[: free[0].token_ids.index(stop_early) + 1]
    assert outs[2].token_ids == free[2].token_ids[: free[2].token_ids.index(stop_later) + 1]
    assert len(outs[0].token_ids) < 8 and len(outs[2].token_ids) < 16  # they did stop mid-round
    assert outs[1].token_ids == free[1].token_ids and outs[3].token_ids == free[3].token_ids
    probe = prompts[1] + free[1].token_ids[:35]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    hit = engine.generate([probe], sp)[0]
    assert hit.cached_tokens >= 32 and hit.token_ids == _engine(1).generate([probe], sp)[0].token_ids
    assert engine.pool.num_used == 0


def test_an_abort_mid_round_leaves_the_other_streams_exact():
    engine = _engine(8)
    sp = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    ref = _engine(1).generate([[5, 6, 7], [11, 12]], [sp, sp])

    async def run():
        async def consume(prompt, leave_after=None):
            got = []
            async for d in engine.stream(GenerateRequest(prompt=prompt, sampling=sp)):
                got += d.token_ids
                if leave_after is not None and len(got) >= leave_after:
                    break  # aborts it, most likely mid-round
            return got

        return await asyncio.gather(consume([5, 6, 7]), consume([11, 12], leave_after=3), consume([30, 31, 32]))

    kept, left, other = asyncio.run(run())
    assert kept == ref[0].token_ids
    assert left == ref[1].token_ids[: len(left)]
    assert other == _engine(1).generate([[30, 31, 32]], sp)[0].token_ids
    for _ in range(2000):
        if not engine.stats()["requests"]["running"]:
            break
        asyncio.run(asyncio.sleep(0.001))
    assert engine.pool.num_used == 0
    engine.shutdown()


def test_context_limit_is_kept_to_the_token():
    engine = _engine(8, max_model_len=64)
    out = engine.generate([list(range(1, 51))], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0]
    assert out.finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.token_ids) == 64


def test_stream_deltas_add_up_and_an_abort_frees_blocks():
    engine = _engine(8)

    async def run():
        deltas = []
        sp = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        async for d in engine.stream(GenerateRequest(prompt=[5, 6, 7], sampling=sp)):
            deltas.append(d)
        got = 0
        long = GenerateRequest(prompt=[1, 2, 3], sampling=SamplingParams(max_tokens=400, ignore_eos=True))
        async for _ in engine.stream(long):
            got += 1
            if got == 2:
                break  # leaving aborts the request, mid-round or between rounds
        return deltas

    deltas = asyncio.run(run())
    final = deltas[-1].output
    assert [t for d in deltas for t in d.token_ids] == final.token_ids and len(final.token_ids) == 30
    assert final.token_ids == _engine(1).generate([[5, 6, 7]], SamplingParams(max_tokens=30, temperature=0.0,
                                                                            ignore_eos=True))[0].token_ids
    for _ in range(2000):
        if not engine.stats()["requests"]["running"]:
            break
        asyncio.run(asyncio.sleep(0.001))
    assert engine.stats()["requests"]["running"] == 0 and engine.pool.num_used == 0
    engine.shutdown()


def _decoding(pool: BlockPool, sched: Scheduler, max_tokens: int, computed: int) -> Sequence:
    seq = Sequence("r", list(range(computed)), computed, SamplingParams(max_tokens=max_tokens))
    sched.add(seq)
    out = sched.schedule()
    sched.on_step_done(out)  # prefill done: one sampled token waits to be computed
    seq.token_ids.append(1)
    return seq


def test_plan_decode_steps_respects_limits_waiting_and_free_blocks():
    pool = BlockPool(8, 4)
    sched = Scheduler(pool, block_size=4, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=30)
    seq = _decoding(pool, sched, max_tokens=5, computed=6)
    out = sched.schedule()
    assert sched.plan_decode_steps(out, 1) == 1
    # max_tokens 5 with one generated: four more tokens at most.
    assert sched.plan_decode_steps(out, 8) == 4
    assert len(seq.block_table) == 3  # KV for 6 + 4 tokens: 10 slots in 3 blocks
    sched.finish(seq, "length")

    # The context limit (30) caps it too: 26 tokens held, so 4 more at most.
    seq = _decoding(pool, sched, max_tokens=100, computed=25)
    out = sched.schedule()
    assert sched.plan_decode_steps(out, 8) == 4
    sched.finish(seq, "length")

    # Someone waiting with a seat free: one step, so the newcomer is admitted next round.
    seq = _decoding(pool, sched, max_tokens=100, computed=2)
    out = sched.schedule()
    sched.add(Sequence("w", [1, 2], 2, SamplingParams()))
    assert sched.plan_decode_steps(out, 8) == 1
    # With every seat taken it could not start before someone finishes: multi-step stays on.
    sched.max_num_seqs = 1
    assert sched.plan_decode_steps(out, 2) == 2
    sched.max_num_seqs = 4
    sched.finish(sched.waiting[0], "abort")

    # Too few free blocks for 8 more: fewer steps, never a preemption.
    taken = pool.allocate(pool.num_free - 1)
    k = sched.plan_decode_steps(out, 8)
    assert 1 < k < 8 and not out.preempted
    pool.free(taken)


def test_a_round_stops_launching_once_it_should_give_way(single_step_outputs):
    """Each step's tokens are handled as they come, so a round that should end early (here:
    half its batch aborted mid-round) stops launching steps: the device stops computing the
    aborted row within a few steps instead of carrying it to the end of the 59-step round,
    and the survivor's output is exactly that of one step per round."""
    engine = _engine(64)
    rows_per_forward: list[int] = []
    forward = engine.runner._forward

    def counting_forward(input_ids, positions, meta):
        rows_per_forward.append(input_ids.shape[0])
        return forward(input_ids, positions, meta)

    engine.runner._forward = counting_forward
    prompts = _prompts(0, [3, 17])
    params = [SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)] * 2
    reference = _engine(1).generate(prompts, params)
    survivor_tokens: list[int] = []
    survivor_len_at_abort: list[int] = []
    requests = [GenerateRequest(prompt=p, sampling=sp) for p, sp in zip(prompts, params, strict=True)]

    def survivor(delta) -> None:
        survivor_tokens.extend(delta.token_ids)
        if len(survivor_tokens) == 5:
            engine.abort(requests[1].request_id)

    done = {}

    def victim(delta) -> None:
        if delta.finished:
            done["victim"] = delta.output
            survivor_len_at_abort.append(len(survivor_tokens))

    engine.add_request(requests[0], survivor, stream_text=False)
    engine.add_request(requests[1], victim, stream_text=False)
    while engine.has_unfinished():
        engine.step()
    assert done["victim"].finish_reason == "abort"
    # The abort lands once the steps already queued have drained, not after the whole round.
    assert len(done["victim"].token_ids) <= 6 and 5 <= survivor_len_at_abort[0] <= 5 + 8
    # The prefill, then two-row steps only until the queued ones drain, then one-row steps.
    two_row_steps = rows_per_forward[1:].count(2)
    assert 4 <= two_row_steps <= 5 + 8, rows_per_forward
    assert rows_per_forward[1:].count(1) == 59 - two_row_steps
    assert survivor_tokens == reference[0].token_ids


def test_steps_per_round_default_by_device_and_limits():
    """Unset, rounds are multi-step on CUDA (tokens still stream per step) and single-step on
    CPU, where there is no device work to overlap; explicit values are bounded."""
    assert EngineConfig().num_scheduler_steps is None
    assert _engine(None).num_scheduler_steps == 1
    for bad in (0, 65):
        with pytest.raises(ValueError, match="num_scheduler_steps"):
            EngineConfig(model="tiny", num_scheduler_steps=bad)


@pytest.mark.gpu
def test_steps_per_round_default_on_cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from ultrakv.node.engine import CUDA_SCHEDULER_STEPS

    engine = Engine(EngineConfig(model="tiny", device="cuda"))
    assert engine.num_scheduler_steps == CUDA_SCHEDULER_STEPS > 1
    assert engine.stats()["num_scheduler_steps"] == CUDA_SCHEDULER_STEPS


class _LockstepGraphs:
    """What the runner sees of TensorParallelGraphs (node/parallel/tensor_parallel.py), on
    CPU and without model work: it notes each chunk the other ranks are told of, and each
    replay launched."""

    buckets = [1 << 20]
    lockstep = True

    def __init__(self) -> None:
        self.greedy = lambda hidden: hidden
        self.chunks: list[int] = []  # steps per chunk, as the workers are told
        self.replays = 0
        self.replays_told = 0
        self.contexts: list[int] = []  # each replay's context length (a worker replays the same)

    def can_run(self, meta) -> bool:
        return meta.is_decode_only

    @contextlib.contextmanager
    def greedy_round(self, input_ids, positions, meta, num_steps):
        assert not self.chunks
        yield from self._told(num_steps)

    @contextlib.contextmanager
    def more_greedy_steps(self, num_steps):
        assert self.chunks
        yield from self._told(num_steps)

    def _told(self, num_steps):
        self.chunks.append(num_steps)
        self.replays_told += num_steps
        yield
        assert self.replays == self.replays_told  # the chunk was launched whole

    def stage_decode(self, *args) -> None:
        pass

    def replay_greedy(self, rows, max_seq_len):
        assert self.replays < self.replays_told  # never launched before the others are told
        self.contexts.append(max_seq_len)
        self.replays += 1
        return torch.zeros(rows, dtype=torch.int64)


@pytest.mark.parametrize("stop_after", [1, 3, None])
def test_a_lockstep_round_goes_in_chunks_and_stops_when_told(stop_after):
    """Tensor-parallel greedy rounds: every chunk of steps is announced to the other ranks
    before it is launched whole, and ``keep_going`` is still asked between chunks (at first
    the whole round of 32 steps went out at once, and an abort or a waiting request waited
    for all of them)."""
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=64))
    graphs = engine.runner.graphs = _LockstepGraphs()
    seq = SimpleNamespace(num_computed_tokens=3, num_tokens=4, token_ids=[1, 2, 3, 4], block_table=[0, 1],
                          sampling=SimpleNamespace(temperature=0.0))
    asked = []

    def keep_going() -> bool:
        asked.append(1)
        return stop_after is None or len(asked) < stop_after

    read = list(engine.runner.decode_steps([ScheduledSeq(seq, 1)], 32, keep_going, lookahead=3))
    engine.shutdown()
    assert graphs.replays == len(read) == sum(graphs.chunks)
    assert all(chunk <= 3 for chunk in graphs.chunks)
    assert graphs.contexts == [4 + i for i in range(graphs.replays)]  # one token more each step
    if stop_after is None:
        assert graphs.replays == 32
    else:
        assert len(asked) == stop_after and graphs.replays == 3 * stop_after
