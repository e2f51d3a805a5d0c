"""One engine request run to its end, for tests that need a request's own fields (a
``GenerateRequest``) rather than ``Engine.generate``'s prompts."""

from __future__ import annotations

import asyncio

from ultrakv.node import Engine, GenerateRequest
from ultrakv.node.outputs import RequestOutput


def run_to_end(engine: Engine, request: GenerateRequest) -> RequestOutput:
    """``request`` streamed through ``engine``; its finished output."""
    async def collect() -> RequestOutput:
        async for delta in engine.stream(request):
            if delta.finished:
                return delta.output

    return asyncio.run(collect())
