"""Triton kernels for paged attention on CUDA: KV write, split-K decode, varlen prefill.

Two kernels per layer, launched in order on the current stream:

* ``write_kv_kernel``: one program per new token scatters its keys and values into their
  cache slot (``slot_mapping`` -1 rows are skipped on the device, so there is no host sync and
  the launch is CUDA-graph capturable, unlike a boolean-mask ``index_copy_``).
  With the model's fused kernels on, ``rope_write_kv_kernel`` replaces it and the separate
  RoPE kernel: from the qkv projection's output it rotates the queries in place and the keys,
  and writes keys and values (quantized in a quantized cache) into their slots
  (:meth:`TritonPagedBackend.rope_write_kv`).
* decode (every sequence brings one token): ``decode_kernel`` runs one program per
  (sequence, kv head, context partition). The program holds the whole GQA group of query heads
  that share the kv head, so each K/V tile is read from HBM once per kv head, and does an
  online softmax in fp32 over its partition. The partitions are merged (flash-decoding's
  reduce) in the same launch: each program stores its partial result and counts itself in
  on a per-(sequence, kv head) arrival counter; the last to arrive merges them and zeroes the
  counter for the next launch. When the batch shape needs only one partition the program
  writes the normalised output itself.
* prefill / mixed batches: ``prefill_kernel`` runs one program per (sequence, query head,
  tile of new tokens) and streams K/V of the sequence's context (cached prefix plus the new
  tokens just written) through the block table, causal on absolute positions. A returning
  session's turn (few query tiles over a long cached context) goes to ``prefill_gqa_kernel``
  (the default; ``ULTRAKV_KERNELS=prefill_attention=per_head`` keeps the pair below): one
  program per (sequence, kv head, token tile, context slice) holds every query head of the
  kv head's group for its tokens, so each K/V tile is read once per kv head, and the slices
  (sized in the kernel from the real context length, :func:`gqa_prefill_parts` picks their
  count) are merged in the same launch by the last program to arrive, as in decode. The
  per-head path: such a turn has too few programs to fill the GPU, so
  ``prefill_split_kernel`` splits the context into slices, one program each, and
  ``prefill_reduce_kernel`` merges the slices' partial softmax states
  (:func:`prefill_partition` decides).

Grid sizes and partition sizes depend only on tensor shapes and ``meta.max_seq_len``, never on
tensor values, so a decode step captured in a CUDA graph stays valid when ``seq_lens``,
``block_tables`` and ``slot_mapping`` are updated in place: the runner captures with
``max_seq_len`` set to the longest context it will ever replay (e.g. the model's max length).

The kernels live in ``triton_kernels``, imported on first launch, so this module imports on
CPU-only machines without Triton (the registry lists it).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
from ultrakv.node import kernel_variants
from ultrakv.node.attention.base import AttentionBackend, AttentionMetadata
from ultrakv.node.kv import quantization

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Partitions per decode launch are sized so that about this many programs per SM run:
# enough to hide HBM latency at batch 1, without splitting large batches needlessly.
_DECODE_PROGRAMS_PER_SM = 4
# Context slices of a split prefill, at most. The merge's max/sum scratch always has room for
# this many, so its strides (which Triton specializes on) are the same whatever the split.
PREFILL_MAX_PARTS = 16


@dataclass(frozen=True)
class DecodeConfig:
    """Launch shape of the decode kernel: context tokens per inner tile, warps, pipeline depth."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def for_head_dim(cls, head_dim: int, quantized: bool = False) -> DecodeConfig:
        """Fastest measured shape (H100, bf16; benchmarks/bench_attention.py --sweep). A
        quantized cache (one-byte values) takes twice the tokens per tile at head_dim 64, the
        same bytes per load as bf16 (benchmarks/sweep_decode_quant.py times the choices)."""
        if head_dim <= 64:
            return cls(block_n=64 if quantized else 32)
        return cls(block_n=64)


