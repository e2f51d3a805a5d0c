"""Quantized KV cache: int8 and fp8 (e4m3) keys and values with a scale per token and head.

``kv_cache_dtype`` (EngineConfig) picks the format: ``auto`` stores keys and values in the
model's dtype; ``int8`` and ``fp8_e4m3`` store one byte per element. Each (token, kv head)
row of ``head_dim`` elements is quantized against its own absolute maximum, and its float32
scale is packed right behind the row::

    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim + 4]   # int8 or float8_e4m3fn
    row bytes [0, head_dim): the quantized values; [head_dim, head_dim + 4): the float32 scale

So a block carries its own scales: whatever copies a block (export, checkpoints, tiers)
copies the scales with it, and the cache stays one tensor per layer. The scale is per token
rather than per block because decode fills a block one token at a time: a per-block scale
would have to be fixed before the block's later tokens are seen (clipping them) or the whole
block requantized when a larger one arrives; a per-token scale keeps the write a plain
scatter. It costs 4 bytes per row: with head_dim 64 a row takes 68 bytes against 128 in
bf16 (1.88x the blocks at equal memory) and 256 in float32 (3.76x).

The attention backends read this layout themselves (the Triton kernels dequantize tiles as
they load them; the PyTorch reference as it gathers a step's context): there is no separate
dequantize pass over the cache.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "int8")
SCALE_BYTES = 4  # one float32 scale per (token, kv head) row

# Storage dtype and the largest magnitude it represents, by kv_cache_dtype.
_STORAGE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The element dtype of the cache tensors: the model's for ``auto``, one byte otherwise."""
    if kv_cache_dtype == "auto":
        return model_dtype
    try:
        return _STORAGE[kv_cache_dtype]
    except KeyError:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, "
                         f"got {kv_cache_dtype!r}") from None


def row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements per (token, kv head) row of a cache of ``dtype``: the scale rides along
    in quantized caches."""
    if is_quantized(dtype) and head_dim % SCALE_BYTES:
        # The scale must sit on a 4-byte boundary to be read as a float32.
        raise ValueError(f"head_dim must be a multiple of {SCALE_BYTES} for a quantized KV "
                         f"cache, got {head_dim}")
    return head_dim + SCALE_BYTES if is_quantized(dtype) else head_dim


def is_quantized(dtype: torch.dtype) -> bool:
    """True for the one-byte storage dtypes of a quantized cache."""
    return dtype in _QMAX


def qmax(dtype: torch.dtype) -> float:
    """Largest magnitude a quantized value of ``dtype`` takes (the scale maps absmax to it)."""
    return _QMAX[dtype]


def quantize(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Packed rows ``[..., head_dim + 4]`` of ``dtype`` for float rows ``x [..., head_dim]``.

    scale = absmax / qmax (1 for an all-zero row); value = x / scale, rounded to nearest for
    int8, converted (round to nearest even) for fp8, zero always as +0.
    """
    head_dim = x.shape[-1]
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / _QMAX[dtype], torch.ones_like(amax))
    scaled = (xf / scale).clamp(-_QMAX[dtype], _QMAX[dtype])
    values = scaled.round().to(dtype) if dtype == torch.int8 else scaled.to(dtype)
    packed = torch.empty(*x.shape[:-1], head_dim + SCALE_BYTES, dtype=torch.uint8, device=x.device)
    bits = values.view(torch.uint8)
    if dtype == torch.float8_e4m3fn:
        # One zero: a tiny negative value converts to -0 (0x80); store +0, as the Triton
        # write kernel does, so both write the same bytes (they dequantize alike anyway).
        bits = bits.masked_fill(bits == 0x80, 0)
    packed[..., :head_dim] = bits
    packed[..., head_dim:] = scale.view(torch.uint8)
    return packed.view(dtype)


def dequantize(packed: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Float32 rows ``[..., head_dim]`` of packed quantized rows ``[..., head_dim + 4]``."""
    values = packed[..., :head_dim].float()
    scale = packed.view(torch.uint8)[..., head_dim:].contiguous().view(torch.float32)
    return values * scale

