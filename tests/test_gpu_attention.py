"""The Triton paged-attention backend against a float32 dense reference built here.

Runs on CUDA. With TRITON_INTERPRET=1 and Triton installed it also runs on CPU through the
Triton interpreter (float16 only, smaller shapes): a way to check the kernels without a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from ultrakv.node.attention.base import AttentionMetadata
from ultrakv.node.attention.triton_backend import TritonPagedBackend, triton_available

pytestmark = pytest.mark.gpu

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
if not triton_available() and not INTERPRET:
    pytest.skip("needs CUDA and Triton", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
MAX_LEN = 300 if INTERPRET else 2000
BLOCK_SIZE = 16
POISON = float("nan")


class PagedCase:
    """Random sequences laid out in a shuffled paged cache, with dense K/V kept for the reference.

    Sequence i has ``prefix_lens[i]`` tokens already cached and ``new_lens[i]`` new tokens
    whose k/v are handed to the backend (it writes them). The cache is filled with random
    garbage first so that reading a wrong block gives a wrong answer.
    """

    def __init__(self, prefix_lens, new_lens, num_heads, num_kv_heads, head_dim, dtype, seed):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        self.prefix_lens, self.new_lens = list(prefix_lens), list(new_lens)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        seq_lens = [p + n for p, n in zip(self.prefix_lens, self.new_lens, strict=True)]
        blocks_per_seq = [-(-s // BLOCK_SIZE) for s in seq_lens]
        max_blocks = max(blocks_per_seq) + 2  # padded past every sequence's blocks
        num_blocks = sum(blocks_per_seq) + 7
        perm = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
        self.kv_cache = torch.randn(2, num_blocks, BLOCK_SIZE, num_kv_heads, head_dim,
                                    generator=g, device=DEVICE).to(dtype)
        tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
        used = 0
        for i, nb in enumerate(blocks_per_seq):
            tables[i, :nb] = perm[used:used + nb].to(torch.int32)
            used += nb
        self.keys = [torch.randn(s, num_kv_heads, head_dim, generator=g, device=DEVICE).to(dtype)
                     for s in seq_lens]
        self.values = [
            torch.randn(s, num_kv_heads, head_dim, generator=g, device=DEVICE).to(dtype)
            for s in seq_lens
        ]
        slots = []
        for i, (p, s) in enumerate(zip(self.prefix_lens, seq_lens, strict=True)):
            pos = torch.arange(s)
            seq_slots = (tables[i, pos // BLOCK_SIZE].long() * BLOCK_SIZE
                         + pos % BLOCK_SIZE).to(DEVICE)
            flat = self.kv_cache.view(2, -1, num_kv_heads, head_dim)
            flat[0, seq_slots[:p]] = self.keys[i][:p]
            flat[1, seq_slots[:p]] = self.values[i][:p]
            slots.append(seq_slots[p:])
        total = sum(self.new_lens)
        self.q = torch.randn(total, num_heads, head_dim, generator=g, device=DEVICE).to(dtype)
        self.k = torch.cat([kk[p:] for kk, p in zip(self.keys, self.prefix_lens, strict=True)])
        self.v = torch.cat([vv[p:] for vv, p in zip(self.values, self.prefix_lens, strict=True)])
        starts = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        starts[1:] = torch.cumsum(torch.tensor(self.new_lens), 0)
        self.meta = AttentionMetadata(
            query_start_loc=starts.to(DEVICE),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
            block_tables=tables.to(DEVICE),
            slot_mapping=torch.cat(slots),
            max_query_len=max(self.new_lens),
            max_seq_len=max(seq_lens),
        )
        self.scale = head_dim ** -0.5

    def reference(self) -> torch.Tensor:
        """Float32 causal attention over each sequence's dense context."""
        outs = []
        group = self.num_heads // self.num_kv_heads
        row = 0
        for i, (p, n) in enumerate(zip(self.prefix_lens, self.new_lens, strict=True)):
            q = self.q[row:row + n].float().transpose(0, 1)  # [H, n, D]
            k = self.keys[i].float().repeat_interleave(group, 1).transpose(0, 1)
            v = self.values[i].float().repeat_interleave(group, 1).transpose(0, 1)
            scores = (q @ k.transpose(1, 2)) * self.scale  # [H, n, S]
            q_pos = p + torch.arange(n, device=DEVICE)
            k_pos = torch.arange(p + n, device=DEVICE)
            scores.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
            outs.append((scores.softmax(-1) @ v).transpose(0, 1))
            row += n
        return torch.cat(outs)

    def run(self) -> torch.Tensor:
        # Poison the allocator block the backend's output will reuse, so an element the kernel
        # forgets to write shows up as NaN instead of a stale, plausible value.
        torch.full_like(self.q, POISON)
        return TritonPagedBackend().forward(
            self.q, self.k, self.v, self.kv_cache, self.meta, self.scale)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "output has NaN (unwritten or bad softmax)"
    return float((out.float() - ref).norm() / ref.norm())


