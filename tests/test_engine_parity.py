"""The engine's greedy output equals transformers' token for token: one continuous batch with
chunked prefill forced on, again with prefix hits, after forced preemption, and across session
turns. The reference is transformers' own forward pass on a checkpoint it saved."""

from __future__ import annotations

import random

import pytest
from hf_reference import assert_greedy_matches, build_checkpoint, hf_greedy
from ultrakv.node import Engine, EngineConfig, SamplingParams

pytest.importorskip("transformers")

LENGTHS = [1, 2, 7, 16, 17, 33, 64, 150, 300]
NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build_checkpoint(request.param, path)
    return path, hf


def _engine(path, **kw) -> Engine:
    cfg = dict(
        model=str(path), device="cpu", dtype="float32", num_blocks=256, max_num_batched_tokens=64
    )
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def _check_all(engine: Engine, hf, prompts: list[list[int]]):
    outs = engine.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        ref, ref_logits = hf_greedy(hf, prompt, NEW_TOKENS)
        assert out.finish_reason == "length"
        assert_greedy_matches(out.token_ids, ref, ref_logits)
    return outs


def test_continuous_batch_with_chunked_prefill(checkpoint):
    path, hf = checkpoint
    engine = _engine(path)
    prompts = _prompts(1, LENGTHS)
    _check_all(engine, hf, prompts)
    stats = engine.stats()
    # 150- and 300-token prompts cannot fit a 64-token step: they were chunked.
    assert stats["tokens"]["steps"] > NEW_TOKENS + 300 // 64


def test_multi_step_decode_matches_transformers(checkpoint):
    """Eight decode steps per scheduling round, tokens fed forward on the device."""
    path, hf = checkpoint
    engine = _engine(path, num_scheduler_steps=8)
    _check_all(engine, hf, _prompts(10, LENGTHS))
    stats = engine.stats()["tokens"]
    assert stats["schedules"] < stats["steps"], stats


def test_prefix_hits_extended_prompts_and_shared_system_prefix(checkpoint):
    path, hf = checkpoint
    engine = _engine(path)
    prompts = _prompts(2, LENGTHS)
    _check_all(engine, hf, prompts)

    extended = [p + q for p, q in zip(prompts, _prompts(3, [20] * len(prompts)), strict=True)]
    outs = _check_all(engine, hf, extended)
    for p, out in zip(prompts, outs, strict=True):
        assert out.cached_tokens >= (len(p) // 16) * 16, (len(p), out.cached_tokens)

    system = _prompts(4, [100])[0]
    shared = [system + s for s in _prompts(5, [3, 10, 40, 70])]
    _check_all(engine, hf, shared[:1])  # the first request behind the prefix fills the cache
    outs = _check_all(engine, hf, shared[1:])
    assert all(o.cached_tokens >= (100 // 16) * 16 for o in outs), [o.cached_tokens for o in outs]
    assert engine.stats()["cache"]["hits"] > 0


def test_outputs_survive_forced_preemption(checkpoint):
    path, hf = checkpoint
    # 22 blocks x 16 = 352 token slots for 8 sequences that grow past 80 tokens each: the
    # admitted ones fill the pool, and crossing into a 6th block forces someone to yield.
    engine = _engine(path, num_blocks=22, max_num_batched_tokens=128)
    prompts = _prompts(6, [75, 76, 77, 78, 74, 73, 79, 72])
    _check_all(engine, hf, prompts)
    assert engine.stats()["requests"]["preemptions"] > 0


def test_session_continuation_equals_whole_history(checkpoint):
    path, hf = checkpoint
    engine = _engine(path)
    turns = _prompts(7, [40, 25, 30])
    history: list[int] = []
    for i, turn in enumerate(turns):
        out = engine.generate([turn], GREEDY, session_ids=["chat-1"])[0]
        whole = engine.generate([history + turn], GREEDY)[0]  # stateless, the full history
        assert out.token_ids == whole.token_ids
        ref, ref_logits = hf_greedy(hf, history + turn, NEW_TOKENS)
        assert_greedy_matches(out.token_ids, ref, ref_logits)
        if i > 0:  # later turns pay prefill only for what the cache doesn't hold
            assert out.cached_tokens >= (len(history) // 16) * 16
        history = history + turn + out.token_ids
    info = engine.get_session("chat-1")
    assert info.turns == 3 and info.num_tokens == len(history)


@pytest.mark.gpu
@pytest.mark.parametrize(("steps", "fused"), [(1, False), (4, True)])
def test_greedy_parity_on_cuda_with_gpu_kernels_and_graphs(checkpoint, steps, fused):
    """The engine on CUDA (auto backend: Triton kernels, CUDA graphs for decode) against
    transformers on the CPU, float32: the chunked batch and then prefix hits; as configured
    by default, then with four decode steps per scheduling round and the fused kernels."""
    path, hf = checkpoint
    engine = _engine(path, device="cuda", num_scheduler_steps=steps, fused_kernels=fused)
    assert engine.attention_backend == "triton" and engine.cuda_graphs
    engine.warmup()  # every shape captured up front from dummy inputs, then replayed for real
    assert len(engine.runner.graphs.graphs) > 10
    prompts = _prompts(8, LENGTHS)
    _check_all(engine, hf, prompts)
    extended = [p + q for p, q in zip(prompts, _prompts(9, [20] * len(prompts)), strict=True)]
    outs = _check_all(engine, hf, extended)
    assert sum(o.cached_tokens for o in outs) > 0
