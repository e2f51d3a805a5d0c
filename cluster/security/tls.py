"""TLS credentials of the client port: a server certificate, and with a client CA, mutual
TLS (every client must present a certificate that CA signed)."""

from __future__ import annotations

import grpc


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{what} {path} could not be read: {exc.strerror}") from None


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials:
    """Credentials for ``add_secure_port`` from PEM files."""
    pair = [(_read(key, "security.tls_key"), _read(cert, "security.tls_cert"))]
    if client_ca:
        return grpc.ssl_server_credentials(pair, _read(client_ca, "security.tls_client_ca"),
                                           require_client_auth=True)
    return grpc.ssl_server_credentials(pair)
