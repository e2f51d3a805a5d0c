"""Speculative decoding from the sequence's own tokens (prompt lookup / n-gram drafting).

A session's context holds the whole conversation, and replies often repeat parts of it (code
edits, summaries, quoted text). The proposer finds the latest earlier occurrence of the
context's last ``n`` tokens (``n`` from ``max_ngram`` down to 1) and drafts the tokens that
followed it. The engine appends the draft, computes every drafted position in one forward pass
over the paged KV, and keeps the longest prefix the model agrees with (its greedy argmax),
plus the model's own token after it: the output is exactly what greedy decoding gives, one to
``k + 1`` tokens per step. Rejected positions are never committed: their KV slots are simply
overwritten later and their blocks are not published to the prefix cache.

Pure logic: no tensors, no I/O.
"""

from __future__ import annotations

import numpy as np


def propose_ngram(tokens: list[int], k: int, max_ngram: int, min_ngram: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the context's last
    ``n`` tokens, for the longest ``n`` in [``min_ngram``, ``max_ngram``] that has one; [] when
    none matches."""
    if k <= 0 or len(tokens) < min_ngram + 1:
        return []
    arr = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, len(arr) - 1), min_ngram - 1, -1):
        suffix = arr[-n:]
        # Windows that start before the suffix itself and have at least one token after them.
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return arr[start:start + k].tolist()
    return []


def accepted_prefix(draft: list[int], predicted: list[int]) -> list[int]:
    """The tokens a verification step yields: the draft's longest prefix that matches the
    model's predictions, then the model's own prediction after it.

    ``predicted[j]`` is the model's greedy token after the context plus ``draft[:j]``, so it
    has ``len(draft) + 1`` entries.
    """
    if len(predicted) != len(draft) + 1:
        raise ValueError(f"predicted must have len(draft) + 1 = {len(draft) + 1} tokens, got {len(predicted)}")
    a = 0
    while a < len(draft) and draft[a] == predicted[a]:
        a += 1
    return draft[:a] + [predicted[a]]
