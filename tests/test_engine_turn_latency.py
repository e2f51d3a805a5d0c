"""A returning session's turn pays little beyond its kernels: each of its blocks is hashed
once, and its prefill replays in a CUDA graph whose inputs are staged on the host and sent in
one copy. Here: which steps replay in a prefill graph, how their inputs are staged (padded to
the token bucket, the cached context as data), and that the padded step computes what the
eager step computes.

On CPU the staged buffers feed the model eagerly (a CUDA graph replays exactly that forward);
on CUDA (gpu marker) the graphs' replays are compared bit for bit with eager forwards of the
same staged inputs, and an engine with graphs against one without, token for token.
"""

from __future__ import annotations

import random

import pytest
import torch
from ultrakv.cluster.block_hashing import hash_token_blocks
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.cuda_graphs import (
    PREFILL_TOKEN_BUCKETS,
    PrefillGraphInputs,
    PrefillShape,
    context_buckets,
    faster_sizes,
    prefill_shape,
)
from ultrakv.node.outputs import GenerateRequest

BUCKETS = list(PREFILL_TOKEN_BUCKETS)
CONTEXTS = context_buckets(4096)  # 256, 1024, 4096


def test_prefill_shape_pads_to_the_token_bucket_and_picks_the_context_bucket():
    assert prefill_shape(2096, 204, BUCKETS, CONTEXTS) == PrefillShape(224, 4096)
    assert prefill_shape(0, 200, BUCKETS, CONTEXTS) == PrefillShape(224, 256)
    assert prefill_shape(0, 2, BUCKETS, CONTEXTS) == PrefillShape(16, 256)
    assert prefill_shape(700, 64, BUCKETS, CONTEXTS) == PrefillShape(64, 1024)
    # The padded end decides the context bucket: 200 + 224 > 256.
    assert prefill_shape(200, 200, BUCKETS, CONTEXTS) == PrefillShape(224, 1024)
    assert prefill_shape(0, 512, BUCKETS, CONTEXTS) == PrefillShape(512, 1024)


def test_steps_no_prefill_graph_fits_run_eagerly():
    assert prefill_shape(100, 1, BUCKETS, CONTEXTS) is None  # one token: a decode step
    assert prefill_shape(0, 513, BUCKETS, CONTEXTS) is None  # past the largest bucket
    assert prefill_shape(3910, 180, BUCKETS, CONTEXTS) is None  # 3910 + 192 > 4096
    assert prefill_shape(3904, 180, BUCKETS, CONTEXTS) == PrefillShape(192, 4096)
    assert prefill_shape(0, 10, [], CONTEXTS) is None


def test_a_step_takes_a_larger_bucket_of_its_context_where_warmup_measured_it_faster():
    """cuBLAS's kernel choice varies with the row count (an H100 ran llama-1b's down
    projection in 27 us at 224 rows and 20 us at 256): a step pads to a larger bucket of the
    same context only where that replayed faster beyond the noise margin, fastest first, and
    only if its padded end still fits the context."""
    times = {PrefillShape(224, 4096): 2000.0, PrefillShape(256, 4096): 1800.0, PrefillShape(320, 4096): 1700.0,
             PrefillShape(384, 4096): 1990.0,  # within 3% of 224's time: noise, not taken
             PrefillShape(192, 4096): 1600.0,  # smaller: never taken
             PrefillShape(224, 1024): 900.0, PrefillShape(256, 1024): 950.0}  # slower: not taken
    faster = faster_sizes(times)
    assert faster[PrefillShape(224, 4096)] == (320, 256)
    assert faster[PrefillShape(256, 4096)] == (320,)
    assert PrefillShape(224, 1024) not in faster and PrefillShape(320, 4096) not in faster
    assert prefill_shape(2096, 204, BUCKETS, CONTEXTS, faster) == PrefillShape(320, 4096)
    assert prefill_shape(3800, 204, BUCKETS, CONTEXTS, faster) == PrefillShape(256, 4096)  # 3800 + 320 > 4096
    assert prefill_shape(3850, 204, BUCKETS, CONTEXTS, faster) == PrefillShape(224, 4096)  # 3850 + 256 > 4096
    assert prefill_shape(700, 204, BUCKETS, CONTEXTS, faster) == PrefillShape(224, 1024)
    assert prefill_shape(2096, 204, BUCKETS, CONTEXTS, {}) == PrefillShape(224, 4096)


