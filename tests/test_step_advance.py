"""The decode step's on-device advance (``node/step_advance.py``) against its torch
reference, and greedy rounds replayed as whole-step CUDA graphs against eager steps.

The kernel runs natively on CUDA; without CUDA, where Triton is installed, the first test runs
this file again under Triton's CPU interpreter (see ``tests/triton_interpreter.py``).
"""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import INTERPRETING, assert_passes_under_interpreter, triton_importable

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRETING else None)
needs_kernels = pytest.mark.skipif(DEVICE is None, reason="needs CUDA, or Triton's interpreter (see the first test)")


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="CUDA runs the kernel natively")
@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.timeout(300)
def test_kernel_under_the_triton_interpreter():
    assert_passes_under_interpreter(__file__, at_least=2)


def _buffers(rows: int, live: int, width: int, block_size: int, seed: int) -> tuple:
    g = torch.Generator().manual_seed(seed)
    tables = torch.randint(0, 1000, (rows, width), generator=g, dtype=torch.int32)
    positions = torch.randint(0, width * block_size - 1, (rows,), generator=g)
    positions[0] = width * block_size - 1  # its next position falls past the table
    positions[1] = block_size - 1  # its next position starts a new block
    seq_lens = (positions + 1).int()
    blocks = tables.gather(1, (positions // block_size).unsqueeze(1)).squeeze(1).long()
    slots = blocks * block_size + positions % block_size
    slots[live:] = -1  # padded rows
    seq_lens[live:] = 1
    ids = torch.randint(0, 50_000, (rows,), generator=g)
    sampled = torch.randint(0, 50_000, (rows,), generator=g)
    return tuple(t.to(DEVICE) for t in (sampled, ids, positions, seq_lens, slots, tables))


@needs_kernels
@pytest.mark.parametrize(("rows", "live", "block_size"), [(4, 3, 16), (64, 64, 16), (48, 17, 32)])
def test_advance_matches_its_torch_reference(rows, live, block_size):
    from ultrakv.node import step_advance

    got = _buffers(rows, live, width=8, block_size=block_size, seed=rows + live)
    want = tuple(t.clone() for t in got)
    step_advance.advance(*got, block_size)
    step_advance.advance_reference(*want, block_size)
    for name, a, b in zip(("sampled", "ids", "positions", "seq_lens", "slots", "tables"), got, want, strict=True):
        assert torch.equal(a.cpu(), b.cpu()), name
    sampled, ids, positions, seq_lens, slots, _ = (t.cpu() for t in got)
    assert torch.equal(ids[:live], sampled[:live]) and torch.equal(slots[live:], torch.full((rows - live,), -1))
    assert slots[0] == -1  # past its table: writes nowhere


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_greedy_rounds_replayed_whole_equal_eager_steps():
    # Three sequences (padded to a graph of four) whose round of 16 steps crosses the first
    # context bucket (256): the replays switch graphs mid-round on the same buffers.
    from ultrakv.node import Engine, EngineConfig, SamplingParams

    prompts = [[(5 * i + 3 * j) % 200 + 1 for j in range(n)] for i, n in enumerate((250, 247, 120))]
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    outs = {}
    for graphs in (True, False):
        engine = Engine(EngineConfig(model="tiny", device="cuda", max_num_seqs=8, max_model_len=1024,
                                     num_scheduler_steps=16, use_cuda_graphs=graphs, seed=0))
        assert engine.cuda_graphs == graphs
        outs[graphs] = [o.token_ids for o in engine.generate(prompts, greedy)]
    assert outs[True] == outs[False]