@dataclass(frozen=True)
class PrefillConfig:
    """Launch shape of the prefill kernel: new tokens per program, context tokens per tile."""

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def for_head_dim(cls, head_dim: int) -> PrefillConfig:
        """Fastest measured shape (H100, bf16; benchmarks/bench_attention.py --sweep)."""
        if head_dim <= 64:
            return cls()
        return cls(block_m=128, block_n=32, num_warps=4, num_stages=3)

    @classmethod
    def for_shape(cls, head_dim: int, max_query_len: int, max_seq_len: int) -> PrefillConfig:
        """The launch shape for a step: a returning session's turn (context at least twice the
        new tokens) streams a long cached context per query tile, where wider K/V tiles, and
        for at most 64 new tokens narrower query tiles (more programs), win: on an H100,
        Llama-3.2-1B heads, 200 new over 2300 cached went from 60 to 43 us and 64 over 4096
        from 103 to 59 us (benchmarks/sweep_prefill_cached.py); a cold prompt keeps
        :meth:`for_head_dim`. A function of shapes only, so a captured graph stays valid."""
        if head_dim <= 64 and max_seq_len >= 2 * max_query_len:
            return cls(block_m=16 if max_query_len <= 64 else 64, block_n=128, num_warps=4, num_stages=3)
        return cls.for_head_dim(head_dim)


@dataclass(frozen=True)
class GqaPrefillConfig:
    """Launch shape of ``prefill_gqa_kernel``: query rows per program (new tokens x the
    group's query heads), context tokens per inner tile, warps, pipeline depth, and how many
    programs per SM the context split aims at."""

    block_rows: int = 64
    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 1

    @classmethod
    def for_head_dim(cls, head_dim: int) -> GqaPrefillConfig:
        """The launch shape for a head size. Head size 64 is tuned on an H100
        (``benchmarks/bench_kernels_ab.py``, 36 shapes, llama-1b): 64 rows, 128-token tiles
        and one program per SM took a turn-8 step's attention (224 new tokens over 2096) from
        34.8 to 26.9 us per layer, and 64 over 4000 from 35.6 to 23.6; head size 128 is
        still a first guess."""
        if head_dim <= 64:
            return cls()
        return cls(block_rows=64, block_n=64, num_warps=4, num_stages=3, programs_per_sm=2)


