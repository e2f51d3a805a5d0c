"""Tensor parallelism with the fused Triton kernels: a one-token step (decode at batch 1)
runs the GEMV path, all-reducing the output and down projections' partial sums, and gives
the single-process engine's greedy tokens. Rank 0's path is counted; the worker runs the
same model code on the same step (its all-reduces must meet rank 0's).

On a 2-GPU machine ``tests/test_parallel_gpu.py`` checks this with NCCL and CUDA graphs.
Elsewhere, where Triton is installed, the first test runs this file again in a subprocess
under Triton's CPU interpreter (``TRITON_INTERPRET=1``, inherited by the worker rank), with
two gloo ranks on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from triton_interpreter import INTERPRETING, assert_passes_under_interpreter, triton_importable
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.model.llama import DecoderLayer

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.mark.skipif(torch.cuda.is_available() or INTERPRETING, reason="runs only to start the interpreter run")
@pytest.mark.skipif(not triton_importable(), reason="Triton is not installed")
@pytest.mark.timeout(600)
def test_under_the_triton_interpreter():
    assert_passes_under_interpreter(__file__, at_least=1)


@pytest.mark.skipif(not INTERPRETING, reason="runs under Triton's CPU interpreter (see the first test)")
def test_one_token_steps_take_the_gemv_path_on_every_rank(monkeypatch, tmp_path):
    one_token_steps = []
    original = DecoderLayer._forward_one_token

    def counted(self, *args, **kwargs):
        one_token_steps.append(self.self_attn.all_reduce is not None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DecoderLayer, "_forward_one_token", counted)
    # float32 on a CPU would run through oneDNN's packed weights, which the GEMVs cannot read
    # (tensor-parallel ranks never pack): the single engine keeps dense weights too.
    monkeypatch.setattr("ultrakv.node.engine.packing_available", lambda *_: False)
    config = EngineConfig(model="tiny", device="cpu", dtype="float32", num_blocks=64, fused_kernels=True,
                          num_scheduler_steps=2)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 1, 4, 1, 5]]
    single = Engine(config)
    try:
        want = [single.generate([p], GREEDY)[0].token_ids for p in prompts]  # batch 1: one token a step
    finally:
        single.shutdown()
    assert one_token_steps and not any(one_token_steps)
    one_token_steps.clear()
    # The worker rank runs the kernels under the interpreter too, with the same fix-up of it
    # (tests/triton_interpreter.py) that this process has: a sitecustomize imports it there.
    (tmp_path / "sitecustomize.py").write_text("import triton_interpreter  # noqa: F401\n")
    path = [str(tmp_path), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    split = Engine(EngineConfig(**{**config.__dict__, "tensor_parallel_size": 2}))
    try:
        got = [split.generate([p], GREEDY)[0].token_ids for p in prompts]
    finally:
        split.shutdown()
    # Rank 0 took the GEMV path with its all-reduces (the worker mirrors every step).
    assert one_token_steps and all(one_token_steps)
    assert got == want
