"""grpc.health.v1: List answers (reflection advertises it), and a client's call to a method
that does not exist is refused without an error logged on the server."""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.server import BackgroundServer


@pytest.fixture(scope="module")
def address():
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=16))
    with BackgroundServer(engine) as srv:
        yield srv.address
    engine.shutdown()


def test_list_reports_every_service(address, caplog):
    with caplog.at_level(logging.INFO), grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(),
                                                          timeout=30)
    serving = health_pb2.HealthCheckResponse.SERVING
    assert {name: s.status for name, s in reply.statuses.items()} == {
        "": serving, "ultrakv.v1.UltraKV": serving, "ultrakv.v1.NodeService": serving}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_missing_method_is_unimplemented_without_a_logged_error(address, caplog):
    with caplog.at_level(logging.INFO), grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/ultrakv.v1.UltraKV/NoSuchMethod")(b"", timeout=30)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
