"""Warmup compiles and captures everything up front and leaves no trace.

On CUDA: after ``Engine.warmup()`` a serving mix (many prompt lengths, several sequences per
step, chunked prefill, prefix hits, session turns, greedy and sampled, multi-step decode and
the fused kernels) triggers no Triton compile: the JIT's post-compile hook never fires. On
CPU: the dummy warmup requests leave no blocks, cached content or counters behind, and
generation afterwards is what it would have been without them.
"""

from __future__ import annotations

import random

import pytest
import torch
from ultrakv.node import Engine, EngineConfig, SamplingParams


def _mix(engine: Engine, seed: int) -> list[list[int]]:
    """A serving-like mix; returns the greedy outputs' token ids."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    greedy = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=7, temperature=0.7, top_p=0.8, top_k=40, seed=3,
                             ignore_eos=True)
    prompts = [[rng.randrange(vocab) for _ in range(rng.choice([1, 5, 16, 31, 100, 257, 700]))]
               for _ in range(24)]
    outs = engine.generate(prompts, [greedy, sampled] * 12)
    system = [rng.randrange(vocab) for _ in range(300)]
    engine.generate([system + [rng.randrange(vocab) for _ in range(n)] for n in (3, 40, 77)], greedy)
    for turn in range(3):
        engine.generate([[rng.randrange(vocab) for _ in range(13 + turn)]], greedy,
                        session_ids=["warm-chat"])
    return [o.token_ids for o, p in zip(outs, prompts, strict=True) if p]


def test_warmup_requests_leave_no_trace_on_cpu():
    def fresh() -> Engine:
        return Engine(EngineConfig(model="tiny", device="cpu", dtype="float32", num_blocks=512,
                                   max_num_batched_tokens=256))

    warmed = fresh()
    warmed._run_warmup_requests()  # what warmup() runs on CUDA after the graph captures
    stats = warmed.stats()
    assert stats["requests"]["total"] == 0 and stats["tokens"]["prompt"] == 0
    pool = warmed.pool.stats()
    assert (pool.hits, pool.misses, pool.evictions) == (0, 0, 0)
    assert pool.blocks_used == 0 and pool.blocks_cached == 0
    assert warmed.list_sessions() == []
    assert _mix(warmed, 5) == _mix(fresh(), 5)


@pytest.mark.gpu
@pytest.mark.parametrize(("steps", "fused"), [(1, False), (4, True)])
def test_no_triton_compile_after_warmup(steps: int, fused: bool):
    from triton import knobs
    from triton.runtime.jit import JITFunction
    from ultrakv.node.attention import triton_kernels
    from ultrakv.node.model import fused_kernels

    # A fresh JIT cache, so a variant compiled by an earlier test cannot hide a gap here.
    for module in (triton_kernels, fused_kernels):
        for obj in vars(module).values():
            if isinstance(obj, JITFunction):
                obj.device_caches.clear()
    engine = Engine(EngineConfig(model="tiny", device="cuda", dtype="bfloat16", num_blocks=2048,
                                 max_num_batched_tokens=512, num_scheduler_steps=steps,
                                 fused_kernels=fused))
    assert engine.attention_backend == "triton"
    engine.warmup()
    compiled: list[str] = []
    previous = knobs.runtime.jit_post_compile_hook

    def hook(*args, **kwargs):
        compiled.append(str(kwargs.get("repr", kwargs.get("fn", "?"))))
        return False

    knobs.runtime.jit_post_compile_hook = hook
    try:
        _mix(engine, 11)
        torch.cuda.synchronize()
    finally:
        knobs.runtime.jit_post_compile_hook = previous
    assert compiled == [], f"Triton compiled during serving: {compiled}"
