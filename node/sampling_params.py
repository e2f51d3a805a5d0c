"""Per-request sampling parameters, validated where they are built."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import IntEnum

from ultrakv.cluster.validation import (
    STOP_SEQUENCE_MAX_BYTES,
    STOP_SEQUENCES_MAX,
    STOP_TOKEN_IDS_MAX,
)


class Priority(IntEnum):
    """Admission priority; a lower value is served first. Aging lifts waiting requests."""

    CRITICAL = 0
    HIGH = 1
    NORMAL = 2
    LOW = 3


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k == 0`` disables top-k."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    # stop_token_ids as a set: looked up once per generated token.
    stop_token_set: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        if (
            not isinstance(self.temperature, (int, float))
            or math.isnan(self.temperature)
            or self.temperature < 0
        ):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if math.isinf(self.temperature):
            raise ValueError(f"temperature must be finite, got {self.temperature!r}")
        if (
            not isinstance(self.top_p, (int, float))
            or math.isnan(self.top_p)
            or not (0.0 < self.top_p <= 1.0)
        ):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(
                f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}"
            )
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if len(self.stop_token_ids) > STOP_TOKEN_IDS_MAX:
            raise ValueError(f"stop_token_ids must hold at most {STOP_TOKEN_IDS_MAX} ids, "
                             f"got {len(self.stop_token_ids)}")
        if len(self.stop) > STOP_SEQUENCES_MAX:
            raise ValueError(f"stop must hold at most {STOP_SEQUENCES_MAX} sequences, got {len(self.stop)}")
        longest = max((len(s.encode("utf-8")) for s in self.stop), default=0)
        if longest > STOP_SEQUENCE_MAX_BYTES:
            raise ValueError(f"stop must hold sequences of at most {STOP_SEQUENCE_MAX_BYTES} bytes, "
                             f"got {longest}")
        self.stop_token_set = frozenset(self.stop_token_ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
