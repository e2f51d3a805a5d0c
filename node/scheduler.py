"""Continuous batching: which sequences run this step, and how many new tokens each brings.

Prefill and decode are one thing here: every running sequence has ``num_uncomputed_tokens``
(a whole prompt, the next chunk of one, or the single token sampled last step), and each step
takes as many as fit under the token budget. Running sequences go first, in priority order;
waiting ones are admitted after them by effective priority (priority lifted one class per
``aging_s`` waited, so nothing starves). When a running sequence needs a block and none is
free, the lowest-priority, latest-arrived running sequence is preempted: its blocks are
released (full ones stay in the prefix cache) and it is recomputed on readmission. Pure
logic: no tensors, no I/O. With KV tiers (``tiers``, node/kv/tiers.py) a prefix match goes on
past the GPU pool into host memory and disk, and the blocks found there are loaded into
fresh pool blocks (as many as loading beats recomputing); a preempted sequence's full blocks
then come back from the tier its evicted blocks were offloaded to instead of being
recomputed. A sequence whose blocks are still being read from disk waits (stays in the
queue, unpinned) while the sequences behind it are admitted: a read never stalls a step.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ultrakv.cluster.block_hashing import continue_chain, hash_block, hash_token_blocks
from ultrakv.node.kv.block_pool import BlockPool
from ultrakv.node.outputs import RequestKey
from ultrakv.node.sequence import Sequence, SequenceStatus

# A lone sequence's prefill of up to this many times the largest prefill graph goes in
# graph-sized steps, each one replayed; a longer one runs in one eager step. An eager
# prefill is bound by the host's kernel launches until its device time outgrows them: on an
# H100 host a cold llama-1b prompt of 1100 tokens took 9.1-9.8 ms in one eager step (4.45 ms
# of it device time) and 6.0 ms in three replayed steps; 1400 tokens 9.3-12.6 against 6.7,
# 1536 9.1-10.4 against 7.0 (benchmarks/bench_cold_prefill.py, cold_prefill_*_llama-1b*.json).
# Past that the eager step catches up (2000 tokens: 8.6 ms; a 2.2k-token prompt took 13.2 ms
# in 512-token steps against 10.6 ms in one eager step).
GRAPH_PREFILL_STEPS = 3

log = logging.getLogger("ultrakv.node.scheduler")


@dataclass
class ScheduledSeq:
    """One sequence's share of a step. ``samples``: the chunk reaches the end of the context,
    so the step samples a token for it (fixed when scheduled, before counts advance).
    ``draft``: speculative tokens computed after the context in this step only (counted in
    ``num_new_tokens``, never part of the sequence until verified; node/speculative.py)."""

    seq: Sequence
    num_new_tokens: int
    draft: list[int] = field(default_factory=list)
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        self.samples = (self.seq.num_computed_tokens + self.num_new_tokens
                        == self.seq.num_tokens + len(self.draft))


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class TierLoader(Protocol):
    """The tiers below the pool, as the scheduler sees them (node/kv/tiers.py)."""

    def plan(self, hashes: list[int]) -> int | None:
        """How many leading ``hashes`` to load (those the tiers hold, as far as loading beats
        recomputing); None while reads they need are in flight."""

    def load(self, hashes: list[int], block_ids: list[int], overlap: bool = True) -> int:
        """Fill ``block_ids`` with the leading run of ``hashes``; how many were filled.
        ``overlap``: the step reading them runs eagerly (layer by layer loads may pay)."""


class Scheduler:
    """Owns the waiting and running queues and every sequence's blocks."""

    def __init__(
        self,
        pool: BlockPool,
        *,
        block_size: int,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
        enable_prefix_caching: bool = True,
        aging_s: float = 5.0,
        max_model_len: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        tiers: TierLoader | None = None,
        chain_root: int | None = None,
        graph_prefill_tokens: int = 0,
    ):
        self.pool = pool
        self.chain_root = chain_root  # parent of every chain's first block (kv dtype in the key)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.enable_prefix_caching = enable_prefix_caching
        self.aging_s = aging_s
        self.max_model_len = max_model_len
        self.clock = clock
        self.tiers = tiers
        # The largest prefill a CUDA graph replays (0: none). A lone sequence's prefill of up
        # to GRAPH_PREFILL_STEPS times that goes in steps of that size, each replayed: an
        # eager prefill is bound by the host's kernel launches (llama-1b on an H100: a
        # 576-token turn over a cached history took 8-13 ms eagerly, 2-3 ms of it device
        # time), a replayed chunk is not. Longer ones run eagerly: their device time outgrows
        # the launches.
        self.graph_prefill_tokens = graph_prefill_tokens
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # -- queues ---------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def effective_priority(self, seq: Sequence, now: float) -> int:
        """Priority class lifted by one for every ``aging_s`` seconds waited."""
        return int(seq.priority) - int((now - seq.arrival_time) // self.aging_s)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Take a sequence out of the queues and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release_blocks(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # -- one step -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        now = self.clock()
        self.running.sort(key=lambda s: (self.effective_priority(s, now), s.arrival_time))

        scheduled_ids: set[RequestKey] = set()
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            num_new = self._chunk(seq, budget)
            if num_new == 0:
                continue
            while not self.reserve(seq, num_new):
                victim = self._pick_victim(exclude=scheduled_ids)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out.scheduled.append(ScheduledSeq(seq, num_new))
                scheduled_ids.add(seq.key)
                budget -= num_new

        if not out.preempted:
            self._admit(out, budget, now)
        if len(out.scheduled) == 1 and not out.preempted and self.graph_prefill_tokens:
            item = out.scheduled[0]  # its blocks stay reserved for the whole prompt
            if not item.draft and self.graph_prefill_tokens < item.num_new_tokens <= self._graph_prefill_limit:
                out.scheduled[0] = ScheduledSeq(item.seq, self.graph_prefill_tokens)
        return out

    def plan_decode_steps(self, out: SchedulerOutput, max_steps: int) -> int:
        """How many decode steps ``out`` may run back to back (multi-step decoding).

        Running several decode steps per schedule lets the device feed each step's sampled
        tokens into the next without a round trip to the host. It is only done when nothing
        else needs the scheduler's attention: every scheduled sequence is decoding, nothing
        was preempted, and nobody waits for a free seat (with the batch full at
        ``max_num_seqs``, a waiting request could not start before a sequence finishes
        anyway, so a backlog keeps multi-step on). ``k`` never exceeds any sequence's
        remaining ``max_tokens`` or context, so only a stop token (seen after the fact) can
        make a sequence compute tokens it will not keep. Blocks for all ``k`` tokens are
        reserved here; when the pool can't hold them, fewer steps are planned (never a
        preemption for lookahead). Returns ``k`` >= 1.
        """
        if max_steps <= 1 or out.preempted or not out.scheduled:
            return 1
        if self.waiting and len(self.running) < self.max_num_seqs:
            return 1
        if any(item.num_new_tokens != 1 or not item.samples for item in out.scheduled):
            return 1
        k = min(max_steps, *(self.steps_left(item.seq) for item in out.scheduled))
        while k > 1:
            need = sum(self._blocks_needed(item.seq, k) for item in out.scheduled)
            if self.pool.can_allocate(need):
                for item in out.scheduled:
                    self.reserve(item.seq, k)
                return k
            k //= 2
        return 1

    def steps_left(self, seq: Sequence) -> int:
        """Tokens ``seq`` may still sample (this step's included) under its limits."""
        left = seq.sampling.max_tokens - seq.num_output_tokens
        if self.max_model_len is not None:
            left = min(left, self.max_model_len - seq.num_tokens)
        return max(1, left)

    def _blocks_needed(self, seq: Sequence, num_new: int) -> int:
        return max(0, math.ceil((seq.num_computed_tokens + num_new) / self.block_size) - len(seq.block_table))

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Advance computed counts and publish newly filled blocks to the prefix cache."""
        for item in out.scheduled:
            seq = item.seq
            if seq.is_finished:  # aborted by a listener as its token arrived: no blocks left
                continue
            seq.num_computed_tokens += item.num_new_tokens
            if self.enable_prefix_caching:
                self._commit_full_blocks(seq)

    # -- internals ------------------------------------------------------------------------

    @property
    def _graph_prefill_limit(self) -> int:
        """The longest lone prefill that goes in graph-sized steps."""
        return GRAPH_PREFILL_STEPS * self.graph_prefill_tokens

    def _chunk(self, seq: Sequence, budget: int) -> int:
        want = seq.num_uncomputed_tokens
        if want <= budget:
            return want
        return budget if self.enable_chunked_prefill else 0

    def _admit(self, out: SchedulerOutput, budget: int, now: float) -> None:
        self.waiting.sort(key=lambda s: (self.effective_priority(s, now), s.arrival_time))
        i = 0
        while i < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[i]
            matched_now = False
            if not seq.block_table and self.enable_prefix_caching:
                if not self._match_prefix(seq):  # its blocks are being read: the next one goes
                    i += 1
                    continue
                matched_now = True
            num_new = self._chunk(seq, budget)
            if num_new == 0 or not self.reserve(seq, num_new):
                if matched_now:
                    self._release_blocks(seq)
                break
            self.waiting.pop(i)
            seq.status = SequenceStatus.RUNNING
            if not seq.admitted_once:
                seq.num_cached_tokens = seq.num_computed_tokens
                seq.admitted_once = True
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

    def _match_prefix(self, seq: Sequence) -> bool:
        """Give ``seq`` the blocks of its longest cached prefix; False (nothing taken) when
        the tiers are still reading blocks of it that are worth the wait."""
        full = (seq.num_tokens - 1) // self.block_size  # the blocks looked up (see block_hashes_of)
        hashes = self.block_hashes_of(seq) if self._looks_past_misses else self._hashes_to_first_miss(seq, full)
        if len(hashes) > len(seq.prefix_hashes):  # a retry, and the commit of these blocks, reuse them
            seq.prefix_hashes = hashes
        loads = 0
        if self.tiers is not None:
            in_pool = len(self.pool.cached_prefix(hashes))
            if in_pool < len(hashes):
                planned = self.tiers.plan(hashes[in_pool:])
                if planned is None:
                    return False
                loads = planned
        matched = self.pool.match_prefix(hashes, looked_up=full)
        if loads:
            matched += self._load_from_tiers(seq, hashes[len(matched):], loads, len(matched))
        seq.block_table = list(matched)
        seq.block_hashes = hashes[: len(matched)]
        seq.num_committed_blocks = len(matched)
        seq.num_computed_tokens = len(matched) * self.block_size
        return True

    def _load_from_tiers(self, seq: Sequence, hashes: list[int], planned: int, matched: int) -> list[int]:
        """Pool blocks (pinned, committed) holding the first ``planned`` of ``hashes`` (which
        the tiers hold in memory: see TierLoader.plan), as many as the pool has room for;
        ``seq`` has ``matched`` blocks in the pool before them."""
        n = min(planned, self.pool.num_free)
        if n == 0:
            return []
        blocks = self.pool.allocate(n)
        # Its prefill runs eagerly when no prefill graph takes it: more new tokens than
        # GRAPH_PREFILL_STEPS graph-sized steps (see schedule), or no prefill graphs at all. A
        # step of several sequences runs eagerly too, which is not known yet: such a load goes
        # whole.
        new_tokens = seq.num_tokens - (matched + n) * self.block_size
        eager = not self.graph_prefill_tokens or new_tokens > self._graph_prefill_limit
        try:
            loaded = self.tiers.load(hashes[:n], blocks, overlap=eager)
        except Exception:  # a failing tier costs a recompute, never the request
            log.exception("loading %d KV blocks from the tiers failed; recomputing them", n)
            loaded = 0
        for block, h in zip(blocks[:loaded], hashes, strict=False):
            self.pool.commit(block, h)
        if loaded < n:
            self.pool.free(blocks[loaded:])
        return blocks[:loaded]

    def block_hashes_of(self, seq: Sequence) -> list[int]:
        """Chained hashes of the full blocks a prefix match may reuse: all but the last token
        (always computed, so the step yields logits to sample from). Starts from the known
        ``prefix_hashes``, so a conversation's next turn hashes only its new blocks."""
        return continue_chain(seq.prefix_hashes, seq.token_ids[: seq.num_tokens - 1], self.block_size, seq.salt,
                              self.chain_root)

    @property
    def _looks_past_misses(self) -> bool:
        """Whether a prefix match needs the hash of every block, not only up to the first the
        pool lacks: the tiers look further down, and an adaptive policy learns from each miss."""
        return self.tiers is not None or self.pool.policy.learns_from_misses

    def _hashes_to_first_miss(self, seq: Sequence, full: int) -> list[int]:
        """The chained hashes of ``seq``'s leading blocks, from the known ``prefix_hashes``
        on, up to the first block the pool does not hold (or the ``full`` blocks a match
        looks up). A returning session's turn hashes one new block here instead of all of
        them: the rest are hashed while its step computes (:meth:`hash_ahead`)."""
        hashes = seq.prefix_hashes[:full]
        bs = self.block_size
        while len(hashes) < full and (not hashes or self.pool.holds(hashes[-1])):
            b = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else self.chain_root, seq.token_ids[b * bs : (b + 1) * bs],
                                     seq.salt))
        return hashes

    def hash_ahead(self, out: SchedulerOutput) -> None:
        """Hash the full blocks this step fills that are not hashed yet, so that committing
        them when it ends (:meth:`on_step_done`) hashes nothing; for a caller to run while
        the device computes the step (a returning turn's prefix match hashed only up to its
        first uncached block)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for item in out.scheduled:
            if item.num_new_tokens == 1:  # a decode step's block is hashed when it is committed
                continue
            seq = item.seq
            known = seq.prefix_hashes
            # Draft tokens are not part of token_ids: their blocks are committed once verified.
            full = min(seq.num_computed_tokens + item.num_new_tokens, seq.num_tokens) // bs
            if full > len(known):
                parent = known[-1] if known else self.chain_root
                seq.prefix_hashes = known + hash_token_blocks(seq.token_ids[len(known) * bs : full * bs], bs,
                                                              seq.salt, parent)

    def reserve(self, seq: Sequence, num_new: int) -> bool:
        """Blocks for ``num_new`` more computed tokens of ``seq``; False (nothing taken) when
        the pool can't hold them."""
        need = self._blocks_needed(seq, num_new)
        if need == 0:
            return True
        if not self.pool.can_allocate(need):
            return False
        seq.block_table.extend(self.pool.allocate(need))
        return True

    def _pick_victim(self, exclude: set[RequestKey]) -> Sequence:
        """The running sequence that loses least by waiting: worst priority, newest."""
        # The sequence asking is never in ``exclude``, so there is always a candidate.
        candidates = [s for s in self.running if s.key not in exclude]
        return max(candidates, key=lambda s: (int(s.priority), s.arrival_time))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release_blocks(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.insert(0, seq)

    def _release_blocks(self, seq: Sequence) -> None:
        if seq.block_table:
            self.pool.free(seq.block_table)
        if len(seq.block_hashes) > len(seq.prefix_hashes):  # still true of token_ids: keep them
            seq.prefix_hashes = seq.block_hashes
        seq.block_table = []
        seq.block_hashes = []
        seq.num_committed_blocks = 0
        seq.num_computed_tokens = 0

    def _commit_full_blocks(self, seq: Sequence) -> None:
        bs = self.block_size
        full = seq.num_computed_tokens // bs
        first = seq.num_committed_blocks
        if full <= first:
            return
        known = seq.prefix_hashes  # hashed for the prefix match or while the step ran: not hashed twice
        hashes = seq.block_hashes
        for b in range(first, full):
            if b < len(known):
                hashes.append(known[b])
            else:
                parent = hashes[b - 1] if b > 0 else self.chain_root
                hashes.append(hash_block(parent, seq.token_ids[b * bs : (b + 1) * bs], seq.salt))
        self.pool.commit_blocks(seq.block_table[first:full], hashes[first:full])
        seq.num_committed_blocks = full
