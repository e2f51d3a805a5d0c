"""Listen addresses vs. the addresses to dial them at; ports checked before a server binds.

gRPC servers bind with SO_REUSEPORT by default, so a second server on a busy port starts
without complaint and the kernel splits connections between the two (one session's turns
landing on both). Every ultrakv server therefore binds with ``grpc.so_reuseport`` off
(:data:`GRPC_SERVER_OPTIONS`) and first checks the port with :func:`ensure_port_free`, whose
error names the process to stop.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import time
from pathlib import Path

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
DEFAULT_PORT = 50051  # the client-facing gRPC port of `ultrakv serve` and of a coordinator
DEFAULT_ADDRESS = f"127.0.0.1:{DEFAULT_PORT}"  # where clients look when told nothing else
MAX_PORT = 65535
GRPC_SERVER_OPTIONS = (("grpc.so_reuseport", 0),)  # a busy port fails the bind
PORT_SETTLE_S = 5.0  # how long a port held by a socket that does not listen is waited for


class PortInUseError(OSError):
    """The port a server was told to listen on is taken; the message names the holder."""


def dial_host(listen_host: str) -> str:
    """The host a local client dials to reach a server listening on ``listen_host``: loopback
    for a wildcard (every-interface) address, else the address itself."""
    return "127.0.0.1" if listen_host in WILDCARD_HOSTS else listen_host


def listen_address(host: str, port: int) -> str:
    """``host:port`` as the socket is bound (``0.0.0.0:50051`` = every interface)."""
    host = host or "0.0.0.0"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def validate_port(port: int, name: str = "port", zero: str = "pick a free one") -> int:
    """``port`` if it is in [1, 65535] or 0 (meaning ``zero``); ValueError naming ``name``."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= MAX_PORT:
        raise ValueError(f"{name} must be in [1, {MAX_PORT}] (or 0 = {zero}), got {port!r}")
    return port


def ensure_port_free(host: str, port: int, what: str = "server",
                     settle_s: float = PORT_SETTLE_S) -> None:
    """Raise :class:`PortInUseError` when ``host:port`` (TCP) cannot be bound because
    another socket listens there; a no-op for port 0. The message names the port and,
    where /proc shows it, the process holding it.

    A port held by a socket that does not listen is waited for, up to ``settle_s``: a
    server restarted on its old port finds it briefly taken by a client's connection (one
    that drew the port as its ephemeral source port, or a client retrying the dead server's
    port that connected to itself), which lets go within moments."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in (host or "") else socket.AF_INET
    deadline = time.monotonic() + settle_s
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR as gRPC itself sets it: connections in TIME_WAIT do not count, a
            # listener does (even one bound with SO_REUSEPORT, since the probe does not set it).
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host or "0.0.0.0", port))
                return
            except OSError as exc:
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise OSError(f"{what} cannot listen on {host}: no network interface of this "
                                             f"machine has that address ({exc.strerror}); give --host an "
                                             "address of this machine, or 0.0.0.0 for all") from None
                if exc.errno != errno.EADDRINUSE:
                    raise
        if _listening_inodes(port) or time.monotonic() >= deadline:
            raise PortInUseError(port_in_use_message(host, port, what))
        time.sleep(0.1)


def port_in_use_message(host: str, port: int, what: str) -> str:
    """The error for a busy port: which port, who holds it, what to do."""
    holder = listener_process(port)
    if holder is None:
        who = "another process"
        stop = "stop it"
    else:
        pid, command = holder
        who = f"process {pid} ({command})" if command else f"process {pid}"
        stop = f"stop it (`kill {pid}`, or `ultrakv stop` if it is an `ultrakv serve --detach`)"
    return (f"{what} cannot listen on {listen_address(host, port)}: port {port} is already "
            f"in use by {who}; {stop} or choose another port")


def listener_process(port: int) -> tuple[int, str] | None:
    """(pid, command line) of a process listening on TCP ``port``, from /proc (Linux; only
    processes whose file descriptors this user may read); None when not found."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
                    command = " ".join(command.decode(errors="replace").split())
                    return int(proc.name), command[:117] + "..." if len(command) > 120 else command
        except OSError:
            continue  # exited, or not ours to read
    return None


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes
def is_loopback(listen_host: str) -> bool:
    """Whether a server listening on ``listen_host`` is reachable from this machine only."""
    if listen_host == "localhost":
        return True
    try:
        return ipaddress.ip_address(listen_host).is_loopback
    except ValueError:
        return False  # a wildcard or a host name: assume it is reachable from outside


def check_server_ports(host: str, port: int, metrics_port: int, http_port: int, what: str) -> None:
    """Validate a server's ports and refuse any that is taken, before anything starts: the
    gRPC ``port`` (named ``what`` in errors), and the metrics and HTTP ports when on (not 0)."""
    validate_port(port)
    validate_port(metrics_port, "metrics_port", zero="off")
    ensure_port_free(host, port, what)
    if metrics_port:
        ensure_port_free(host, metrics_port, "metrics endpoint")
    validate_port(http_port, "http_port", zero="off")
    if http_port:
        ensure_port_free(host, http_port, "HTTP API")
