"""Background asyncio tasks (keepalives, watches, probe and checkpoint loops): stopping one;
and a server process's stop signals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable

log = logging.getLogger("ultrakv.stop")


async def cancel_task(task: asyncio.Task | None) -> None:
    """Cancel ``task`` (if any) and wait until it has finished unwinding."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def all_of(*work: Awaitable[object]) -> None:
    """Run ``work`` together to the end, each finishing even when another fails; then raise
    the first failure, if any (a server's ports drained at once: one grace period, not one
    each)."""
    for outcome in await asyncio.gather(*work, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


# Set by a supervisor (``serve --nodes``) in its children's environment.
SUPERVISED_ENV = "ULTRAKV_SUPERVISED"


def exit_on_second_signal(loop: asyncio.AbstractEventLoop) -> None:
    """After the first SIGINT/SIGTERM began a graceful stop: a second one ends the process at
    once (exit status 130), as a second Ctrl-C does for uvicorn or vLLM, instead of being
    ignored while the grace period runs. Child processes end with it (they watch their
    parent). Not in a supervised child: there a group Ctrl-C is followed by its supervisor's
    SIGTERM, which is no second Ctrl-C (the child still drains and writes its checkpoint)."""
    if os.environ.get(SUPERVISED_ENV):
        return

    def now(sig: signal.Signals) -> None:
        log.warning("second %s: exiting now, without waiting for running requests", sig.name)
        logging.shutdown()
        os._exit(130)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, now, sig)
