"""The receiving end of tests/test_parallel_kv_transfer.py, as its own process (rank 1 of a
gloo group): takes a session whose history comes through the store (the control plane's
stand-in) and whose KV comes over the link, sends its KV back for comparison, then echoes
tensors until it gets an empty one."""

from __future__ import annotations

import json
import sys

import torch
from ultrakv.cluster.session_state import SessionState
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.parallel.kv_transfer import KVLink, receive_session
from ultrakv.node.parallel.process_group import ProcessGroup, join_store


def main() -> None:
    port, prefix = int(sys.argv[1]), sys.argv[2]
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=64))
    store = join_store("127.0.0.1", port)
    link = KVLink(ProcessGroup(store, prefix, 1, 2, torch.device("cpu")), 0)
    state = SessionState(**json.loads(store.get(f"{prefix}/state")))
    taken = receive_session(engine, state, link)
    link.send(engine.export_session(state.session_id).kv)
    turn = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                           session_ids=[state.session_id])[0]
    store.set(f"{prefix}/result", json.dumps({"taken": taken, "cached": turn.cached_tokens}))
    while (t := link.recv()).numel():
        link.send(t)
    engine.shutdown()


if __name__ == "__main__":
    main()
