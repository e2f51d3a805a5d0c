"""The ultrakv node: an LLM engine over a paged KV cache with prefix reuse and sessions.

The names below load on first use (PEP 562), so that importing a light submodule such as
``ultrakv.node.config`` does not pull in the engine and, through it, PyTorch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ultrakv.cluster.session_state import SessionState
    from ultrakv.node.config import EngineConfig
    from ultrakv.node.engine import Engine
    from ultrakv.node.outputs import GenerateRequest, RequestOutput, SessionInfo, StreamDelta
    from ultrakv.node.sampling_params import Priority, SamplingParams

_HOMES = {
    "Engine": "ultrakv.node.engine",
    "EngineConfig": "ultrakv.node.config",
    "GenerateRequest": "ultrakv.node.outputs",
    "Priority": "ultrakv.node.sampling_params",
    "RequestOutput": "ultrakv.node.outputs",
    "SamplingParams": "ultrakv.node.sampling_params",
    "SessionInfo": "ultrakv.node.outputs",
    "SessionState": "ultrakv.cluster.session_state",
    "StreamDelta": "ultrakv.node.outputs",
}

__all__ = ["Engine", "EngineConfig", "GenerateRequest", "Priority", "RequestOutput", "SamplingParams",
           "SessionInfo", "SessionState", "StreamDelta"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'ultrakv.node' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