def _check_written(case: PagedCase) -> None:
    flat = case.kv_cache.view(2, -1, case.num_kv_heads, case.head_dim)
    slots = case.meta.slot_mapping
    valid = slots >= 0
    assert torch.equal(flat[0, slots[valid]], case.k[valid])
    assert torch.equal(flat[1, slots[valid]], case.v[valid])


def _shapes():
    for ratio in (1, 4, 8):
        for head_dim in (64, 128):
            yield ratio, head_dim


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio,head_dim", list(_shapes()))
@pytest.mark.parametrize("num_seqs", [5, 33] if INTERPRET else [7, 64, 300])
def test_decode_matches_dense_reference(num_seqs, ratio, head_dim, dtype):
    g = torch.Generator().manual_seed(num_seqs * 100 + ratio * 10 + head_dim)
    seq_lens = torch.randint(1, MAX_LEN + 1, (num_seqs,), generator=g).tolist()
    seq_lens[0] = 1  # a context of only the new token
    seq_lens[-1] = MAX_LEN
    num_heads = 2 * ratio if INTERPRET else 32
    case = PagedCase([s - 1 for s in seq_lens], [1] * num_seqs, num_heads, num_heads // ratio,
                     head_dim, dtype, seed=num_seqs + ratio + head_dim)
    out = case.run()
    _check_written(case)
    assert _rel_err(out, case.reference()) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ratio,head_dim", list(_shapes()))
def test_prefill_with_cached_prefix_matches_dense_reference(ratio, head_dim, dtype):
    # Mixed step: fresh prompts, continuations after a cached prefix, and decode tokens.
    if INTERPRET:
        prefix_lens, new_lens = [0, 40, 100, 7, 0], [70, 33, 1, 1, 1]
    else:
        prefix_lens, new_lens = [0, 500, 1900, 0, 1000, 63, 1999], [700, 131, 100, 1, 1, 65, 1]
    num_kv_heads = 2
    case = PagedCase(prefix_lens, new_lens, num_kv_heads * ratio, num_kv_heads, head_dim,
                     dtype, seed=ratio * 1000 + head_dim)
    out = case.run()
    _check_written(case)
    assert _rel_err(out, case.reference()) < 1e-2


@pytest.mark.parametrize("head_dim", [64, 128])
def test_short_turns_over_long_cached_contexts_match_dense_reference(head_dim):
    # A returning session's turn: few new tokens over a long cached context (the launch shape
    # PrefillConfig.for_shape picks for it differs from a cold prompt's).
    prefix_lens, new_lens = ([40, 100, 3], [5, 16, 1]) if INTERPRET else ([300, 2000, 1000, 0], [20, 64, 33, 1])
    case = PagedCase(prefix_lens, new_lens, 8, 2, head_dim, DTYPES[0], seed=head_dim)
    out = case.run()
    _check_written(case)
    assert _rel_err(out, case.reference()) < 1e-2


