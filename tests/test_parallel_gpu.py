"""The multi-GPU paths on real CUDA devices (NCCL): run on a machine with 2 or more GPUs
(``pytest -m gpu tests/test_parallel_gpu.py``); skipped elsewhere. NVLink multicast stays
off, as the lent machines require."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from dataclasses import replace

import pytest
import torch

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

from ultrakv.node import Engine, EngineConfig, SamplingParams  # noqa: E402
from ultrakv.node.parallel.data_parallel import open_engine  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
PROMPTS = [list(range(5, 300)), [1, 2, 3], [200, 13, 77, 4, 150] * 9]


def _turns(engine, session: str = "turns") -> list[list[int]]:
    """Greedy tokens of: a batch of three (one round of graphed greedy decode steps after
    eager prefills), a batch of eight short prompts, and a returning session's two turns
    (the second a short prefill over its cached context, a prefill graph's step)."""
    out = [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    out += [o.token_ids for o in engine.generate([[i + 3, 9, 27, 81] * 3 for i in range(8)], GREEDY)]
    first = engine.generate([list(range(7, 140))], GREEDY, session_ids=[session])[0]
    second = engine.generate([[11, 12, 13, 14, 15]], GREEDY, session_ids=[session])[0]
    assert second.cached_tokens > 0
    return out + [first.token_ids, second.token_ids]


def test_tensor_parallel_over_nccl_equals_one_gpu():
    # float32 so that greedy ties cannot flip between the two summation orders.
    config = EngineConfig(model="llama-1b", device="cuda:0", dtype="float32", num_blocks=256, max_num_seqs=8)
    one = Engine(config)
    want = _turns(one)
    one.shutdown()
    del one
    torch.cuda.empty_cache()
    split = Engine(replace(config, tensor_parallel_size=2))
    try:
        assert split.cuda_graphs
        # Graphs captured as steps meet them, on both ranks in step; then all at warmup.
        assert _turns(split) == want
        kinds = {kind for kind, _, _ in split.runner.graphs.graphs}
        assert {"greedy", "prefill"} <= kinds, kinds  # greedy rounds and a turn's prefill replayed
        split.warmup()
        assert _turns(split, "after-warmup") == want
        split.generate([PROMPTS[0]], GREEDY, session_ids=["s"])
        kv = split.export_session("s").kv
        assert kv.shape[3] == 8  # every KV head, gathered over NCCL
    finally:
        split.shutdown()


def test_data_parallel_places_sessions_on_both_gpus():
    prompts = [[i + 1, 2, 3] * 10 for i in range(8)]
    config = EngineConfig(model="tiny", device="cuda:0", num_blocks=256)
    one = Engine(config)
    one.warmup()
    want = [o.token_ids for o in one.generate(prompts, GREEDY)]
    one.shutdown()
    group = open_engine(replace(config, device="cuda", gpus="2"))
    try:
        group.warmup()  # each engine's graphs captured on its own device (they came out empty on cuda:1)
        sids = [f"u{i}" for i in range(8)]
        got = [o.token_ids for o in group.generate(prompts, GREEDY, session_ids=sids)]
        assert got == want  # both GPUs give the single engine's tokens
        assert {str(e.device) for e in group.engines} == {"cuda:0", "cuda:1"}
        assert {group.gpu_of(s) for s in sids} == {"0", "1"}
        sid = sids[0]
        before = group.export_session(sid)
        dst = "1" if group.gpu_of(sid) == "0" else "0"
        assert group.move_session(sid, dst) == before.kv_tokens
        assert torch.equal(group.engines[int(dst)].export_session(sid).kv, before.kv)
        assert all(g["device"].startswith("cuda") for g in group.stats()["gpus"])
    finally:
        group.shutdown()


def test_kv_link_over_nccl_is_bit_exact():
    from ultrakv.node.parallel.kv_transfer import KVLink
    from ultrakv.node.parallel.process_group import ProcessGroup, host_store

    # NCCL needs one process per rank: rank 1 runs in a child that echoes what it gets.
    store = host_store()
    prefix = f"nccl-{uuid.uuid4().hex}"
    code = (
        "import sys, torch\n"
        "from ultrakv.node.parallel.kv_transfer import KVLink\n"
        "from ultrakv.node.parallel.process_group import ProcessGroup, join_store\n"
        "link = KVLink(ProcessGroup(join_store('127.0.0.1', int(sys.argv[1])), sys.argv[2], 1, 2,"
        " torch.device('cuda', 1)), 0)\n"
        "link.send(link.recv())\n"
    )
    peer = subprocess.Popen([sys.executable, "-c", code, str(store.port), prefix])
    try:
        link = KVLink(ProcessGroup(store, prefix, 0, 2, torch.device("cuda", 0)), 1)
        sent = torch.randn(16, 2, 2048, 8, 64, device="cuda:0").to(torch.bfloat16)
        link.send(sent)
        assert torch.equal(link.recv(), sent)
        assert peer.wait(timeout=120) == 0
    finally:
        if peer.poll() is None:
            peer.kill()
