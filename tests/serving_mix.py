"""A serving-like mix of requests for engine-level tests of how steps are run: several
sequences per step, chunked prefill past a 256-token budget, prefill over cached prefixes,
greedy and seeded sampling."""

from __future__ import annotations

import random

from ultrakv.node import Engine, SamplingParams


def serving_mix(engine: Engine, lengths: tuple[int, ...], seed: int, max_tokens: int = 5) -> list[list[int]]:
    """Prompts of ``lengths`` (greedy and sampled in turn), then two prompts behind a shared
    200-token prefix (the fifth prompt's start, so one of ``lengths`` should be >= 200);
    returns every output's token ids."""
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9, top_k=20, seed=7, ignore_eos=True)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in lengths]
    outs = engine.generate(prompts, [greedy, sampled] * (len(prompts) // 2) + [greedy] * (len(prompts) % 2))
    system = prompts[4][:200]
    outs += engine.generate([system + [rng.randrange(vocab) for _ in range(n)] for n in (5, 70)], [sampled, greedy])
    return [o.token_ids for o in outs]
