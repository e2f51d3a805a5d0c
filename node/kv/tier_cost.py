"""Load or recompute: whether bringing a request's hit blocks back from the KV tiers beats
computing them again.

A tier hit is only worth having when loading it is faster than the prefill it saves: on a
GPU a small model prefills a 16-token block in well under a millisecond, while a disk read
of the block (512 KiB on llama-1b) can take longer. :class:`TierCostModel` keeps two online
estimates, each an exponentially weighted moving average of real measurements: the
bandwidth of each load source (bytes per second; ``memory``: a block already in host memory
copied into the pool; ``disk``: a block read from its file, which then also costs a
``memory`` copy), the engine thread's own time per loaded block (looking it up, issuing the
copies: on a GPU, whose copies are asynchronous, this is most of what a load costs the
request, and nothing else measures it), and this engine's prefill cost per token. For the leading
run of hit blocks a prefix match found, :meth:`TierCostModel.blocks_to_load` picks how many
to load so that the estimated load time of those plus the recompute time of the rest is
least; the rest is recomputed (``KVTiers`` counts those blocks as ``skipped``).

The prefill cost is the marginal one: a step's time is fitted as ``a + b * tokens`` by least
squares over the recent steps (weighted like the averages), and recomputing a block costs
``b * block_tokens``. A step's fixed part ``a`` (launches, sampling, the Python around it) is
paid whether the hit is loaded or not; counting it per token, as tokens / seconds of small
steps would, made recomputing look several times dearer than it is (on CPU, a 64-token step
took 3 ms, a 350-token one 5 ms). Until the steps vary in size enough to fit a slope, the
mean time per token stands in (never below the slope while ``a`` >= 0), and the slope is
kept within a quarter of that mean and the mean itself, so a noisy fit (a loaded machine's
step times vary severalfold) can neither make recomputing look free nor dearer than whole
steps say.

The engine measures loads from host memory once at start (``KVTiers.calibrate``, in
``Engine.warmup``), so the first requests already weigh real figures of this device. Until a
source has been measured its load costs nothing, and until the prefill has been measured
every hit is loaded: loads go ahead and get measured. While loads are judged slower, a few
blocks are still loaded now and then (``KVTiers.plan``'s probe), so one bad measurement
cannot keep the tiers off for good. Disk reads keep being
measured while loads skip the disk: a request's disk blocks are read ahead when it arrives
(``KVTiers.prefetch``), and those reads are timed too, so a disk that got faster (its files
now in the page cache, say) is noticed. Pure logic: no I/O, no tensors, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

SOURCES = ("memory", "disk")
# Weight of the newest measurement: about the last ten loads count.
ALPHA = 0.2
# The prefill fit's: about the last twenty steps with prompt tokens count.
PREFILL_ALPHA = 0.05
# A load's engine-thread time per block counts at most this many times the estimate so far:
# one stalled load (a collection, a page fault storm) must not make every load look dear.
OVERHEAD_OUTLIER = 4.0


@dataclass
class Ewma:
    """An exponentially weighted moving average of rates; ``value`` is None until the first."""

    alpha: float = ALPHA
    value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


@dataclass
class LinearFit:
    """Least squares ``y ≈ a + b * x`` over points weighted by ``(1 - alpha) ** age``."""

    alpha: float = PREFILL_ALPHA
    w: float = 0.0  # the weights' sum, then the weighted sums of x, y, x*x, x*y
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def add(self, x: float, y: float) -> None:
        k = 1.0 - self.alpha
        self.w = self.w * k + 1.0
        self.x = self.x * k + x
        self.y = self.y * k + y
        self.xx = self.xx * k + x * x
        self.xy = self.xy * k + x * y

    def slope(self) -> float | None:
        """``b``, kept within [1/4, 1] of the mean ``y / x`` (noisy points can flatten or
        steepen a fit; a step's fixed part is seldom over three quarters of it); the mean
        itself where the points' x vary too little to tell a slope; None before any point."""
        if not self.w or not self.x:
            return None
        mx, my = self.x / self.w, self.y / self.w
        mean = my / mx
        var = self.xx / self.w - mx * mx
        if var <= (0.05 * mx) ** 2:
            return mean
        cov = self.xy / self.w - mx * my
        return min(max(cov / var, mean / 4), mean)


class TierCostModel:
    """Load-vs-recompute estimates for blocks of ``block_bytes`` bytes and ``block_tokens``
    tokens (see the module docstring)."""

    def __init__(self, block_bytes: int, block_tokens: int, alpha: float = ALPHA) -> None:
        if block_bytes < 1 or block_tokens < 1:
            raise ValueError(f"block_bytes and block_tokens must be >= 1, got {block_bytes}, {block_tokens}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.block_bytes = block_bytes
        self.block_tokens = block_tokens
        self.bandwidth = {s: Ewma(alpha) for s in SOURCES}  # bytes per second
        self.overhead = Ewma(alpha)  # the engine thread's seconds per loaded block
        self.prefill = LinearFit()  # step seconds against its prompt tokens

    def observe_load(self, source: str, nbytes: int, seconds: float) -> None:
        """``nbytes`` came from ``source`` in ``seconds`` (one measured load or read batch)."""
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if nbytes > 0 and seconds > 0:
            self.bandwidth[source].add(nbytes / seconds)

    def observe_overhead(self, blocks: int, seconds: float) -> None:
        """Loading ``blocks`` blocks took the engine thread ``seconds`` besides the copies."""
        if blocks > 0 and seconds >= 0:
            per_block = seconds / blocks
            if self.overhead.value:
                per_block = min(per_block, OVERHEAD_OUTLIER * self.overhead.value)
            self.overhead.add(per_block)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """A model step computed ``tokens`` prompt tokens in ``seconds``."""
        if tokens > 0 and seconds > 0:
            self.prefill.add(tokens, seconds)

    def load_seconds(self, source: str) -> float:
        """Estimated time to bring one block from ``source`` into the pool: the copies and
        the engine thread's time per block (each 0 while unmeasured)."""
        seconds = self._seconds(self.bandwidth["memory"]) + (self.overhead.value or 0.0)
        if source == "disk":
            seconds += self._seconds(self.bandwidth["disk"])
        return seconds

    def recompute_seconds(self) -> float:
        """Estimated time to prefill one block's tokens more (0 if unmeasured)."""
        per_token = self.prefill.slope()
        return self.block_tokens * per_token if per_token else 0.0

    def pays(self, source: str) -> bool:
        """Whether a block from ``source`` is estimated to load no slower than it recomputes
        (True until both are measured)."""
        recompute = self.recompute_seconds()
        if not recompute or self.bandwidth[source].value is None:
            return True
        return self.load_seconds(source) <= recompute

    def blocks_to_load(self, sources: Sequence[str]) -> int:
        """How many of the leading hit blocks (``sources[i]``: where block i would come
        from) to load; the rest are recomputed. With no prefill measured yet, or no source,
        every block is loaded."""
        if self.prefill.slope() is None:  # nothing to weigh a load against yet
            return len(sources)
        recompute = self.recompute_seconds()
        best_k, best_cost, cost = 0, 0.0, 0.0
        for k, source in enumerate(sources, 1):
            # Against recomputing all: loading the first k saves k recomputes.
            cost += self.load_seconds(source) - recompute
            if cost <= best_cost:  # ties load: equal time, less compute
                best_k, best_cost = k, cost
        return best_k

    def stats(self) -> dict:
        """Current estimates (None where nothing was measured yet)."""
        return {"memory_gbps": _gb(self.bandwidth["memory"].value),
                "disk_gbps": _gb(self.bandwidth["disk"].value),
                "prefill_tokens_per_s": 1 / slope if (slope := self.prefill.slope()) else None,
                "load_block_ms": {s: self.load_seconds(s) * 1e3 for s in SOURCES},
                "load_overhead_block_ms": (self.overhead.value or 0.0) * 1e3,
                "recompute_block_ms": self.recompute_seconds() * 1e3}

    def _seconds(self, bandwidth: Ewma) -> float:
        return self.block_bytes / bandwidth.value if bandwidth.value else 0.0


def _gb(rate: float | None) -> float | None:
    return None if rate is None else rate / 1e9
