"""Background asyncio tasks (keepalives, watches, probe and checkpoint loops): stopping one."""

from __future__ import annotations

import asyncio
import contextlib


async def cancel_task(task: asyncio.Task | None) -> None:
    """Cancel ``task`` (if any) and wait until it has finished unwinding."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
