"""Processes as /proc shows them, for tests that start, stop and kill real ones."""

from __future__ import annotations

from pathlib import Path


def alive(pid: int) -> bool:
    """The process runs (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def children(pid: int) -> dict[int, str]:
    """pid -> command line of every live child of ``pid``."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
                out[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().decode(
                    errors="replace").replace("\0", " ")
        except (OSError, IndexError, ValueError):
            continue  # exited while we looked
    return out
