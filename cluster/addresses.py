"""Listen addresses vs. the addresses to dial them at."""

from __future__ import annotations

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
DEFAULT_PORT = 50051  # the client-facing gRPC port of `ultrakv serve` and of a coordinator
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"  # where clients look when told nothing else


def dial_host(listen_host: str) -> str:
    """The host a local client dials to reach a server listening on ``listen_host``: loopback
    for a wildcard (every-interface) address, else the address itself."""
    return "127.0.0.1" if listen_host in WILDCARD_HOSTS else listen_host
