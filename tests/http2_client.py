"""Test helper: a raw HTTP/2 client (the ``h2`` library over a plain socket) that does what a
gRPC library never would: pings as often as it likes and opens more streams than the server
allows. It shows what the server itself enforces, not what a polite client respects."""

from __future__ import annotations

import socket
import time

import h2.config
import h2.connection
import h2.events
from h2.settings import SettingCodes


class RawHttp2:
    """One HTTP/2 connection to a gRPC server on loopback (``with RawHttp2(addr) as c:``)."""

    def __init__(self, address: str, timeout_s: float = 10.0) -> None:
        host, port = address.rsplit(":", 1)
        self.address = address
        self.sock = socket.create_connection((host, int(port)), timeout=timeout_s)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.events: list[h2.events.Event] = []
        self.read_until(lambda events: any(isinstance(e, h2.events.RemoteSettingsChanged)
                                           for e in events))

    def __enter__(self) -> RawHttp2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    @property
    def server_max_concurrent_streams(self) -> int:
        return self.conn.remote_settings.max_concurrent_streams

    def read_until(self, done, timeout_s: float = 10.0) -> list[h2.events.Event]:
        """Read and answer frames until ``done(events so far)``, the server closes the socket,
        or ``timeout_s`` passes; returns every event so far."""
        deadline = time.monotonic() + timeout_s
        while not done(self.events) and self.terminated() is None:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            self.events += self.conn.receive_data(data)
            if self.conn.state_machine.state is not h2.connection.ConnectionState.CLOSED:
                self.sock.sendall(self.conn.data_to_send())
        return self.events

    def count(self, kind: type) -> int:
        return sum(isinstance(e, kind) for e in self.events)

    def ping(self) -> None:
        self.conn.ping(time.monotonic_ns().to_bytes(8, "big"))
        self.sock.sendall(self.conn.data_to_send())

    def terminated(self) -> h2.events.ConnectionTerminated | None:
        """The server's GOAWAY, if one came."""
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    def open_streams(self, path: str, count: int) -> list[int]:
        """Open ``count`` gRPC calls to ``path`` (headers only, no message: each stays open
        waiting for its request), whatever the server's stream limit; their stream ids."""
        self.conn.remote_settings[SettingCodes.MAX_CONCURRENT_STREAMS] = 1 << 30  # ignore it
        self.conn.remote_settings.acknowledge()
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
                   (":authority", self.address), ("content-type", "application/grpc"),
                   ("te", "trailers")]
        ids = []
        for _ in range(count):
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(stream_id, headers)
            ids.append(stream_id)
        self.sock.sendall(self.conn.data_to_send())
        return ids



def ping_flood(address: str, pings: int = 10) -> tuple[int, h2.events.ConnectionTerminated | None]:
    """Ping ``address`` back to back on a connection with no call, each ping once the last
    was answered: how many the server answered, and its GOAWAY (None if it sent none)."""
    with RawHttp2(address) as client:
        for sent in range(1, pings + 1):
            client.ping()
            client.read_until(lambda _, n=sent: client.count(h2.events.PingAckReceived) >= n)
            if client.terminated() is not None:
                break
        return client.count(h2.events.PingAckReceived), client.terminated()
