"""Connection limits every ultrakv gRPC server applies (nodes, coordinators, `serve`):
keepalive pings that find dead or vanished clients, a cap on concurrent streams per
connection, and a limit on how long a connection with no call may stay open. (An open
Generate stream that sends no request is closed by the service itself, after
``Limits.stream_idle_timeout_s``: cluster/service.py.)"""

from __future__ import annotations

from ultrakv.cluster.addresses import is_loopback

KEEPALIVE_TIME_MS = 30_000  # ping a quiet connection this often...
KEEPALIVE_TIMEOUT_MS = 10_000  # ...and drop it when the ping goes unanswered this long
MIN_CLIENT_PING_INTERVAL_MS = 10_000  # a client pinging more often is cut off (GOAWAY)
MAX_CONNECTION_IDLE_MS = 600_000  # a connection with no call for 10 minutes is closed


def server_options(max_concurrent_streams: int, max_message_bytes: int | None = None
                   ) -> list[tuple[str, int]]:
    """``grpc.aio.server`` options. ``max_concurrent_streams`` bounds the calls one
    connection may hold open at once (a node's coordinator multiplexes every forwarded
    request over one connection, so nodes allow more than a client port does)."""
    options = [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_concurrent_streams", max_concurrent_streams),
        ("grpc.max_connection_idle_ms", MAX_CONNECTION_IDLE_MS),
    ]
    if max_message_bytes is not None:
        options += [("grpc.max_receive_message_length", max_message_bytes),
                    ("grpc.max_send_message_length", max_message_bytes)]
    return options


def exposure_warnings(host: str, port: int, *, clients_authenticated: bool, tls: bool,
                      internal_open: bool = False) -> list[str]:
    """What to say loudly when a server listens beyond loopback unprotected: no caller
    authentication (API keys, or the cluster secret on a member node), no TLS, or an
    internal NodeService anyone may call. Empty on loopback."""
    if is_loopback(host):
        return []
    where = f"{host or '0.0.0.0'}:{port}"
    warnings = []
    if internal_open:
        warnings.append(f"SECURITY: listening on {where} with no cluster secret and no peer "
                        "TLS: anyone who reaches this port can read, overwrite and delete every "
                        "session (NodeService); give --cluster-secret-file, or bind 127.0.0.1")
    if not clients_authenticated:
        warnings.append(f"SECURITY: listening on {where} without authentication: anyone who "
                        "reaches this port can use it (configure API keys: --keys-file)")
    if not tls:
        warnings.append(f"SECURITY: listening on {where} without TLS: prompts and outputs "
                        "cross the network in plain text")
    return warnings
