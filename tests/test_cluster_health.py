"""Health: the pure up/down state machine, and the probe loop against a real gRPC server."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from ultrakv.cluster.etcd_server import free_port
from ultrakv.coordinator.health import (
    Health,
    HealthChecker,
    HealthPolicy,
    HealthTracker,
    Transition,
)


def test_k_misses_make_a_node_down() -> None:
    t = HealthTracker(HealthPolicy(down_after=3, up_after=2))
    assert t.status("n") is Health.UNKNOWN
    assert t.observe("n", True) == Transition("n", Health.UNKNOWN, Health.UP, "1 successful probes")
    assert t.observe("n", False) is None
    assert t.observe("n", False) is None
    assert t.status("n") is Health.UP
    down = t.observe("n", False)
    assert down is not None and down.new is Health.DOWN and down.reason == "3 missed probes"
    assert t.observe("n", False) is None  # already down: no repeated transition


def test_a_success_resets_the_miss_count() -> None:
    t = HealthTracker(HealthPolicy(down_after=2, up_after=2))
    t.observe("n", True)
    for _ in range(5):
        assert t.observe("n", False) is None
        assert t.observe("n", True) is None
    assert t.status("n") is Health.UP


def test_hysteresis_before_up_again() -> None:
    t = HealthTracker(HealthPolicy(down_after=1, up_after=3))
    t.observe("n", True)
    t.observe("n", False)
    assert t.status("n") is Health.DOWN
    assert t.observe("n", True) is None
    assert t.observe("n", False) is None  # a flap restarts the count
    assert t.observe("n", True) is None
    assert t.observe("n", True) is None
    up = t.observe("n", True)
    assert up is not None and up.old is Health.DOWN and up.new is Health.UP
    assert t.up_nodes() == {"n"}


def test_lease_expiry_is_down_at_once_and_needs_hysteresis() -> None:
    t = HealthTracker(HealthPolicy(down_after=3, up_after=2))
    t.observe("n", True)
    expired = t.lease_expired("n")
    assert expired is not None and expired.new is Health.DOWN and expired.reason == "lease expired"
    assert t.observe("n", True) is None
    assert t.observe("n", True) is not None and t.status("n") is Health.UP


def test_policy_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="down_after must be >= 1, got 0"):
        HealthPolicy(down_after=0)
    with pytest.raises(ValueError, match=r"timeout_s must be in \(0, interval_s=0.1\], got 0.5"):
        HealthPolicy(interval_s=0.1, timeout_s=0.5)


async def _health_server(port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def test_loop_detects_death_and_recovery_of_a_real_server(caplog) -> None:
    """Also: a node lost is logged at WARNING, routine transitions (joined, back) at INFO."""
    caplog.set_level(logging.INFO, logger="ultrakv.coordinator.health")
    port = free_port()
    policy = HealthPolicy(interval_s=0.1, timeout_s=0.1, down_after=3, up_after=2)
    seen: list[Transition] = []
    checker = HealthChecker(policy, on_transition=seen.append)
    checker.set_targets({"node-1": f"127.0.0.1:{port}"})
    server = await _health_server(port)
    checker.start()
    try:

        async def until(status: Health) -> None:
            while checker.status("node-1") is not status:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(until(Health.UP), 5)
        await server.stop(grace=None)  # the node dies
        await asyncio.wait_for(until(Health.DOWN), 5)
        server = await _health_server(port)  # and comes back on the same address
        await asyncio.wait_for(until(Health.UP), 10)
        assert [(t.old, t.new) for t in seen] == [
            (Health.UNKNOWN, Health.UP),
            (Health.UP, Health.DOWN),
            (Health.DOWN, Health.UP),
        ]
        assert seen[1].reason == "3 missed probes"
        assert seen[2].reason == "2 successful probes"
        logged = [r.levelno for r in caplog.records if " -> " in r.getMessage()]
        assert logged == [logging.INFO, logging.WARNING, logging.INFO]
    finally:
        await checker.stop()
        await server.stop(grace=None)


async def test_not_serving_counts_as_a_miss() -> None:
    port = free_port()
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    checker = HealthChecker(HealthPolicy(interval_s=0.1, timeout_s=0.1, down_after=2))
    checker.set_targets({"n": f"127.0.0.1:{port}"})
    try:
        assert not await checker.probe(f"127.0.0.1:{port}")
        await checker.check_once()
        transitions = await checker.check_once()
        assert [t.new for t in transitions] == [Health.DOWN]
        checker.set_targets({})
        assert checker.status("n") is Health.UNKNOWN  # forgotten once it left
    finally:
        await checker.stop()
        await server.stop(grace=None)
