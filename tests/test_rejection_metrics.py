"""Requests refused at the edge show in /metrics by reason."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request

import pytest
from ultrakv.client import Client
from ultrakv.cluster.etcd_server import free_port
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.server import BackgroundServer, ServerSettings


def _rejected(text: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in
            re.findall(r'^ultrakv_rejected_requests_total\{reason="(\w+)"\} (\S+)$', text, re.M)}


def test_rejections_are_counted_by_reason() -> None:
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=32))
    port = free_port()
    http = free_port()
    settings = ServerSettings(host="127.0.0.1", port=0, grace_period_s=0.2, metrics_port=port,
                              http_port=http)

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            return _rejected(resp.read().decode())

    try:
        with BackgroundServer(engine, settings) as srv, Client(srv.address) as client:
            before = scrape()
            assert not client.process_request({"text": "hi", "max_length": 0})["success"]
            batch = client.process_batch([{"text": "a", "max_length": 0},
                                          {"text": "b", "max_length": 2}])
            assert [r["success"] for r in batch] == [False, True]
            assert not client.process_request({"text": "x" * 10_000_000})["success"]
            request = urllib.request.Request(  # the HTTP API's rejections count too
                f"http://127.0.0.1:{http}/v1/completions", method="POST",
                data=json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 0}).encode(),
                headers={"content-type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=30)
            assert refused.value.code == 400
            after = scrape()
    finally:
        engine.shutdown()
    assert after.get("invalid_argument", 0) - before.get("invalid_argument", 0) == 3
    assert after.get("resource_exhausted", 0) - before.get("resource_exhausted", 0) >= 1