def gqa_prefill_parts(num_programs: int, max_seq_len: int, num_sms: int, cfg: GqaPrefillConfig) -> int:
    """Context slices per (sequence, kv head, token tile) of ``prefill_gqa_kernel``: enough
    for about ``cfg.programs_per_sm`` programs per SM, each slice at least two inner tiles
    of the launch's longest context, at most ``PREFILL_MAX_PARTS``. A function of shapes
    only (a captured graph stays valid)."""
    wanted = math.ceil(cfg.programs_per_sm * num_sms / max(1, num_programs))
    return max(1, min(wanted, max_seq_len // (2 * cfg.block_n), PREFILL_MAX_PARTS))


@dataclass(frozen=True)
class _DecodeRope:
    """What ``decode_kernel`` needs besides the queries to rotate and write a step's new
    tokens itself: per-token cos / sin rows [T, D] and the tokens' cache slots."""

    cos: torch.Tensor
    sin: torch.Tensor
    slots: torch.Tensor


def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (the backend can run here)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _pdl(device: torch.device) -> bool:
    """Whether this launch uses programmatic dependent launch (``node/grid_dependency.py``,
    imported on first launch as the kernels are)."""
    from ultrakv.node import grid_dependency

    return grid_dependency.enabled(device)


@functools.cache
def _kernels():
    """The kernel module, imported on first launch (import needs no Triton)."""
    from ultrakv.node.attention import triton_kernels

    return {
        "write_kv": triton_kernels.write_kv_kernel,
        "rope_write_kv": triton_kernels.rope_write_kv_kernel,
        "decode": triton_kernels.decode_kernel,
        "prefill": triton_kernels.prefill_kernel,
        "prefill_split": triton_kernels.prefill_split_kernel,
        "prefill_reduce": triton_kernels.prefill_reduce_kernel,
        "prefill_gqa": triton_kernels.prefill_gqa_kernel,
    }


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter runs: size the grid as on an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


def _quant_kind(kv_cache: torch.Tensor) -> int:
    """The kernels' QUANT constexpr: 0 a float cache, 1 int8, 2 fp8 (e4m3)."""
    return {torch.int8: 1, torch.float8_e4m3fn: 2}.get(kv_cache.dtype, 0)


def _qmax(kv_cache: torch.Tensor) -> float:
    return quantization.qmax(kv_cache.dtype) if quantization.is_quantized(kv_cache.dtype) else 0.0


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_partition_size(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int, block_n: int
) -> int:
    """Context tokens per decode program: split long contexts until the grid fills the GPU.

    A power of two, at least one inner tile (``block_n``); a function of shapes only, so it is
    the same at every replay of a captured CUDA graph.
    """
    target_programs = _DECODE_PROGRAMS_PER_SM * num_sms
    parts_wanted = max(1, math.ceil(target_programs / max(1, num_seqs * num_kv_heads)))
    size = _next_pow2(math.ceil(max(1, max_seq_len) / parts_wanted))
    return max(block_n, size)


def prefill_partition(num_programs: int, max_query_len: int, max_seq_len: int, num_sms: int,
                      block_n: int) -> int:
    """Context tokens per prefill program; ``max_seq_len`` or more: no split.

    A returning session's turn (few new tokens over a long cached context) launches too few
    programs to fill the GPU, one per (sequence, query head, query tile), each streaming the
    whole context. Its context is then split into slices of whole inner tiles, each at least
    ``4 * block_n`` long, until about ``_DECODE_PROGRAMS_PER_SM`` programs run per SM, and
    the slices' partial results are merged by a second kernel. A function of shapes only,
    so it is the same at every replay of a captured CUDA graph.
    """
    target = _DECODE_PROGRAMS_PER_SM * num_sms
    if max_seq_len < 4 * max_query_len or num_programs * 2 > target:
        return max_seq_len
    parts = min(math.ceil(target / max(1, num_programs)), max_seq_len // (4 * block_n), PREFILL_MAX_PARTS)
    if parts < 2:
        return max_seq_len
    return math.ceil(max_seq_len / parts / block_n) * block_n


class TritonPagedBackend(AttentionBackend):
    """Paged attention through Triton kernels (CUDA only; bf16, fp16 and fp32; the cache may
    be int8 or fp8 e4m3, quantized in the write kernel and dequantized in the others)."""

    name = "triton"
    supports_cuda_graphs = True  # decode: device-side -1 skips, grid from shapes + max_seq_len
    fuses_rope = True

    def __init__(
        self, decode_config: DecodeConfig | None = None, prefill_config: PrefillConfig | None = None,
        gqa_prefill_config: GqaPrefillConfig | None = None, prefill_kernel: str | None = None,
    ) -> None:
        """Fixed launch shapes if given; otherwise the tuned shape for each call's head_dim.
        ``prefill_kernel``: ``gqa`` or ``per_head`` for a cached-context turn (see
        ``node/kernel_variants.py``; None: the process's choice, ``gqa`` by default)."""
        self.decode_config = decode_config
        self.prefill_config = prefill_config
        self.gqa_prefill_config = gqa_prefill_config
        self.prefill_kernel = prefill_kernel or kernel_variants.current().prefill_attention
        kernel_variants.KernelVariants(prefill_attention=self.prefill_kernel)  # validates it
        # The split-K decode's arrival counters (int32, zero between launches) per device.
        # They only grow; a replaced buffer is kept alive because CUDA graphs captured
        # with it still point at it.
        self._arrival: dict[torch.device, torch.Tensor] = {}
        self._retired: list[torch.Tensor] = []

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        self._check(q, k, v, kv_cache)
        self.write_kv(k, v, kv_cache, meta.slot_mapping)
        if meta.is_decode_only:
            return self.decode(q, kv_cache, meta, scale)
        return self.prefill(q, kv_cache, meta, scale)

    def forward_qkv(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        num_heads: int,
    ) -> torch.Tensor:
        """:meth:`forward` from the qkv projection's output before RoPE: a decode step in one
        launch (:meth:`decode_qkv`), a prefill as :meth:`rope_write_kv` then the prefill
        kernel."""
        if meta.is_decode_only:
            return self.decode_qkv(qkv, cos, sin, kv_cache, meta, scale, num_heads)
        q = self.rope_write_kv(qkv, cos, sin, kv_cache, meta.slot_mapping, num_heads)
        return self.prefill(q, kv_cache, meta, scale)

    def decode_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                   meta: AttentionMetadata, scale: float, num_heads: int) -> torch.Tensor:
        """:meth:`decode` from the qkv projection's output before RoPE, in one launch: the
        decode kernel rotates the queries as it loads them and writes each new token's key
        (rotated) and value into its slot itself (see ``decode_kernel``)."""
        q, cos, sin = self._split_qkv(qkv, cos, sin, kv_cache, num_heads)
        return self.decode(q, kv_cache, meta, scale, _DecodeRope(cos, sin, meta.slot_mapping))

    def _split_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                   num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Checks ``qkv`` [T, (H + 2 KVH) * D] and the per-token ``cos`` / ``sin`` against the
        cache; returns the query view [T, H, D] and ``cos`` / ``sin`` as [T, D] rows."""
        t = qkv.shape[0]
        num_kv_heads = kv_cache.shape[3]
        head_dim, rem = divmod(qkv.shape[1], num_heads + 2 * num_kv_heads)
        if rem or qkv.stride(1) != 1 or head_dim & (head_dim - 1):
            raise ValueError(
                f"qkv must be [T, (num_heads + 2 * num_kv_heads) * head_dim] with unit stride and a "
                f"power-of-two head_dim, got {tuple(qkv.shape)} for {num_heads} + 2 * {num_kv_heads} heads"
            )
        q, k, v = qkv.view(t, -1, head_dim).split([num_heads, num_kv_heads, num_kv_heads], dim=1)
        self._check(q, k, v, kv_cache)
        if t == 0:
            return q, cos, sin
        cos, sin = cos.reshape(t, head_dim), sin.reshape(t, head_dim)
        if cos.stride() != sin.stride() or cos.stride(-1) != 1:
            raise ValueError("cos and sin must be row-major with the same layout")
        return q, cos, sin

    def rope_write_kv(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        num_heads: int,
    ) -> torch.Tensor:
        """One kernel for ``qkv`` [T, (H + 2 KVH) * D] (the projection's output) and per-token
        ``cos`` / ``sin`` [T, D] (``RotaryEmbedding.cos_sin``'s signed tables): rotates the
        queries in place and the keys, and writes keys and values into their cache slots (-1
        skipped), as ``fused_kernels.rope_`` then :meth:`write_kv` would. Returns the rotated
        queries, a [T, H, D] view of ``qkv``."""
        q, cos, sin = self._split_qkv(qkv, cos, sin, kv_cache, num_heads)
        if q.shape[0] == 0:
            return q
        t, num_kv_heads, head_dim = q.shape[0], kv_cache.shape[3], q.shape[2]
        pdl = _pdl(qkv.device)
        _kernels()["rope_write_kv"][(t,)](
            qkv, cos, sin, kv_cache, slot_mapping,
            qkv.stride(0), cos.stride(0),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
            PAGE=kv_cache.shape[2], BLOCK_Q=_next_pow2(num_heads), BLOCK_KV=_next_pow2(num_kv_heads),
            QUANT=_quant_kind(kv_cache), QMAX=_qmax(kv_cache), PDL=pdl, launch_pdl=pdl,
        )
        return q

    @staticmethod
    def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor) -> None:
        # TRITON_INTERPRET=1 runs the kernels on CPU tensors (slow; for debugging without a GPU).
        if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"q must be a CUDA tensor for the triton backend, got {q.device}")
        quantized = quantization.is_quantized(kv_cache.dtype)
        if q.dtype not in _SUPPORTED_DTYPES or (kv_cache.dtype != q.dtype and not quantized):
            raise ValueError(
                f"q and kv_cache dtype must match and be one of {_SUPPORTED_DTYPES} (or the "
                f"kv_cache int8 / float8_e4m3fn), got q={q.dtype}, kv_cache={kv_cache.dtype}"
            )
        num_heads, num_kv_heads = q.shape[1], kv_cache.shape[3]
        if num_heads % num_kv_heads != 0:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got {num_heads} and {num_kv_heads}"
            )
        head_dim = q.shape[2]
        row = quantization.row_width(head_dim, kv_cache.dtype)
        if head_dim < 16 or kv_cache.shape[4] != row or k.shape[-1] != head_dim:
            raise ValueError(
                f"head_dim must be >= 16 and equal in q, k and kv_cache (plus the scale in a "
                f"quantized cache), got q={head_dim}, k={k.shape[-1]}, kv_cache={kv_cache.shape[4]}"
            )
        if kv_cache.stride(4) != 1 or q.stride(2) != 1:
            raise ValueError("q and kv_cache must be contiguous in head_dim")

    def write_kv(
        self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """Scatter new keys/values into their slots; -1 slots skipped on the device (no sync)."""
        num_tokens = k.shape[0]
        if num_tokens == 0:
            return
        k = k if k.stride(2) == 1 else k.contiguous()
        v = v if v.stride(2) == 1 else v.contiguous()
        num_kv_heads, head_dim = kv_cache.shape[3], k.shape[2]
        _kernels()["write_kv"][(num_tokens,)](
            k, v, kv_cache, slot_mapping,
            k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE=kv_cache.shape[2],
            BLOCK_H=_next_pow2(num_kv_heads), BLOCK_D=_next_pow2(head_dim),
            QUANT=_quant_kind(kv_cache), QMAX=_qmax(kv_cache),
        )

    def decode(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        rope: _DecodeRope | None = None,
    ) -> torch.Tensor:
        """One query token per sequence (row i of q belongs to sequence i). With ``rope``,
        ``q`` is the query part of the qkv output before RoPE (see :meth:`decode_qkv`)."""
        num_seqs = meta.seq_lens.shape[0]
        if q.shape[0] != num_seqs:
            raise ValueError(
                f"decode needs one query row per sequence, got {q.shape[0]} rows "
                f"for {num_seqs} sequences"
            )
        _, num_heads, head_dim = q.shape
        num_kv_heads, page = kv_cache.shape[3], kv_cache.shape[2]
        group = num_heads // num_kv_heads
        cfg = self.decode_config or DecodeConfig.for_head_dim(
            head_dim, quantization.is_quantized(kv_cache.dtype))
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        if num_seqs == 0:
            return out
        partition = decode_partition_size(
            num_seqs, num_kv_heads, meta.max_seq_len, _num_sms(q.device), cfg.block_n
        )
        num_parts = max(1, math.ceil(meta.max_seq_len / partition))
        single = num_parts == 1
        if single:
            tmp_acc = tmp_m = tmp_l = arrival = out  # unused by the kernel
            acc_strides = (0, 0, 0)
            ml_strides = (0, 0)
        else:
            arrival = self._arrival_counters(q.device, num_seqs * num_kv_heads)
            tmp_acc = torch.empty(
                (num_seqs, num_heads, num_parts, head_dim), dtype=torch.float32, device=q.device
            )
            tmp_m = torch.empty(
                (num_seqs, num_heads, num_parts), dtype=torch.float32, device=q.device
            )
            tmp_l = torch.empty_like(tmp_m)
            acc_strides = tmp_acc.stride()[:3]
            ml_strides = tmp_m.stride()[:2]
        pdl = _pdl(q.device)
        _kernels()["decode"][(num_seqs, num_kv_heads, num_parts)](
            q, kv_cache, meta.block_tables, meta.seq_lens, out, tmp_acc, tmp_m, tmp_l, arrival,
            scale * math.log2(math.e),
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            meta.block_tables.stride(0),
            *acc_strides, *ml_strides,
            # With RoPE, q is a view of the qkv rows: keys start after the query heads, values
            # after the keys.
            *((rope.cos, rope.sin, rope.slots, rope.cos.stride(0), num_heads * head_dim,
               (num_heads + num_kv_heads) * head_dim) if rope else (q, q, q, 0, 0, 0)),
            GROUP=group, BLOCK_G=max(16, _next_pow2(group)), HEAD_DIM=head_dim,
            BLOCK_D=_next_pow2(head_dim), PAGE=page, BLOCK_N=cfg.block_n, PARTITION=partition,
            SINGLE=single, BLOCK_S=_next_pow2(num_parts),
            IEEE=q.dtype == torch.float32, QUANT=_quant_kind(kv_cache), PDL=pdl,
            BLOCK_G2=_next_pow2(group), MERGE_S=min(16, _next_pow2(num_parts)),
            QMAX=_qmax(kv_cache) if rope else 0, ROPE=rope is not None,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, launch_pdl=pdl,
        )
        return out

    def _arrival_counters(self, device: torch.device, n: int) -> torch.Tensor:
        counters = self._arrival.get(device)
        if counters is None or counters.numel() < n:
            if counters is not None:
                self._retired.append(counters)
            # Sized for a large batch at once, so that it is rarely replaced.
            counters = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
            self._arrival[device] = counters
        return counters

    def prefill(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """Variable-length new tokens per sequence, causal over cached prefix + new tokens."""
        _, num_heads, head_dim = q.shape
        num_kv_heads, page = kv_cache.shape[3], kv_cache.shape[2]
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        num_seqs = meta.seq_lens.shape[0]
        if num_seqs == 0 or q.shape[0] == 0:
            return out
        if self.prefill_kernel == "gqa" and meta.max_seq_len >= 2 * meta.max_query_len:
            return self._gqa_prefill(q, kv_cache, meta, scale, out)
        cfg = self.prefill_config or PrefillConfig.for_shape(head_dim, meta.max_query_len, meta.max_seq_len)
        num_m_tiles = math.ceil(meta.max_query_len / cfg.block_m)
        partition = prefill_partition(num_seqs * num_heads * num_m_tiles, meta.max_query_len, meta.max_seq_len,
                                      _num_sms(q.device), cfg.block_n)
        if partition < meta.max_seq_len:
            return self._split_prefill(q, kv_cache, meta, scale, cfg, num_m_tiles, partition, out)
        _kernels()["prefill"][(num_seqs, num_heads, num_m_tiles)](
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out,
            scale * math.log2(math.e),
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            meta.block_tables.stride(0),
            GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=_next_pow2(head_dim),
            PAGE=page, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            IEEE=q.dtype == torch.float32, QUANT=_quant_kind(kv_cache),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out

    def _split_prefill(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                       cfg: PrefillConfig, num_m_tiles: int, partition: int, out: torch.Tensor) -> torch.Tensor:
        """Prefill with the context split into slices of ``partition`` tokens (see
        :func:`prefill_partition`): partial states per slice, then one merge per query row."""
        num_tokens, num_heads, head_dim = q.shape
        num_parts = math.ceil(meta.max_seq_len / partition)
        room, block_d = PREFILL_MAX_PARTS, _next_pow2(head_dim)
        # Rows of block_d floats: every acc stride is a multiple of 16 whatever num_parts is.
        tmp_acc = torch.empty((num_tokens, num_heads, num_parts, block_d), dtype=torch.float32, device=q.device)
        tmp_m = torch.empty((num_tokens, num_heads, room), dtype=torch.float32, device=q.device)
        tmp_l = torch.empty_like(tmp_m)
        acc_strides, ml_strides = tmp_acc.stride()[:3], tmp_m.stride()[:2]
        num_kv_heads, page = kv_cache.shape[3], kv_cache.shape[2]
        kernels = _kernels()
        kernels["prefill_split"][(meta.seq_lens.shape[0], num_heads, num_m_tiles * num_parts)](
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, tmp_acc, tmp_m, tmp_l,
            scale * math.log2(math.e), partition, num_parts,
            q.stride(0), q.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            meta.block_tables.stride(0), *acc_strides, *ml_strides,
            GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            PAGE=page, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            IEEE=q.dtype == torch.float32, QUANT=_quant_kind(kv_cache),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        kernels["prefill_reduce"][(num_tokens, num_heads)](
            out, tmp_acc, tmp_m, tmp_l, num_parts,
            out.stride(0), out.stride(1), *acc_strides, *ml_strides,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=room,
            num_warps=4,
        )
        return out

    def _gqa_prefill(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                     out: torch.Tensor) -> torch.Tensor:
        """A returning session's turn through ``prefill_gqa_kernel``: one program per
        (sequence, kv head, token tile, context slice), the slices merged in the launch."""
        num_tokens, num_heads, head_dim = q.shape
        num_seqs, num_kv_heads, page = meta.seq_lens.shape[0], kv_cache.shape[3], kv_cache.shape[2]
        group = num_heads // num_kv_heads
        cfg = self.gqa_prefill_config or GqaPrefillConfig.for_head_dim(head_dim)
        block_g = _next_pow2(group)
        block_m = max(cfg.block_rows, block_g)
        num_m_tiles = math.ceil(meta.max_query_len / (block_m // block_g))
        parts = gqa_prefill_parts(num_seqs * num_kv_heads * num_m_tiles, meta.max_seq_len,
                                  _num_sms(q.device), cfg)
        block_d = _next_pow2(head_dim)
        if parts > 1:
            # One scratch buffer: acc [T, H, parts, block_d], then max and sum [T, H, parts]
            # each padded to 16 bytes (Triton specializes on pointer alignment: every step
            # size must compile to the same kernel).
            n_ml = _align(num_tokens * num_heads * parts, 4)
            n_acc = num_tokens * num_heads * parts * block_d
            scratch = torch.empty(n_acc + 2 * n_ml, dtype=torch.float32, device=q.device)
            tmp_acc, tmp_m, tmp_l = scratch[:n_acc], scratch[n_acc:n_acc + n_ml], scratch[n_acc + n_ml:]
            arrival = self._arrival_counters(q.device, num_seqs * num_kv_heads * num_m_tiles)
        else:  # unused by the kernel; float32 all the same, so both cases compile alike
            tmp_acc = tmp_m = tmp_l = torch.empty(4, dtype=torch.float32, device=q.device)
            arrival = self._arrival_counters(q.device, 1)
        _kernels()["prefill_gqa"][(num_seqs, num_kv_heads, num_m_tiles * parts)](
            q, kv_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, out,
            tmp_acc, tmp_m, tmp_l, arrival,
            scale * math.log2(math.e), parts,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
            meta.block_tables.stride(0),
            GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE=page,
            BLOCK_M=block_m, BLOCK_N=cfg.block_n,
            IEEE=q.dtype == torch.float32, QUANT=_quant_kind(kv_cache),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return out


def _align(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