def test_staging_pads_and_sends_one_contiguous_range():
    inputs = PrefillGraphInputs(max_tokens=64, max_blocks=32, block_size=4, device=torch.device("cpu"))
    long_table = list(range(100, 120))
    inputs.send(inputs.stage(list(range(1, 41)), 30, long_table, 48))
    table = [7, 3, 9, 1, 5, 8, 2, 6, 4, 0, 11, 12]  # 12 blocks: 48 tokens
    tokens = [21, 22, 23, 24, 25]
    nbytes = inputs.stage(tokens, 38, table, 16)
    inputs.send(nbytes)
    n = len(tokens)
    assert inputs.input_ids[:n].tolist() == tokens
    assert inputs.input_ids[n:16].tolist() == [0] * 11
    assert inputs.positions[:16].tolist() == [38, 39, 40, 41, 42] + [42] * 11
    # Position p lives in block table[p // 4] at offset p % 4 (38, 39: table[9]; 40..: table[10]);
    # padding writes nowhere.
    assert inputs.slot_mapping[:16].tolist() == [0 * 4 + 2, 0 * 4 + 3, 11 * 4, 11 * 4 + 1, 11 * 4 + 2] + [-1] * 11
    assert inputs.seq_lens.tolist() == [38 + 16]  # the padded tokens extend the context
    assert inputs.block_tables[0, :12].tolist() == table
    # One copy through the end of this table, rounded up to 64 entries (here the buffer's
    # end, at 32); the entries after it are the last step's (stale but valid block ids, read
    # only on behalf of padding).
    assert inputs.block_tables[0, 12:20].tolist() == long_table[12:20]
    assert inputs.block_tables.data_ptr() + 4 * 32 == inputs.device_buffer.data_ptr() + nbytes
    assert nbytes == inputs.device_buffer.numel()
    big = PrefillGraphInputs(max_tokens=64, max_blocks=256, block_size=4, device=torch.device("cpu"))
    for blocks, entries in ((1, 64), (64, 64), (65, 128), (256, 256)):
        sent = big.stage([1, 2], 0, list(range(blocks)), 16)
        assert big.block_tables.data_ptr() + 4 * entries == big.device_buffer.data_ptr() + sent
        big.send(sent)
        assert big.block_tables[0, :blocks].tolist() == list(range(blocks))
    for field in (inputs.input_ids, inputs.positions, inputs.slot_mapping, inputs.seq_lens, inputs.block_tables):
        assert field.data_ptr() % 16 == 0


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(model="tiny", device="cpu", dtype="float32", num_blocks=512,
                               max_num_batched_tokens=1024, max_model_len=4096))


