"""The row counts an eager step's matrix products run at.

cuBLAS pays on the host the first time it meets a matrix shape: a heuristic query (about
0.2 ms per product on an H100 host) and, when that picks a kernel no earlier call used, the
kernel's load (about 3 ms). An eager step's token count can be any number up to the step
budget, and the rows it samples any number up to ``max_num_seqs``, so a server kept paying
these for as long as it met new counts: on an H100 the first cold prompt of each new length
took 6-8 ms more than the next (``benchmarks/probe_first_eager.py``).

So an eager step runs at one of a fixed set of row counts, its tokens padded up to a
:func:`token_bucket` and its sampled rows up to a :func:`row_bucket`, and warmup runs every
product at each of them once (``ModelRunner.warm_matmuls``). Padding costs little: up to
256 tokens it adds fewer than 16, and a product of so few rows takes the time of reading its
weights whatever their number; past 256 it adds less than 12.5%.
"""

from __future__ import annotations

from collections.abc import Callable


def _ceil(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def token_bucket(n: int) -> int:
    """The padded token count of an eager step of ``n`` tokens (n >= 1): a multiple of 16 up
    to 256, of 32 up to 512, of 64 up to 1024, of 128 beyond (88 counts up to 8192)."""
    if n < 1:
        raise ValueError(f"a step has at least one token, got {n}")
    for limit, multiple in ((256, 16), (512, 32), (1024, 64)):
        if n <= limit:
            return _ceil(n, multiple)
    return _ceil(n, 128)


def token_buckets(max_tokens: int) -> list[int]:
    """Every :func:`token_bucket` of a step of at most ``max_tokens`` tokens, ascending."""
    return _buckets(token_bucket, max_tokens)


def row_bucket(n: int) -> int:
    """The padded count of a step's ``n`` sampled rows: one stays one (its logits go through
    the batch-1 path), more go up to a multiple of 16."""
    if n < 1:
        raise ValueError(f"a step samples at least one row, got {n}")
    return 1 if n == 1 else _ceil(n, 16)


def row_buckets(max_rows: int) -> list[int]:
    """Every :func:`row_bucket` of at most ``max_rows`` rows, ascending."""
    return _buckets(row_bucket, max_rows)


def _buckets(bucket: Callable[[int], int], most: int) -> list[int]:
    out, n = [], 1
    while n <= most:
        out.append(bucket(n))
        n = out[-1] + 1
    return out
