"""Session KV moved over torch.distributed point-to-point between two processes (gloo on
CPU): the history goes by the control plane (the store stands in for gRPC here), the KV over
the link, and arrives bit-exact; every KV dtype crosses unchanged."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.parallel.kv_transfer import KVLink, send_session
from ultrakv.node.parallel.process_group import ProcessGroup, host_store

PEER = Path(__file__).with_name("kv_transfer_peer.py")


@pytest.fixture(scope="module")
def moved():
    """A session sent from this process to a peer process; yields (sent state, our KV,
    the KV the peer holds after the move, the peer's report, the link)."""
    store = host_store()
    prefix = f"kv-{uuid.uuid4().hex}"
    peer = subprocess.Popen([sys.executable, str(PEER), str(store.port), prefix])
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=64))
    try:
        engine.generate([list(range(60, 120))], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
                        session_ids=["p2p"])
        want = engine.export_session("p2p")
        link = KVLink(ProcessGroup(store, prefix, 0, 2, torch.device("cpu"), timeout_s=120), 1)

        def control(state):
            store.set(f"{prefix}/state", json.dumps(dataclasses.asdict(state)))

        sent = send_session(engine, "p2p", link, control)
        back = link.recv()
        report = json.loads(store.get(f"{prefix}/result"))
        yield sent, want.kv, back, report, link
        link.send(torch.empty(0))
        assert peer.wait(timeout=60) == 0
    finally:
        if peer.poll() is None:
            peer.kill()
        engine.shutdown()


@pytest.mark.cluster
def test_a_session_moves_between_processes_with_its_kv_bit_exact(moved):
    sent, want, back, report, _ = moved
    assert sent.kv is None and sent.kv_tokens == 64  # the control plane carries no KV
    assert report["taken"] == 64 and torch.equal(back, want)
    assert report["cached"] == 64  # the peer's next turn runs on the moved cache


@pytest.mark.cluster
def test_every_kv_dtype_crosses_unchanged(moved):
    link = moved[4]
    for dtype in (torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn):
        sent = torch.randn(2, 2, 32, 2, 16).to(dtype)
        link.send(sent)
        got = link.recv()
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), sent.view(torch.uint8))
    with pytest.raises(ValueError, match=r"peer must be another rank in \[0, 1\], got 0"):
        KVLink(link.group, 0)
