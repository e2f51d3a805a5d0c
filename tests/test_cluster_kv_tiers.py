"""The KV cache survives a node restart (issue 14): a node process stopped with SIGTERM and
started again on the same data directory answers a returning session's next turn with its
history cached, and a stateless request with a prefix it saw before hits its disk tier."""

from __future__ import annotations

import signal

import pytest
from ultrakv.client import Client
from ultrakv.client.local_cluster import ClusterSpec, LocalCluster
from ultrakv.cluster.etcd_server import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

BS = 16
SESSION_TEXT = "The quick brown fox jumps over the lazy dog while the cat watches it. " * 2
PREFIX = "A shared system prompt that many stateless requests begin with, word for word. " * 2


def _ask(client: Client, text: str, session: str | None = None) -> dict:
    request = {"text": text, "max_length": 4, "temperature": 0.0}
    if session:
        request["session_id"] = session
    result = client.process_request(request)
    assert result["success"], result
    return result


def test_restarted_node_keeps_its_cache_on_disk(tmp_path):
    spec = ClusterSpec(nodes=1, coordinators=1, data_dir=tmp_path, port=0, device="cpu",
                       num_blocks=64, checkpoint_interval_s=3600.0, log_dir=tmp_path / "logs",
                       node_args=["--kv-disk-dir", str(tmp_path / "kv-tier")])
    with LocalCluster(spec) as cluster:
        (node,) = cluster.nodes
        with Client(cluster.address, timeout=120) as client:
            _ask(client, SESSION_TEXT, "s1")
            assert _ask(client, PREFIX + "first question?")["cached_tokens"] == 0
        cluster.kill_node(node, signal.SIGTERM)  # final checkpoint; the tier persists its blocks
        assert list((tmp_path / "kv-tier").rglob("*.kvb"))
        cluster.start_node(node, port=free_port())
        cluster.wait_ready(1)
        with Client(cluster.address, timeout=120) as client:
            turn = _ask(client, " And then?", "s1")
            stateless = _ask(client, PREFIX + "second question?")
            totals = client.stats()["totals"]
    assert totals["cache_disk_hits"] >= (1 + len(PREFIX)) // BS
    # The byte tokenizer: one token per byte plus BOS. Every full block of the first turn's
    # prompt is cached; the stateless prefix can only have come from the disk tier (the
    # pool is new and the checkpoint holds only the session).
    assert turn["cached_tokens"] >= (1 + len(SESSION_TEXT)) // BS * BS
    assert stateless["cached_tokens"] >= (1 + len(PREFIX)) // BS * BS