@pytest.mark.parametrize(("new_len", "head_dim"), [(7, 64), (150, 64), (40, 128)])
def test_split_prefill_over_a_long_cached_context_matches_dense_reference(new_len, head_dim):
    # Few query tiles over a long context: the context is cut into slices whose partial
    # softmax states are merged (prefill_partition), in each launch class of such a turn.
    import math

    from ultrakv.node.attention.triton_backend import PrefillConfig, _num_sms, prefill_partition

    prefix_lens = [1100, 40, 0] if INTERPRET else [3000, 1200, 0]
    new_lens = [new_len, 1, 3]
    case = PagedCase(prefix_lens, new_lens, 8, 2, head_dim, DTYPES[0], seed=new_len)
    meta = case.meta
    cfg = PrefillConfig.for_shape(head_dim, meta.max_query_len, meta.max_seq_len)
    programs = len(prefix_lens) * 8 * math.ceil(meta.max_query_len / cfg.block_m)
    assert prefill_partition(programs, meta.max_query_len, meta.max_seq_len, _num_sms(DEVICE),
                             cfg.block_n) < meta.max_seq_len  # the split path runs
    out = case.run()
    _check_written(case)
    assert _rel_err(out, case.reference()) < 1e-2


def test_skip_slots_and_padded_rows_are_harmless():
    """slot -1 rows write nothing; a seq_len-0 row yields zeros, never NaN."""
    dtype = DTYPES[0]
    case = PagedCase([30, 0], [1, 1], 8, 2, 64, dtype, seed=7)
    case.meta.slot_mapping[1] = -1
    case.meta.seq_lens[1] = 0
    before = case.kv_cache.clone()
    out = case.run()
    assert torch.equal(out[1].float(), torch.zeros_like(out[1].float()))
    ref = case.reference()
    assert _rel_err(out[:1], ref[:1]) < 1e-2
    changed = (case.kv_cache != before).any(0).flatten(2).any(-1).nonzero()
    slot0 = int(case.meta.slot_mapping[0])
    assert changed.tolist() == [[slot0 // BLOCK_SIZE, slot0 % BLOCK_SIZE]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
@pytest.mark.parametrize("num_seqs", [4, 256])
def test_decode_replays_in_cuda_graph_with_in_place_metadata(num_seqs):
    """Captured once; seq_lens, block_tables and slots change in place between replays."""
    dtype = torch.bfloat16
    backend = TritonPagedBackend()
    cases = []
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        lens = torch.randint(1, MAX_LEN + 1, (num_seqs,), generator=g).tolist()
        cases.append(PagedCase([s - 1 for s in lens], [1] * num_seqs, 32, 8, 64, dtype, seed))
    # The graph owns one set of input buffers, sized for the largest case.
    first = cases[0]
    max_blocks = max(c.meta.block_tables.shape[1] for c in cases)
    num_blocks = max(c.kv_cache.shape[1] for c in cases)
    kv_cache = torch.zeros(2, num_blocks, BLOCK_SIZE, 8, 64, dtype=dtype, device=DEVICE)
    q, k, v = first.q.clone(), first.k.clone(), first.v.clone()
    meta = AttentionMetadata(
        query_start_loc=first.meta.query_start_loc.clone(),
        seq_lens=first.meta.seq_lens.clone(),
        block_tables=torch.zeros(num_seqs, max_blocks, dtype=torch.int32, device=DEVICE),
        slot_mapping=first.meta.slot_mapping.clone(),
        max_query_len=1,
        max_seq_len=MAX_LEN,  # capture-time bound on every replay's context
    )
    out = backend.forward(q, k, v, kv_cache, meta, first.scale)  # compile outside capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = backend.forward(q, k, v, kv_cache, meta, first.scale)
    torch.cuda.current_stream().wait_stream(stream)
    for case in cases:
        kv_cache.zero_()
        kv_cache[:, : case.kv_cache.shape[1]].copy_(case.kv_cache)
        q.copy_(case.q)
        k.copy_(case.k)
        v.copy_(case.v)
        meta.seq_lens.copy_(case.meta.seq_lens)
        meta.block_tables.zero_()
        meta.block_tables[:, : case.meta.block_tables.shape[1]].copy_(case.meta.block_tables)
        meta.slot_mapping.copy_(case.meta.slot_mapping)
        out.fill_(POISON)
        graph.replay()
        torch.cuda.synchronize()
        assert _rel_err(out, case.reference()) < 1e-2
