"""The scheduler alone (pure logic, a fake clock, a real BlockPool): budgets, chunking,
priorities with aging, and preemption."""

from __future__ import annotations

from ultrakv.node.kv.block_pool import BlockPool
from ultrakv.node.sampling_params import Priority, SamplingParams
from ultrakv.node.scheduler import Scheduler
from ultrakv.node.sequence import Sequence, SequenceStatus


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(num_blocks=64, budget=64, max_seqs=8, chunked=True, aging=5.0):
    clock = Clock()
    pool = BlockPool(num_blocks, 4)
    sched = Scheduler(
        pool,
        block_size=4,
        max_num_seqs=max_seqs,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
        aging_s=aging,
        clock=clock,
    )
    return sched, pool, clock


def seq(name, n, clock, priority=Priority.NORMAL):
    return Sequence(
        request_id=name,
        token_ids=list(range(1, n + 1)),
        num_prompt_tokens=n,
        sampling=SamplingParams(max_tokens=100),
        priority=priority,
        arrival_time=clock(),
    )


def run_step(sched):
    """Schedule, pretend the model ran, and sample token 7 where a chunk reached the end."""
    out = sched.schedule()
    sampling = [item.seq for item in out.scheduled if item.samples]
    sched.on_step_done(out)
    for s in sampling:
        s.token_ids.append(7)
    return out


def test_token_budget_chunks_long_prompts():
    sched, _, clock = make(budget=10)
    long, short = seq("long", 25, clock), seq("short", 3, clock)
    sched.add(long)
    sched.add(short)
    out = run_step(sched)
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("long", 10)]
    out = run_step(sched)
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("long", 10)]
    out = run_step(sched)  # the last 5 of "long" sample; "short" fits in the rest
    assert [(i.seq.request_id, i.num_new_tokens, i.samples) for i in out.scheduled] == [
        ("long", 5, True),
        ("short", 3, True),
    ]
    out = run_step(sched)  # both decode one token each
    assert [i.num_new_tokens for i in out.scheduled] == [1, 1]


def test_without_chunking_a_prompt_waits_for_a_whole_budget():
    sched, _, clock = make(budget=10, chunked=False)
    sched.add(seq("big", 8, clock))
    sched.add(seq("next", 5, clock))
    out = run_step(sched)
    assert [i.seq.request_id for i in out.scheduled] == ["big"]


def test_priority_order_and_aging():
    sched, _, clock = make(budget=4, max_seqs=1)
    low = seq("low", 4, clock, Priority.LOW)
    sched.add(low)
    clock.t = 1.0
    crit = seq("crit", 4, clock, Priority.CRITICAL)
    sched.add(crit)
    assert run_step(sched).scheduled[0].seq.request_id == "crit"
    sched.finish(crit, "stop")
    # A fresh HIGH request beats LOW that waited 4 s; after 15 s of waiting LOW has aged past it.
    clock.t = 5.0
    sched.add(seq("high", 4, clock, Priority.HIGH))
    assert run_step(sched).scheduled[0].seq.request_id == "high"
    sched.finish(sched.running[0], "stop")
    clock.t = 16.0
    sched.add(seq("high2", 4, clock, Priority.HIGH))
    assert run_step(sched).scheduled[0].seq.request_id == "low"


def test_max_num_seqs_caps_the_running_batch():
    sched, _, clock = make(max_seqs=2)
    for i in range(4):
        sched.add(seq(f"s{i}", 3, clock))
    out = run_step(sched)
    assert len(out.scheduled) == 2 and len(sched.waiting) == 2


def test_preemption_takes_the_lowest_priority_newest_and_frees_its_blocks():
    sched, pool, clock = make(num_blocks=4, budget=64)
    a = seq("a", 8, clock, Priority.HIGH)  # 2 blocks
    sched.add(a)
    clock.t = 1
    b = seq("b", 8, clock, Priority.LOW)  # 2 blocks
    sched.add(b)
    run_step(sched)
    assert pool.num_free == 0
    out = run_step(sched)  # both need a 3rd block; only LOW "b" may yield
    assert [s.request_id for s in out.preempted] == ["b"]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert [i.seq.request_id for i in out.scheduled] == ["a"]
    assert sched.num_preemptions == 1


def test_finished_blocks_stay_cached_and_are_reused():
    sched, pool, clock = make()
    first = seq("first", 9, clock)
    sched.add(first)
    run_step(sched)
    sched.finish(first, "stop")
    assert pool.num_cached == 2  # two full blocks of 4 committed
    again = seq("again", 9, clock)
    sched.add(again)
    out = run_step(sched)
    assert again.num_cached_tokens == 8 and out.scheduled[0].num_new_tokens == 1


def test_a_lone_prefill_up_to_three_times_the_largest_graph_goes_in_graph_sized_steps_others_in_one():
    """A lone prefill of up to GRAPH_PREFILL_STEPS graphs goes in graph-sized (replayed)
    steps: on the H100 a cold 1100-token llama-1b prompt took 9.7 ms in one eager step (host
    bound) where 1024 tokens took 4.7 ms in two replayed steps."""
    sched, _, clock = make(budget=64)
    sched.graph_prefill_tokens = 16
    sizes = []
    for i, n in enumerate((30, 40)):
        alone = seq(f"alone-{n}", n, clock)
        alone.token_ids[:] = [t + 50 * i for t in alone.token_ids]  # nothing cached in common
        sched.add(alone)
        steps = []
        while not alone.token_ids[n:]:  # until the prompt's end samples a token
            out = run_step(sched)
            steps.append([(item.num_new_tokens, item.samples) for item in out.scheduled])
        sizes.append(steps)
        sched.finish(alone, "stop")
    assert sizes == [[[(16, False)], [(14, True)]], [[(16, False)], [(16, False)], [(8, True)]]]
    longer = seq("longer", 50, clock)  # past three graphs: one eager step
    longer.token_ids[:] = [t + 150 for t in longer.token_ids]
    sched.add(longer)
    assert [(item.num_new_tokens, item.samples) for item in run_step(sched).scheduled] == [(50, True)]
    sched.finish(longer, "stop")
    a, b = seq("a", 20, clock), seq("b", 8, clock)
    for other in (a, b):  # nothing in common with the first prompt's cached blocks
        other.token_ids[:] = [t + 100 for t in other.token_ids]
    sched.add(a)
    sched.add(b)
    out = run_step(sched)  # two sequences share the step: it runs eagerly anyway, uncut
    assert [(item.seq.request_id, item.num_new_tokens) for item in out.scheduled] == [("a", 20), ("b", 8)]
