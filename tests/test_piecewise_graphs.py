"""Eager steps' layers around their attention, run in pieces (node/piecewise_graphs.py).

On the CPU the pieces run eagerly: every step of a serving mix that is not decode-only gives
exactly the hidden states of the model's own forward. On CUDA (gpu) they are captured per
padded token count at warmup and replayed: the same hidden states as the eager forward, and
the same generated tokens as an engine without them.
"""

from __future__ import annotations

import pytest
import torch
from serving_mix import serving_mix
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.piecewise_graphs import PIECEWISE_MAX_TOKENS, PiecewiseForward


def _mix(engine: Engine) -> list[list[int]]:
    return serving_mix(engine, (3, 37, 50, 129, 300, 17, 64, 700), seed=11)


def _compare_each_step(engine: Engine, pieces: PiecewiseForward, replay: bool) -> list[int]:
    """Run every step that is not decode-only through the model's forward and through the
    pieces as well (the KV writes are the same values into the same slots), asserting equal
    hidden states; returns the steps' token counts."""
    runner = engine.runner
    forward = runner._forward
    counts: list[int] = []

    def both(input_ids, positions, meta):
        if meta.is_decode_only or (replay and not pieces.covers(input_ids.shape[0])):
            return forward(input_ids, positions, meta)
        ref = runner.model(input_ids, positions, runner.kv_caches, meta).clone()
        got = pieces.forward(input_ids, positions, meta, replay=replay)
        if replay:
            torch.testing.assert_close(got, ref)
        else:
            assert torch.equal(got, ref)
        counts.append(input_ids.shape[0])
        return got

    runner._forward = both
    return counts


def test_the_pieces_compute_the_models_forward_on_cpu():
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=512, block_size=16,
                                 max_num_batched_tokens=256, max_num_seqs=32, max_model_len=1024))
    engine.runner.pad_eager_steps = True  # as on CUDA: the pieces' token counts are the padded ones
    assert PiecewiseForward.supports(engine.model)
    pieces = PiecewiseForward(engine.model, engine.kv_caches, 256, engine.device)
    assert pieces.sizes[-1] == 256 and not pieces.covers(256)  # nothing captured on a CPU
    counts = _compare_each_step(engine, pieces, replay=False)
    expected = _mix(Engine(EngineConfig(model="tiny", device="cpu", num_blocks=512, block_size=16,
                                        max_num_batched_tokens=256, max_num_seqs=32, max_model_len=1024)))
    assert _mix(engine) == expected
    assert len(counts) >= 4 and len(set(counts)) >= 3, counts


def test_only_whole_models_are_cut_in_pieces():
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=64))
    assert PiecewiseForward.supports(engine.model)
    assert not PiecewiseForward.supports(object())
    engine.model.model.layers[0].mlp.all_reduce = lambda x: x  # a tensor-parallel rank's slice
    assert not PiecewiseForward.supports(engine.model)


@pytest.mark.gpu
def test_replayed_pieces_give_the_eager_forward_and_its_tokens():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    config = EngineConfig(model="tiny", device="cuda", dtype="bfloat16", num_blocks=2048,
                          max_num_batched_tokens=512, max_num_seqs=32, max_model_len=2048)
    engine = Engine(config)
    pieces = engine.runner.piecewise
    assert pieces is not None
    engine.warmup()
    assert pieces.sizes[-1] == min(512, PIECEWISE_MAX_TOKENS) and all(pieces.covers(n) for n in pieces.sizes)
    counts = _compare_each_step(engine, pieces, replay=True)
    ours = _mix(engine)
    assert len(counts) >= 4, counts
    plain = Engine(config)
    plain.runner.piecewise = None
    plain.warmup()
    assert ours == _mix(plain)
