"""The ultrakv node: an LLM engine over a paged KV cache with prefix reuse and sessions."""

from ultrakv.cluster.session_state import SessionState
from ultrakv.node.config import EngineConfig
from ultrakv.node.engine import Engine
from ultrakv.node.outputs import (
    GenerateRequest,
    RequestOutput,
    SessionInfo,
    StreamDelta,
)
from ultrakv.node.sampling_params import Priority, SamplingParams

__all__ = [
    "Engine",
    "EngineConfig",
    "GenerateRequest",
    "Priority",
    "RequestOutput",
    "SamplingParams",
    "SessionInfo",
    "SessionState",
    "StreamDelta",
]
