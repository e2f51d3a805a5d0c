"""The garbage collector of a serving process (node, coordinator): the startup heap frozen.

A node holds about 200k objects once torch, the model and the servers are loaded, none of
which ever become garbage. CPython's full (generation 2) collection walks all of them, with
the GIL held: 280 ms on the 2-core CPU machine, a stall of the event loop and the engine
thread alike, and serving's per-token garbage (futures, closures, messages) triggers one
every few seconds. Freezing the heap once startup is done moves those objects out of the
collector's sight (``gc.freeze``), so a collection walks only what serving allocated since.
Only process entry points call this: a library (tests, notebooks) leaves its host's heap
alone, since whatever cyclic garbage exists when the heap is frozen is never freed.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect the garbage startup left, then freeze what remains; returns the number of
    objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
