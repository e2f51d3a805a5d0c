"""Tensor parallelism with the fused Triton kernels: a one-token step (decode at batch 1)
runs the GEMV path on every rank, all-reducing the output and down projections' partial sums,
and gives the single-process engine's greedy tokens.

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
# Imported at the worker rank's start: the interpreter's fix-up, and a count of the one-token
# layer passes the worker makes with its all-reduces ("1" each) or without them ("0").
SITECUSTOMIZE = """
import triton_interpreter  # noqa: F401
from ultrakv.node.model.llama import DecoderLayer

_original = DecoderLayer._forward_one_token


def _counted(self, *args, **kwargs):
    with open({path!r}, "a") as f:
        f.write("1" if self.self_attn.all_reduce is not None else "0")
    return _original(self, *args, **kwargs)


DecoderLayer._forward_one_token = _counted
"""


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
    # (tests/triton_interpreter.py) that this process has: a sitecustomize imports it there,
    # and counts the worker's one-token layer passes in a file, as this process counts its own.
    worker_steps = tmp_path / "worker_steps"
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE.format(path=str(worker_steps)))
    path = [str(tmp_path), str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in path if p))
    split = Engine(EngineConfig(**{**config.__dict__, "tensor_parallel_size": 2}))
    try:
        got = [split.generate([p], GREEDY)[0].token_ids for p in prompts]
    finally:
        split.shutdown()
    # Both ranks took the GEMV path with its all-reduces, as often as each other.
    assert one_token_steps and all(one_token_steps)
    assert worker_steps.read_text() == "1" * len(one_token_steps)
    assert got == want
