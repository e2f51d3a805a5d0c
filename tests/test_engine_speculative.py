"""Speculative decoding from the context (n-gram drafts): the proposer and acceptance rule
alone, then the engine — whose greedy output must be token for token what plain greedy
decoding gives, with drafts proposed and accepted, across sessions, stops, limits, mixed
batches and a tight pool — and against transformers."""

from __future__ import annotations

import random

import pytest
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.speculative import accepted_prefix, propose_ngram


def test_propose_ngram_takes_the_latest_longest_match():
    tokens = [5, 6, 7, 1, 2, 9, 9, 5, 6, 7, 3, 4, 8, 5, 6, 7]
    # the 3-gram 5 6 7 occurs at 0 and 7: the latest one is followed by 3 4 8
    assert propose_ngram(tokens, 3, max_ngram=3) == [3, 4, 8]
    assert propose_ngram(tokens, 5, max_ngram=3) == [3, 4, 8, 5, 6]
    assert propose_ngram(tokens, 0, max_ngram=3) == []
    # no 3- or 2-gram match: falls back to the last token alone
    assert propose_ngram([1, 2, 3, 4, 2], 2, max_ngram=3) == [3, 4]
    assert propose_ngram([1, 2, 3], 2, max_ngram=3) == []  # nothing repeats
    assert propose_ngram([7], 2, max_ngram=3) == []
    assert propose_ngram([1, 2, 3, 4, 2], 2, max_ngram=3, min_ngram=2) == []


def test_accepted_prefix_is_the_agreeing_draft_then_the_models_token():
    assert accepted_prefix([1, 2, 3], [1, 2, 3, 4]) == [1, 2, 3, 4]  # all accepted + bonus
    assert accepted_prefix([1, 2, 3], [1, 9, 3, 4]) == [1, 9]  # the model's token replaces the miss
    assert accepted_prefix([1, 2, 3], [8, 2, 3, 4]) == [8]
    assert accepted_prefix([], [5]) == [5]
    with pytest.raises(ValueError, match="len\\(draft\\) \\+ 1"):
        accepted_prefix([1, 2], [1, 2])


