"""Ports: a busy port is refused with the holder named (gRPC's SO_REUSEPORT would otherwise
share it), out-of-range ports are refused, and logs name the address actually bound."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from prometheus_client.registry import CollectorRegistry
from ultrakv.client.cli import main
from ultrakv.cluster.addresses import PortInUseError, ensure_port_free, validate_port
from ultrakv.cluster.metrics_http import serve_metrics
from ultrakv.coordinator.server import CoordinatorServer, CoordinatorSettings
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.server import BackgroundServer, NodeServer, ServerSettings


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    engine = Engine(EngineConfig(model="tiny", device="cpu", num_blocks=16))
    yield engine
    engine.shutdown()


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port held the way a gRPC server holds one: listening, with SO_REUSEPORT."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield s.getsockname()[1]


def test_validate_port_names_the_range() -> None:
    assert [validate_port(p) for p in (0, 1, 65535)] == [0, 1, 65535]
    for bad in (-1, 65536, 99999, True, "50051"):
        with pytest.raises(ValueError, match=r"port must be in \[1, 65535\] \(or 0 = pick a free one\)"):
            validate_port(bad)


@pytest.mark.parametrize("argv", [["serve", "--port", "99999"], ["node", "--port", "-1"],
                                  ["coordinator", "--etcd", "127.0.0.1:2379", "--port", "65536"],
                                  ["serve", "--metrics-port", "70000"]])
def test_cli_refuses_out_of_range_ports(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "must be in [1, 65535]" in capsys.readouterr().err


def test_a_second_node_server_on_a_busy_port_is_refused(engine) -> None:
    with BackgroundServer(engine) as first:
        port = int(first.address.rsplit(":", 1)[1])
        second = NodeServer(engine, ServerSettings(host="127.0.0.1", port=port))
        with pytest.raises(PortInUseError) as exc:
            asyncio.run(second.start())
    message = str(exc.value)
    assert f"port {port} is already in use by process {os.getpid()}" in message
    assert "choose another port" in message


def test_the_coordinator_refuses_a_busy_port_before_contacting_etcd(busy_port) -> None:
    server = CoordinatorServer(CoordinatorSettings(etcd="127.0.0.1:1", host="0.0.0.0",
                                                   port=busy_port))
    with pytest.raises(PortInUseError, match=f"port {busy_port} is already in use by process "
                                             f"{os.getpid()}"):
        asyncio.run(server.start())


def test_the_metrics_port_is_checked_too(engine, busy_port) -> None:
    server = NodeServer(engine, ServerSettings(host="127.0.0.1", port=0, metrics_port=busy_port))
    with pytest.raises(PortInUseError, match=f"metrics endpoint cannot listen on "
                                             f"127.0.0.1:{busy_port}"):
        asyncio.run(server.start())


def test_ultrakv_serve_on_a_busy_port_exits_naming_the_holder(busy_port) -> None:
    out = subprocess.run([sys.executable, "-m", "ultrakv.client.cli", "serve", "--port",
                          str(busy_port)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"port {busy_port} is already in use by process {os.getpid()}" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_host_address_this_machine_lacks_is_named_with_the_flag(capsys) -> None:
    # `serve --host 1.2.3.4` said only "[Errno 99] Cannot assign requested address".
    assert main(["serve", "--host", "192.0.2.1", "--model", "tiny", "--port", "50999"]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 192.0.2.1: no network interface of this machine has that address" in err
    assert "--host" in err and "Errno" not in err


def test_a_free_port_passes_and_port_zero_is_not_checked() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ensure_port_free("127.0.0.1", port)
    ensure_port_free("127.0.0.1", 0)


def test_a_port_held_by_a_socket_that_does_not_listen_is_waited_for() -> None:
    """A restarted server finds its old port briefly held by a client connection (not a
    listener): it waits for the port rather than refusing it; a holder that never lets go
    is refused after ``settle_s``, and a listener at once (the tests above)."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # bound, not listening: what a connecting client holds
    port = holder.getsockname()[1]
    with pytest.raises(PortInUseError, match=f"port {port} is already in use"):
        ensure_port_free("127.0.0.1", port, settle_s=0.3)
    threading.Timer(0.5, holder.close).start()
    ensure_port_free("127.0.0.1", port, settle_s=30.0)  # returns once the holder let go


def test_logs_name_the_address_bound(engine, caplog) -> None:
    async def addresses() -> tuple[int, str, str]:
        server = NodeServer(engine, ServerSettings(host="0.0.0.0", port=0))
        port = await server.start()
        await server.stop()
        return port, server.listen_address, server.address

    port, bound, dial = asyncio.run(addresses())
    assert (bound, dial) == (f"0.0.0.0:{port}", f"127.0.0.1:{port}")  # dial: local clients
    with caplog.at_level(logging.INFO, logger="ultrakv.metrics"):
        http = serve_metrics(0, CollectorRegistry(), "0.0.0.0")
    try:
        assert f"http://0.0.0.0:{http.server_port}/metrics" in caplog.text
    finally:
        http.shutdown()
        http.server_close()