@pytest.mark.parametrize(("history", "new"), [(700, 200), (333, 17), (40, 2)])
def test_padded_staged_turn_computes_what_the_eager_step_computes(engine: Engine, history: int, new: int):
    """A returning turn's step, scheduled for real over the session's cached blocks: the
    model run on the staged, padded inputs gives the eager step's hidden states for the real
    tokens and writes the same KV, and the padding writes nothing."""
    rng = random.Random(history)
    sid = f"turn-{history}"
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    engine.generate([[rng.randrange(1, 256) for _ in range(history)]], one, session_ids=[sid])
    seq = engine.add_request(GenerateRequest(prompt=[rng.randrange(1, 256) for _ in range(new)],
                                             sampling=one, session_id=sid))
    try:
        out = engine.scheduler.schedule()
        (item,) = out.scheduled
        start, n = item.seq.num_computed_tokens, item.num_new_tokens
        assert start >= (history // 16) * 16 and start + n == seq.num_tokens  # the cached context is reused
        shape = prefill_shape(start, n, BUCKETS, context_buckets(engine.max_model_len))
        assert shape is not None and shape.tokens >= n
        before = [c.clone() for c in engine.kv_caches]

        with torch.inference_mode():
            ids, pos, meta, _ = engine.runner.prepare(out.scheduled)
            eager = engine.model(ids, pos, engine.kv_caches, meta).clone()
            eager_kv = [c.clone() for c in engine.kv_caches]
            for c, b in zip(engine.kv_caches, before, strict=True):
                c.copy_(b)

            inputs = PrefillGraphInputs(BUCKETS[-1], engine.runner._max_blocks, engine.config.block_size,
                                        torch.device("cpu"))
            inputs.send(inputs.stage(seq.token_ids[start : start + n], start, seq.block_table, shape.tokens))
            staged_meta = inputs.meta(shape.tokens, shape.context, torch.tensor([0, shape.tokens], dtype=torch.int32))
            padded = engine.model(inputs.input_ids[: shape.tokens], inputs.positions[: shape.tokens],
                                  engine.kv_caches, staged_meta)

        torch.testing.assert_close(padded[:n], eager, rtol=1e-5, atol=1e-5)
        logits = engine.model.compute_logits
        assert torch.equal(logits(padded[n - 1 : n]).argmax(-1), logits(eager[n - 1 : n]).argmax(-1))
        for staged_c, eager_c, old in zip(engine.kv_caches, eager_kv, before, strict=True):
            written = (eager_c != old).any(dim=(0, 3, 4))  # [blocks, block slots] the step wrote
            torch.testing.assert_close(staged_c, eager_c, rtol=1e-5, atol=1e-5)
            assert torch.equal(staged_c[:, ~written], old[:, ~written])  # padding wrote nowhere
    finally:
        engine.abort(seq.request_id)


def test_a_turn_hashes_each_new_block_once(engine: Engine, monkeypatch):
    """The blocks hashed to look the turn's prompt up in the prefix cache (the first new one)
    or while its step computes (the rest) are committed with those hashes, not hashed again
    when the prefill has filled them."""
    from ultrakv.cluster import block_hashing

    calls = []
    real = block_hashing._digest  # one call per block hashed, whichever function hashes it

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    rng = random.Random(1)
    reply = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine.generate([[rng.randrange(1, 256) for _ in range(300)]], reply, session_ids=["hash-once"])
    known = len(engine.sessions.get("hash-once").block_hashes)
    monkeypatch.setattr(block_hashing, "_digest", counted)
    out = engine.generate([[rng.randrange(1, 256) for _ in range(200)]], reply, session_ids=["hash-once"])[0]
    computed = out.prompt_tokens + len(out.token_ids) - 1  # the last token sampled is not computed
    new_blocks = computed // 16 - known  # 14: the history's partial block and the prompt's
    assert new_blocks == 14
    assert len(calls) == new_blocks


ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
REPLY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def uncached() -> Engine:
    """Recomputes every prompt: what a turn over cached blocks must reproduce."""
    return Engine(EngineConfig(model="tiny", device="cpu", dtype="float32", num_blocks=512,
                               enable_prefix_caching=False, max_model_len=4096))


def _lookup_counts(engine: Engine) -> tuple[int, int]:
    stats = engine.pool.stats()
    return stats.hits, stats.misses


def test_a_turn_finds_cached_blocks_past_its_known_hashes(engine: Engine, uncached: Engine):
    """A returning turn hashes its new blocks only as far as the pool holds them (the rest
    while its step computes): blocks of its prompt that another request cached are still
    found, block after block, and every block the lookup stands for counts as a hit or a miss."""
    rng = random.Random(7)
    bs = engine.config.block_size
    first = engine.generate([[rng.randrange(1, 256) for _ in range(100)]], ONE, session_ids=["look-past"])[0]
    history = first.prompt_token_ids + first.token_ids  # 101 tokens; KV for 6 full blocks
    new = [rng.randrange(1, 256) for _ in range(70)]
    engine.generate([history + new + [9]], ONE)  # no session: caches the turn's blocks too
    hits, misses = _lookup_counts(engine)
    out = engine.generate([new], ONE, session_ids=["look-past"])[0]
    looked_up = (len(history) + len(new) - 1) // bs  # 10 blocks, 6 of them known to the session
    assert out.cached_tokens == looked_up * bs
    assert _lookup_counts(engine) == (hits + looked_up, misses)
    assert out.token_ids == uncached.generate([history + new], ONE)[0].token_ids

    # The next turn finds only the session's own blocks: the rest of the lookup are misses,
    # though only the first of them was hashed to know it.
    hits, misses = _lookup_counts(engine)
    history = out.prompt_token_ids + out.token_ids
    new = [rng.randrange(1, 256) for _ in range(90)]
    out = engine.generate([new], ONE, session_ids=["look-past"])[0]
    cached = (len(history) - 1) // bs
    assert out.cached_tokens == cached * bs
    assert _lookup_counts(engine) == (hits + cached, misses + (len(history) + len(new) - 1) // bs - cached)
    assert out.token_ids == uncached.generate([history + new], ONE)[0].token_ids


def test_a_sessions_known_hashes_follow_its_history(engine: Engine, uncached: Engine):
    """The chained hashes a session keeps for its next turn's lookup stay those of its history
    as that history changes: a new turn, a re-rendered turn that diverges inside the history,
    an aborted turn, its blocks evicted, a move to another node. Each next turn finds exactly
    the cached blocks of its history and generates what a recompute generates."""
    rng = random.Random(11)
    bs = engine.config.block_size
    sid = "hashes-follow"
    toks = lambda n: [rng.randrange(1, 256) for _ in range(n)]  # noqa: E731

    def history(e: Engine) -> list[int]:
        return e.sessions.history(sid)

    def hashes_true(e: Engine) -> None:
        s = e.sessions.get(sid)
        assert s.block_hashes == hash_token_blocks(s.token_ids, bs, s.salt, e.chain_root)[: len(s.block_hashes)]
        assert len(s.block_hashes) == (len(s.token_ids) - 1) // bs  # every computed full block

    def turn(e: Engine, prompt: list[int], cached: int, **request) -> None:
        whole = prompt if request.get("full_context") else history(e) + prompt
        seq = e.add_request(GenerateRequest(prompt=prompt, sampling=REPLY, session_id=sid, **request))
        while e.has_unfinished():
            e.step()
        assert seq.num_cached_tokens == cached
        assert seq.output_token_ids == uncached.generate([whole], REPLY)[0].token_ids
        hashes_true(e)

    turn(engine, toks(90), 0)
    turn(engine, toks(40), (len(history(engine)) - 1) // bs * bs)  # a new turn over the cached history
    # A whole-conversation prompt that leaves the history at token 50: blocks 0-2 are reused,
    # and the session's chain is the new conversation's from block 3 on.
    turn(engine, history(engine)[:50] + toks(30), 48, full_context=True)
    before = list(history(engine))
    aborted = engine.add_request(GenerateRequest(prompt=toks(20), sampling=REPLY, session_id=sid))
    engine.step()
    engine.abort(aborted.request_id)
    assert history(engine) == before
    hashes_true(engine)
    turn(engine, toks(20), (len(before) - 1) // bs * bs)
    engine.clear_cache()
    turn(engine, toks(25), 0)  # every block evicted: recomputed, and hashed anew
    state = engine.export_session(sid)
    other = Engine(EngineConfig(model="tiny", device="cpu", dtype="float32", num_blocks=512, max_model_len=4096))
    assert other.import_session(state) == state.kv_tokens > 0
    turn(other, toks(33), state.kv_tokens)


def test_a_turns_first_token_arrives_before_its_blocks_are_committed(engine: Engine, uncached: Engine):
    """Committing the blocks a turn's prompt filled is no part of its time to first token: the
    token reaches the listener first. A listener that aborts its request on that token leaves
    the blocks uncommitted, the history as it was and the engine serving."""
    rng = random.Random(5)
    bs = engine.config.block_size
    sid = "deliver-first"
    engine.generate([[rng.randrange(1, 256) for _ in range(100)]], ONE, session_ids=[sid])
    history = engine.sessions.history(sid)
    prompt = [rng.randrange(1, 256) for _ in range(70)]
    chain = hash_token_blocks(history + prompt, bs)
    new = chain[(len(history) - 1) // bs :]  # the blocks this turn's prefill fills
    held_at_delivery = []

    def listener(delta) -> None:
        if delta.token_ids and not held_at_delivery:
            held_at_delivery.append([engine.pool.holds(h) for h in new])

    engine.add_request(GenerateRequest(prompt=prompt, sampling=REPLY, session_id=sid), listener)
    while engine.has_unfinished():
        engine.step()
    assert held_at_delivery == [[False] * len(new)]
    assert all(engine.pool.holds(h) for h in new)

    def aborting(delta) -> None:
        if delta.token_ids and not delta.finished:
            engine.abort(delta.request_id)

    history = engine.sessions.history(sid)
    seq = engine.add_request(GenerateRequest(prompt=[rng.randrange(1, 256) for _ in range(50)], sampling=REPLY,
                                             session_id=sid), aborting)
    engine.step()
    assert seq.finish_reason == "abort" and not engine.has_unfinished()
    assert engine.sessions.history(sid) == history and engine.pool.num_used == 0
    out = engine.generate([prompt], ONE, session_ids=[sid])[0]
    assert out.cached_tokens == (len(history) - 1) // bs * bs
    assert out.token_ids == uncached.generate([history + prompt], ONE)[0].token_ids


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("kernel", ["gqa", "per_head"])
def test_split_prefill_of_a_returning_turn_compiles_for_an_h100(monkeypatch, kv_dtype, kernel):
    """Turn 8 of bench_gpu's conversation on llama-1b's heads, as its prefill graph launches it
    (224 tokens over a 4096 bucket): the cached context is split over more programs and the
    slices merged (by default in the GQA kernel's own launch; with the per-head kernels by a
    second one); the split kernels and the unsplit kernel (a cold prompt) all compile for an
    H100 (no GPU needed: Triton compiles for a named target)."""
    pytest.importorskip("triton")
    from triton_ptx import LaunchRecorder
    from ultrakv.node.attention import triton_backend
    from ultrakv.node.attention.base import AttentionMetadata

    recorders = {name: LaunchRecorder(kernel) for name, kernel in triton_backend._kernels().items()}
    monkeypatch.setattr(triton_backend, "_kernels", lambda: recorders)
    row = 68 if kv_dtype == torch.int8 else 64  # a quantized row carries its scale
    cache = torch.zeros(2, 256, 16, 8, row, dtype=torch.uint8 if kv_dtype == torch.int8 else kv_dtype)
    cache = cache.view(kv_dtype)
    q = torch.zeros(224, 32, 64, dtype=torch.bfloat16)
    tables = torch.zeros(1, 256, dtype=torch.int32)

    def meta(context: int, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(torch.tensor([0, 224], dtype=torch.int32), torch.tensor([context], dtype=torch.int32),
                                 tables, torch.full((224,), -1), 224, bucket)

    backend = triton_backend.TritonPagedBackend(prefill_kernel=kernel)
    backend.prefill(q, cache, meta(2320, 4096), 0.125)
    split = ["prefill_gqa"] if kernel == "gqa" else ["prefill_split", "prefill_reduce"]
    assert all(recorders[name].launches for name in split)
    assert not recorders["prefill"].launches
    if kernel == "gqa":
        args = recorders["prefill_gqa"].launches[0][0]
        assert args[11] > 1  # num_parts: the context is split
    backend.prefill(q, cache, meta(224, 224), 0.125)  # a cold prompt: nothing to split
    assert len(recorders["prefill"].launches) == 1
    for name in [*split, "prefill"]:
        assert ".entry" in recorders[name].ptx(), name


def _turns(engine: Engine, seed: int) -> list[list[int]]:
    """A conversation whose turns cover several token buckets and one past the largest."""
    rng = random.Random(seed)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = []
    for n in (37, 200, 3, 130, 513, 64):
        out = engine.generate([[rng.randrange(1, 256) for _ in range(n)]], greedy, session_ids=["chat"])[0]
        outs.append(out.token_ids)
    return outs


@pytest.mark.gpu
def test_prefill_graph_replays_equal_eager_forwards_on_cuda():
    """Every single-sequence prefill of a conversation replays in a graph captured by
    warmup(); each replay's hidden states equal, bit for bit, an eager forward of the same
    staged inputs; and the conversation's tokens equal those of an engine without graphs."""

    def cuda_engine(graphs: bool) -> Engine:
        return Engine(EngineConfig(model="tiny", device="cuda", dtype="float32", num_blocks=1024,
                                   max_num_batched_tokens=1024, max_model_len=4096, use_cuda_graphs=graphs))

    engine = cuda_engine(True)
    engine.warmup()
    graphs = engine.runner.graphs
    captured = len(graphs.graphs)
    replays: list[tuple[PrefillShape, bool]] = []
    run_prefill = graphs.run_prefill

    def checked(shape, token_ids, start, block_table):
        out = run_prefill(shape, token_ids, start, block_table).clone()
        inputs, size = graphs.prefill_inputs, shape.tokens
        meta = inputs.meta(size, shape.context, graphs.prefill_qsl[size])
        eager = engine.model(inputs.input_ids[:size], inputs.positions[:size], engine.kv_caches, meta)
        replays.append((shape, torch.equal(out, eager[: len(token_ids)])))
        return out

    graphs.run_prefill = checked
    with_graphs = _turns(engine, 3)
    assert len(graphs.graphs) == captured  # warmup captured every shape the turns met
    # Every turn; the one past the largest bucket (513 new tokens after the last turn's
    # unprocessed ones) in two chunks, 512 tokens then the rest.
    assert len(replays) == 7
    assert all(same for _, same in replays), replays
    assert len({s.tokens for s, _ in replays}) >= 4  # several buckets (48, 224, 16, 160, 96)
    assert with_graphs == _turns(cuda_engine(False), 3)


@pytest.mark.gpu
def test_steps_padded_to_a_faster_bucket_generate_what_the_smallest_bucket_does():
    """Warmup times every captured prefill graph; steps that take a larger bucket (here every
    shape is sent to the largest bucket of its context that fits) generate the tokens of an
    engine without graphs."""
    engine = Engine(EngineConfig(model="tiny", device="cuda", dtype="float32", num_blocks=1024,
                                 max_num_batched_tokens=1024, max_model_len=4096, use_cuda_graphs=True))
    engine.warmup()
    graphs = engine.runner.graphs
    times = graphs.rank_prefill_sizes()
    assert set(times) == {PrefillShape(size, ctx) for kind, size, ctx in graphs.graphs if kind == "prefill"}
    assert all(t > 0 for t in times.values())
    graphs.faster_prefill = {shape: tuple(sorted((s.tokens for s in times if s.context == shape.context
                                                  and s.tokens > shape.tokens), reverse=True))
                             for shape in times}
    replayed = []
    run_prefill = graphs.run_prefill
    graphs.run_prefill = lambda shape, *a: replayed.append(shape) or run_prefill(shape, *a)
    with_graphs = _turns(engine, 5)
    assert any(shape.tokens == 512 for shape in replayed), replayed
    assert with_graphs == _turns(Engine(EngineConfig(model="tiny", device="cuda", dtype="float32", num_blocks=1024,
                                                     max_num_batched_tokens=1024, max_model_len=4096,
                                                     use_cuda_graphs=False)), 5)


def test_a_first_token_leaves_before_the_other_tokens_of_its_step(engine: Engine):
    """A request that gets its first token in a step with running sequences has it emitted
    first: the hops after the engine serve in arrival order, so behind the running streams'
    tokens it would wait for all of their writes (the scheduler puts running ones first)."""
    order: list[str] = []

    def listener(delta) -> None:
        if delta.token_ids:
            order.append(delta.request_id)

    running = engine.add_request(GenerateRequest(prompt=[5, 6, 7, 8], sampling=REPLY), listener)
    engine.step()  # its prefill and first token
    new = engine.add_request(GenerateRequest(prompt=[9, 10, 11], sampling=REPLY), listener)
    order.clear()
    engine.step()  # one step: the running request decodes, the new one prefills
    assert order == [new.request_id, running.request_id]
    while engine.has_unfinished():
        engine.step()