def _engine(**kw) -> Engine:
    cfg = dict(model="tiny", device="cpu", dtype="float32", num_blocks=512, max_num_batched_tokens=256)
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def _repetitive_prompts(seed: int, n: int) -> list[list[int]]:
    """Prompts that repeat themselves, so n-gram drafts exist (and are often right: a random
    model tends to continue a loop it has seen)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        motif = [rng.randrange(3, 250) for _ in range(rng.randint(3, 12))]
        out.append((motif * rng.randint(2, 6))[: rng.randint(8, 60)] + [rng.randrange(3, 250)])
    return out


@pytest.fixture(scope="module")
def plain() -> Engine:
    return _engine()


@pytest.fixture(scope="module")
def spec() -> Engine:
    return _engine(speculative_tokens=4, speculative_max_ngram=3, speculative_max_batch=8)


def test_speculative_greedy_equals_plain_greedy(plain, spec):
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = _repetitive_prompts(1, 6)
    want = [o.token_ids for o in plain.generate(prompts, greedy)]
    got = [o.token_ids for o in spec.generate(prompts, greedy)]
    assert got == want
    tokens = spec.stats()["tokens"]
    assert tokens["draft_proposed"] > 0 and tokens["draft_accepted"] > 0


def test_speculation_wins_over_multi_step_rounds(plain):
    """With multi-step rounds on too (the CUDA default), a batch that may speculate still
    drafts each step; a batch too large to speculate keeps its multi-step rounds."""
    both = _engine(speculative_tokens=4, speculative_max_batch=8, num_scheduler_steps=8)
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = _repetitive_prompts(1, 6)
    assert [o.token_ids for o in both.generate(prompts, greedy)] == \
        [o.token_ids for o in plain.generate(prompts, greedy)]
    assert both.stats()["tokens"]["draft_accepted"] > 0
    wide = _engine(speculative_tokens=4, speculative_max_batch=2, num_scheduler_steps=8)
    wide.generate(prompts, greedy)
    tokens = wide.stats()["tokens"]
    assert tokens["draft_proposed"] == 0 and tokens["schedules"] < tokens["steps"] // 4


def test_speculation_saves_forward_passes(plain, spec):
    greedy = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    prompt = _repetitive_prompts(2, 1)
    before_plain = plain.stats()["tokens"]["schedules"]
    before_spec = spec.stats()["tokens"]["schedules"]
    want = plain.generate(prompt, greedy)[0].token_ids
    got = spec.generate(prompt, greedy)[0].token_ids
    assert got == want
    plain_rounds = plain.stats()["tokens"]["schedules"] - before_plain
    spec_rounds = spec.stats()["tokens"]["schedules"] - before_spec
    accepted = spec.stats()["tokens"]["draft_accepted"]
    assert accepted > 0 and spec_rounds < plain_rounds


def test_speculation_across_session_turns_stops_and_limits(plain, spec):
    """Session turns (drafts from the history), a stop token met inside an accepted draft,
    max_tokens reached mid-draft; the session histories end up identical too."""
    rng = random.Random(3)
    for engine_turns in range(3):
        turn = _repetitive_prompts(10 + engine_turns, 1)[0]
        params = SamplingParams(max_tokens=rng.choice([1, 2, 7, 33]), temperature=0.0, ignore_eos=True)
        a = plain.generate([turn], params, session_ids=["s-plain"])[0]
        b = spec.generate([turn], params, session_ids=["s-spec"])[0]
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
    assert spec.export_session("s-spec").token_ids == plain.export_session("s-plain").token_ids
    # a stop token: the plain run's 5th token, which speculation may reach inside a draft
    prompt = _repetitive_prompts(20, 1)
    full = plain.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0].token_ids
    stop = SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[full[4]])
    a = plain.generate(prompt, stop)[0]
    b = spec.generate(prompt, stop)[0]
    assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason == "stop"


def test_mixed_batches_tight_pool_and_no_leak():
    """Sampled requests beside greedy ones (no speculation for that batch), a batch larger
    than speculative_max_batch, and a pool too small for every draft: same output, no block
    left behind."""
    plain = _engine(num_blocks=40)
    spec = _engine(num_blocks=40, speculative_tokens=6, speculative_max_batch=2)
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=24, temperature=0.8, seed=7, ignore_eos=True)
    prompts = _repetitive_prompts(30, 5)
    for params in ([greedy] * 5, [greedy, sampled, greedy, sampled, greedy], [greedy] * 2):
        n = len(params)
        want = [o.token_ids for o in plain.generate(prompts[:n], params)]
        got = [o.token_ids for o in spec.generate(prompts[:n], params)]
        assert got == want
    stats = spec.pool.stats()
    assert stats.blocks_used == 0


def test_speculative_config_is_validated():
    with pytest.raises(ValueError, match="speculative_tokens must be in \\[0, 16\\]"):
        EngineConfig(speculative_tokens=17)
    with pytest.raises(ValueError, match="speculative_max_ngram"):
        EngineConfig(speculative_max_ngram=0)


def test_speculative_greedy_matches_transformers(tmp_path):
    pytest.importorskip("transformers")
    from hf_reference import assert_greedy_matches, build_checkpoint, hf_greedy

    hf = build_checkpoint("llama", tmp_path)
    engine = Engine(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32", num_blocks=256,
                                 speculative_tokens=4))
    prompts = [[p % 256 for p in prompt] for prompt in _repetitive_prompts(40, 4)]
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        ref, ref_logits = hf_greedy(hf, prompt, 16)
        assert_greedy_matches(out.token_ids, ref, ref_logits)
    assert engine.stats()["tokens"]["draft_proposed"] > 0


@pytest.mark.gpu
def test_speculative_greedy_equals_plain_greedy_on_cuda():
    """On CUDA (Triton kernels, graphs, fused kernels) in float32: verification runs the
    prefill kernels over a cached context; the output equals plain greedy decoding."""
    cfg = dict(model="tiny", device="cuda", dtype="float32", num_blocks=1024, max_num_batched_tokens=256)
    plain = Engine(EngineConfig(**cfg))
    spec = Engine(EngineConfig(**cfg, speculative_tokens=4))
    spec.warmup()
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = _repetitive_prompts(50, 6)
    assert [o.token_ids for o in spec.generate(prompts, greedy)] == \
        [o.token_ids for o in plain.generate(prompts, greedy)]
    assert spec.stats()["tokens"]["draft_accepted"] > 0
