"""Triton kernels behind ``triton_backend``: KV write (alone or fused with RoPE), split-K GQA
decode, prefill (split over the context, with a merge, for few new tokens over a long one).

With a quantized cache (``QUANT`` 1 int8, 2 fp8; layout in ``node/kv/quantization.py``) the
write kernel quantizes each (token, kv head) row and stores its float32 scale behind it, and
the attention kernels dequantize K/V tiles as they load them.

Quantized rows are head_dim + 4 one-byte elements with head_dim a multiple of 4
(``quantization.row_width``), so every row offset is a multiple of 4. Triton cannot see that in
the runtime strides (it specializes integers on multiples of 16 only; a row of 68 is not one)
and would load the one-byte values one at a time: the kernels state it with ``tl.multiple_of``
(on the offsets computed in the kernel itself: a hint on a function argument is dropped), so
K/V tiles load as 4-byte vectors. Float caches need no hint (their strides are multiples of 16).

Imported only when a kernel is first launched, so that CPU-only machines without Triton can
still import the backend module. Launch parameters and the design are described there.
"""

import triton
import triton.language as tl
from ultrakv.node.grid_dependency import await_predecessor


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # fp32 inputs would silently use tf32 on tensor cores; ask for full precision there.
    if IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _scale_ptr(row_ptr, HEAD_DIM: tl.constexpr):
    # A quantized row's float32 scale sits right after its HEAD_DIM one-byte values.
    return (row_ptr + HEAD_DIM).to(tl.pointer_type(tl.float32), bitcast=True)


@triton.jit
def _round_half_even(z):
    # As torch.round and the fp8 conversion do: ties (common with fp16 / bf16 inputs) go to
    # the even neighbour, so the kernel writes the bytes the PyTorch reference writes.
    r = tl.floor(z + 0.5)
    return tl.where((r - z == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0.0), r - 1.0, r)


@triton.jit
def _row_scale(amax, QMAX: tl.constexpr):
    # One scale per row (token, kv head): absmax / QMAX, 1 for an all-zero row. Both this
    # division and the one in _quantize are IEEE (div_rn), as PyTorch's: Triton's `/` on fp32
    # compiles to the approximate div.full.f32 on CUDA (up to 2 ulp off), which pushes
    # quotients that sit on a rounding tie (frequent with bf16 / fp16 inputs) to the other
    # neighbour. For fp8 one such flip moves a value a whole e4m3 step (up to 1/14 of the
    # row's absmax).
    return tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32)), 1.0)


@triton.jit
def _quantize(xf, scale, QUANT: tl.constexpr, QMAX: tl.constexpr):
    # float32 rows [R, C] over their scales [R] -> values exactly representable in the
    # storage type (int8 integers, e4m3 grid points), as quantization.quantize computes them.
    y = tl.math.div_rn(xf, tl.broadcast_to(scale[:, None], xf.shape))
    y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
    if QUANT == 1:  # int8: round to nearest (the conversion itself truncates)
        y = _round_half_even(y)
    else:
        # e4m3: round to nearest on its grid here (3 mantissa bits: a step of 2^(e-3) for
        # |y| in [2^e, 2^(e+1)), 2^-9 below 2^-6), so the conversion to fp8 is exact. Triton's
        # CPU interpreter converts to fp8 without carrying into the exponent (125.8 -> 64);
        # exact inputs make the kernel the same everywhere. The step is a power of two, so
        # scaling by it and by its inverse (built from the exponent bits) is exact. A value
        # that rounds to zero comes out +0, which quantization.quantize writes too.
        biased = tl.maximum((y.to(tl.int32, bitcast=True) >> 23) & 0xFF, 127 - 6)
        step = ((biased - 3) << 23).to(tl.float32, bitcast=True)
        inv_step = ((257 - biased) << 23).to(tl.float32, bitcast=True)
        y = _round_half_even(y * inv_step) * step
    return y


@triton.jit
def _store_quantized(row_ptr, x, offs_d, mask, hmask,
                     HEAD_DIM: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr):
    xf = x.to(tl.float32)
    scale = _row_scale(tl.max(tl.abs(xf), 1), QMAX)
    y = _quantize(xf, scale, QUANT, QMAX)
    tl.store(row_ptr[:, None] + offs_d[None, :], y.to(row_ptr.dtype.element_ty), mask=mask)
    tl.store(_scale_ptr(row_ptr, HEAD_DIM), scale, mask=hmask)


@triton.jit
def write_kv_kernel(
    K, V, KV, SLOT,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kind, stride_block, stride_tok, stride_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, QMAX: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(SLOT + t).to(tl.int64)
    if slot >= 0:
        row = (slot // PAGE) * stride_block + (slot % PAGE) * stride_tok
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        hmask = offs_h < NUM_KV_HEADS
        mask = hmask[:, None] & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :],
                    mask=mask, other=0.0)
        v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :],
                    mask=mask, other=0.0)
        if QUANT:
            # Quantized in the write: the cache never holds float K/V (QUANT 1 int8, 2 fp8).
            k_off = tl.multiple_of(row + offs_h * stride_head, 4)
            v_off = tl.multiple_of(row + stride_kind + offs_h * stride_head, 4)
            _store_quantized(KV + k_off, k, offs_d, mask, hmask, HEAD_DIM, QUANT, QMAX)
            _store_quantized(KV + v_off, v, offs_d, mask, hmask, HEAD_DIM, QUANT, QMAX)
        else:
            dst = KV + row + offs_h[:, None] * stride_head + offs_d[None, :]
            tl.store(dst, k, mask=mask)
            tl.store(dst + stride_kind, v, mask=mask)


@triton.jit
def rope_write_kv_kernel(
    QKV, COS, SIN, KV, SLOT,
    stride_t, stride_cs,
    stride_kind, stride_block, stride_tok, stride_head,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr,
    QUANT: tl.constexpr, QMAX: tl.constexpr, PDL: tl.constexpr,
):
    await_predecessor(PDL)
    # One program per token of the fused projection output [T, (H + 2 KVH) * D]: RoPE on its
    # query heads (in place, for the attention kernel to read) and on its key heads, then the
    # rotated keys and the values into the token's cache slot: the work of fused_kernels.rope_
    # and write_kv_kernel in one launch, with the same arithmetic (the same explicit fmas; keys rounded to the model
    # dtype after the rotation, as rope_ stores them, before they are quantized). The two
    # halves of a head are separate tiles of identical layout, so each thread reads both
    # halves of the elements it writes: rotating in place needs no barrier.
    HALF: tl.constexpr = HEAD_DIM // 2
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, HALF)
    # The tables repeat cos over both halves and carry the rotation's sign in sin's first half.
    c1 = tl.load(COS + t * stride_cs + offs).to(tl.float32)
    c2 = tl.load(COS + t * stride_cs + HALF + offs).to(tl.float32)
    s1 = tl.load(SIN + t * stride_cs + offs).to(tl.float32)
    s2 = tl.load(SIN + t * stride_cs + HALF + offs).to(tl.float32)
    row = QKV + t * stride_t

    hq = tl.arange(0, BLOCK_Q)
    qmask = (hq < NUM_HEADS)[:, None]
    q_ptr = row + hq[:, None] * HEAD_DIM + offs[None, :]
    x1 = tl.load(q_ptr, mask=qmask, other=0.0).to(tl.float32)
    x2 = tl.load(q_ptr + HALF, mask=qmask, other=0.0).to(tl.float32)
    tl.store(q_ptr, tl.fma(x1, c1, x2 * s1).to(QKV.dtype.element_ty), mask=qmask)
    tl.store(q_ptr + HALF, tl.fma(x2, c2, x1 * s2).to(QKV.dtype.element_ty), mask=qmask)

    slot = tl.load(SLOT + t).to(tl.int64)
    if slot >= 0:
        hk = tl.arange(0, BLOCK_KV)
        hmask = hk < NUM_KV_HEADS
        kmask = hmask[:, None]
        k_ptr = row + (NUM_HEADS + hk)[:, None] * HEAD_DIM + offs[None, :]
        y1 = tl.load(k_ptr, mask=kmask, other=0.0).to(tl.float32)
        y2 = tl.load(k_ptr + HALF, mask=kmask, other=0.0).to(tl.float32)
        k1 = tl.fma(y1, c1, y2 * s1).to(QKV.dtype.element_ty)
        k2 = tl.fma(y2, c2, y1 * s2).to(QKV.dtype.element_ty)
        offs_d = tl.arange(0, HEAD_DIM)
        vmask = kmask & (offs_d[None, :] < HEAD_DIM)
        v = tl.load(row + (NUM_HEADS + NUM_KV_HEADS + hk)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=vmask, other=0.0)
        dst = (slot // PAGE) * stride_block + (slot % PAGE) * stride_tok + hk * stride_head
        if QUANT:
            k_off = tl.multiple_of(dst, 4)  # rows start on 4-byte boundaries (module docstring)
            v_off = tl.multiple_of(dst + stride_kind, 4)
            k1f = k1.to(tl.float32)
            k2f = k2.to(tl.float32)
            scale = _row_scale(tl.maximum(tl.max(tl.abs(k1f), 1), tl.max(tl.abs(k2f), 1)), QMAX)
            k_rows = KV + k_off
            tl.store(k_rows[:, None] + offs[None, :],
                     _quantize(k1f, scale, QUANT, QMAX).to(KV.dtype.element_ty), mask=kmask)
            tl.store(k_rows[:, None] + HALF + offs[None, :],
                     _quantize(k2f, scale, QUANT, QMAX).to(KV.dtype.element_ty), mask=kmask)
            tl.store(_scale_ptr(k_rows, HEAD_DIM), scale, mask=hmask)
            _store_quantized(KV + v_off, v, offs_d, vmask, hmask, HEAD_DIM, QUANT, QMAX)
        else:
            k_rows = KV + dst
            tl.store(k_rows[:, None] + offs[None, :], k1, mask=kmask)
            tl.store(k_rows[:, None] + HALF + offs[None, :], k2, mask=kmask)
            tl.store(KV + dst[:, None] + stride_kind + offs_d[None, :], v, mask=vmask)


@triton.jit
def decode_kernel(
    Q, KV, BT, SEQ, OUT, TMP_ACC, TMP_M, TMP_L, ARRIVED,
    qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kind, stride_block, stride_tok, stride_head,
    stride_bt,
    stride_acc_b, stride_acc_h, stride_acc_s, stride_ml_b, stride_ml_h,
    COS, SIN, SLOT, stride_cs, k_col, v_col,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
    PARTITION: tl.constexpr, SINGLE: tl.constexpr, BLOCK_S: tl.constexpr,
    IEEE: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr,
    BLOCK_G2: tl.constexpr, MERGE_S: tl.constexpr, QMAX: tl.constexpr, ROPE: tl.constexpr,
):
    # With ROPE, Q is the qkv projection's output before RoPE (row b: the token's query heads,
    # then its key heads from column k_col, its value heads from v_col): each program rotates
    # its query heads as it loads them, and the program whose partition holds the new token
    # rotates the token's key, writes it and the value into the token's cache slot (quantized
    # in a quantized cache) and only then reads its partition, so the separate RoPE + KV write
    # launch (rope_write_kv_kernel, same arithmetic) is not needed. Only that program reads
    # the new token's slot; the CTA barrier orders its own stores before its loads.
    await_predecessor(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    seq_len = tl.load(SEQ + b)
    start = part * PARTITION
    end = tl.minimum(start + PARTITION, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUP + offs_g
    gmask = offs_g < GROUP
    dmask = offs_d < HEAD_DIM
    q_rows = Q + b * stride_qt + heads[:, None] * stride_qh
    qmask = gmask[:, None] & dmask[None, :]
    q = tl.load(q_rows + offs_d[None, :], mask=qmask, other=0.0)
    if ROPE:
        # x * cos + roll(x, D / 2) * sin with the signed tables: per element the fma of
        # rope_write_kv_kernel, rounded to the model dtype as it stores.
        rolled = (offs_d + HEAD_DIM // 2) % HEAD_DIM
        cos = tl.load(COS + b * stride_cs + offs_d).to(tl.float32)[None, :]
        sin = tl.load(SIN + b * stride_cs + offs_d).to(tl.float32)[None, :]
        q_roll = tl.load(q_rows + rolled[None, :], mask=qmask, other=0.0)
        q = tl.fma(q.to(tl.float32), cos, q_roll.to(tl.float32) * sin).to(Q.dtype.element_ty)
        slot = tl.load(SLOT + b).to(tl.int64)
        if (part == (seq_len - 1) // PARTITION) & (slot >= 0):
            k_row = Q + b * stride_qt + k_col + kvh * HEAD_DIM
            k = tl.load(k_row + offs_d[None, :]).to(tl.float32)
            k = tl.fma(k, cos, tl.load(k_row + rolled[None, :]).to(tl.float32) * sin).to(Q.dtype.element_ty)
            v = tl.load(Q + b * stride_qt + v_col + kvh * HEAD_DIM + offs_d[None, :])
            dst = (slot // PAGE) * stride_block + (slot % PAGE) * stride_tok + kvh * stride_head
            one = tl.full([1], 0, tl.int64)
            if QUANT:
                k_off = tl.multiple_of(dst, 4)  # rows start on 4-byte boundaries (module docstring)
                v_off = tl.multiple_of(dst + stride_kind, 4)
                always = tl.full([1], 1, tl.int1)
                _store_quantized(KV + k_off + one, k, offs_d, always[:, None] & dmask[None, :], always,
                                 HEAD_DIM, QUANT, QMAX)
                _store_quantized(KV + v_off + one, v, offs_d, always[:, None] & dmask[None, :], always,
                                 HEAD_DIM, QUANT, QMAX)
            else:
                tl.store(KV + dst + one[:, None] + offs_d[None, :], k)
                tl.store(KV + dst + stride_kind + one[:, None] + offs_d[None, :], v)
            tl.debug_barrier()

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base, v_base = _kv_bases(KV, kvh, stride_kind, stride_head, QUANT)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < end
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_base, v_base, BT + b * stride_bt, offs_n, nmask,
                                     nmask[None, :], offs_d, dmask, qk_scale, stride_block, stride_tok,
                                     HEAD_DIM, PAGE, IEEE, QUANT)

    if SINGLE:
        # l_i == 0 only for an empty (padded, seq_len 0) row: write zeros, not NaN.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(OUT + b * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:
        acc_ptr = (TMP_ACC + b * stride_acc_b + heads[:, None] * stride_acc_h
                   + part * stride_acc_s + offs_d[None, :])
        tl.store(acc_ptr, acc, mask=gmask[:, None] & dmask[None, :])
        ml_off = b * stride_ml_b + heads * stride_ml_h + part
        tl.store(TMP_M + ml_off, m_i, mask=gmask)
        tl.store(TMP_L + ml_off, l_i, mask=gmask)
        # The last of the (sequence, kv head)'s partition programs to finish merges them all
        # (flash-decoding's reduce without a second launch). The barrier puts every thread's
        # partial stores before the counter's release; the acquire orders the merge's loads
        # after every other program's stores. The merging program zeroes the counter again,
        # so the next launch (or CUDA graph replay) finds it at 0.
        tl.debug_barrier()
        arrived = ARRIVED + b * tl.num_programs(1) + kvh
        if tl.atomic_add(arrived, 1, sem="acq_rel") == tl.num_programs(2) - 1:
            _merge_group_partitions(OUT, TMP_ACC, TMP_M, TMP_L, b, kvh, tl.cdiv(seq_len, PARTITION),
                                    stride_ot, stride_oh, stride_acc_b, stride_acc_h, stride_acc_s,
                                    stride_ml_b, stride_ml_h, GROUP, BLOCK_G2, HEAD_DIM, BLOCK_D, BLOCK_S,
                                    MERGE_S)
            tl.atomic_xchg(arrived, 0, sem="relaxed")


@triton.jit
def _merge_group_partitions(
    OUT, TMP_ACC, TMP_M, TMP_L, b, kvh, num_parts,
    stride_ot, stride_oh, stride_acc_b, stride_acc_h, stride_acc_s, stride_ml_b, stride_ml_h,
    GROUP: tl.constexpr, BLOCK_G2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr, MERGE_S: tl.constexpr,
):
    # Every query head of kv head kvh's group merged at once (one round of loads for the
    # group, not one per head): each head's partitions (acc, max, sum) rescaled to its
    # global max. The maxima and sums of all partitions come in one tile; the partial
    # outputs in chunks of MERGE_S partitions (a few registers per thread whatever the
    # context). Loads bypass L1 (.cg): the partials were written by other programs.
    offs_gs = tl.arange(0, BLOCK_G2 * BLOCK_S)
    g = offs_gs // BLOCK_S
    part = offs_gs % BLOCK_S
    ml_mask = (g < GROUP) & (part < num_parts)
    ml_off = b * stride_ml_b + (kvh * GROUP + g) * stride_ml_h + part
    m = tl.reshape(tl.load(TMP_M + ml_off, mask=ml_mask, other=float("-inf"), cache_modifier=".cg"),
                   [BLOCK_G2, BLOCK_S])
    l_part = tl.reshape(tl.load(TMP_L + ml_off, mask=ml_mask, other=0.0, cache_modifier=".cg"),
                        [BLOCK_G2, BLOCK_S])
    m_max = tl.max(m, 1)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    den = tl.sum(l_part * tl.exp2(m - m_max[:, None]), 1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    offs_r = tl.arange(0, BLOCK_G2 * MERGE_S)
    rg = offs_r // MERGE_S
    rs = offs_r % MERGE_S
    heads_r = kvh * GROUP + rg
    num = tl.zeros([BLOCK_G2, BLOCK_D], tl.float32)
    for s0 in range(0, num_parts, MERGE_S):
        rmask = (rg < GROUP) & (s0 + rs < num_parts)
        ml_r = b * stride_ml_b + heads_r * stride_ml_h + s0 + rs
        m_r = tl.reshape(tl.load(TMP_M + ml_r, mask=rmask, other=float("-inf"), cache_modifier=".cg"),
                         [BLOCK_G2, MERGE_S])
        w = tl.where(m_r == float("-inf"), 0.0, tl.exp2(m_r - m_max[:, None]))
        acc = tl.load(TMP_ACC + b * stride_acc_b + heads_r[:, None] * stride_acc_h
                      + (s0 + rs)[:, None] * stride_acc_s + offs_d[None, :],
                      mask=rmask[:, None] & dmask[None, :], other=0.0, cache_modifier=".cg")
        num += tl.sum(tl.reshape(acc, [BLOCK_G2, MERGE_S, BLOCK_D]) * w[:, :, None], 1)
    out = num / tl.where(den > 0, den, 1.0)[:, None]
    offs_g = tl.arange(0, BLOCK_G2)
    tl.store(OUT + b * stride_ot + (kvh * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=(offs_g < GROUP)[:, None] & dmask[None, :])


@triton.jit
def _merge_partitions(
    OUT, TMP_ACC, TMP_M, TMP_L, b, h, num_parts,
    stride_ot, stride_oh, stride_acc_b, stride_acc_h, stride_acc_s, stride_ml_b, stride_ml_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Query head h's output from its partitions' (acc, max, sum): rescaled to the global max.
    # Loads bypass L1 (.cg): the partials were written by other programs, on other SMs.
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < num_parts
    dmask = offs_d < HEAD_DIM
    ml_off = b * stride_ml_b + h * stride_ml_h + offs_s
    m = tl.load(TMP_M + ml_off, mask=smask, other=float("-inf"), cache_modifier=".cg")
    l_part = tl.load(TMP_L + ml_off, mask=smask, other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(smask, tl.exp2(m - m_max), 0.0)
    acc = tl.load(TMP_ACC + b * stride_acc_b + h * stride_acc_h
                  + offs_s[:, None] * stride_acc_s + offs_d[None, :],
                  mask=smask[:, None] & dmask[None, :], other=0.0, cache_modifier=".cg")
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l_part * w, 0)
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(OUT + b * stride_ot + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty),
             mask=dmask)


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, k_base, v_base, bt_row, offs_n, nmask, visible, offs_d, dmask, qk_scale,
    stride_block, stride_tok,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr,
):
    # One step of the online softmax, shared by the decode and prefill kernels (inlined, so it
    # costs nothing): the K/V tile of context tokens offs_n (nmask: inside the range), read
    # through the sequence's block-table row, against the query rows q; ``visible`` [rows,
    # tokens] says which scores count (causal mask, range). Returns the updated unnormalised
    # acc, running max (log2 domain: qk_scale carries log2(e)) and running sum.
    blk = tl.load(bt_row + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
    row = blk * stride_block + (offs_n % PAGE) * stride_tok
    if QUANT:
        row = tl.multiple_of(row, 4)  # rows start on 4-byte boundaries (module docstring)
    lmask = nmask[:, None] & dmask[None, :]
    k = tl.load(k_base + row[:, None] + offs_d[None, :], mask=lmask, other=0.0)
    v = tl.load(v_base + row[:, None] + offs_d[None, :], mask=lmask, other=0.0)
    if QUANT:
        # Dequantized on load: one-byte values widen exactly to q's dtype; the per-token
        # scales multiply the scores (keys) and the probabilities (values).
        k_scale = tl.load(_scale_ptr(k_base + row, HEAD_DIM), mask=nmask, other=0.0)
        v_scale = tl.load(_scale_ptr(v_base + row, HEAD_DIM), mask=nmask, other=0.0)
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    s = _dot(q, tl.trans(k), IEEE) * qk_scale
    if QUANT:
        s = s * k_scale[None, :]
    s = tl.where(visible, s, float("-inf"))
    # A row can see nothing yet (past q_len, or causally before the tile): keep its max
    # finite so exp2 stays 0 instead of NaN.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if QUANT:
        p = p * v_scale[None, :]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _kv_bases(KV, kvh, stride_kind, stride_head, QUANT: tl.constexpr):
    # Where kv head kvh's keys and values start in the cache.
    k_head = kvh * stride_head
    v_head = stride_kind + kvh * stride_head
    if QUANT:  # rows start on 4-byte boundaries (module docstring)
        k_head = tl.multiple_of(k_head, 4)
        v_head = tl.multiple_of(v_head, 4)
    return KV + k_head, KV + v_head


@triton.jit
def _prefill_attend(
    q, pos_m, KV, BT, b, kvh, kv_lo, kv_hi, qk_scale,
    stride_kind, stride_block, stride_tok, stride_head, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, QUANT: tl.constexpr,
):
    # Online softmax of BLOCK_M query rows (absolute positions pos_m) over context tokens
    # [kv_lo, kv_hi) of sequence b in kv head kvh, causal: the rows' unnormalised acc,
    # running max and sum.
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base, v_base = _kv_bases(KV, kvh, stride_kind, stride_head, QUANT)
    for n0 in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < kv_hi
        visible = (offs_n[None, :] <= pos_m[:, None]) & nmask[None, :]
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_base, v_base, BT + b * stride_bt, offs_n, nmask,
                                     visible, offs_d, dmask, qk_scale, stride_block, stride_tok,
                                     HEAD_DIM, PAGE, IEEE, QUANT)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["partition", "num_parts"])
def prefill_split_kernel(
    Q, KV, BT, SEQ, QSL, TMP_ACC, TMP_M, TMP_L,
    qk_scale, partition, num_parts,
    stride_qt, stride_qh,
    stride_kind, stride_block, stride_tok, stride_head,
    stride_bt,
    stride_acc_t, stride_acc_h, stride_acc_s, stride_ml_t, stride_ml_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, QUANT: tl.constexpr,
):
    # prefill_kernel over one slice of the context (``partition`` tokens from
    # ``part * partition``), storing the partial state (unnormalised acc, max, sum) of each
    # query and head for prefill_reduce_kernel. A slice past a tile's causal end stores
    # m = -inf, l = 0, acc = 0, which the merge weighs zero.
    b = tl.program_id(0)
    h = tl.program_id(1)
    mt = tl.program_id(2) // num_parts
    part = tl.program_id(2) % num_parts
    q_start = tl.load(QSL + b)
    q_len = tl.load(QSL + b + 1) - q_start
    if mt * BLOCK_M < q_len:
        seq_len = tl.load(SEQ + b)
        prefix = seq_len - q_len
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mmask = offs_m < q_len
        dmask = offs_d < HEAD_DIM
        q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh
                    + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
        kv_lo = part * partition
        kv_hi = tl.minimum(tl.minimum(seq_len, prefix + (mt + 1) * BLOCK_M), kv_lo + partition)
        acc, m_i, l_i = _prefill_attend(q, prefix + offs_m, KV, BT, b, h // GROUP, kv_lo, kv_hi, qk_scale,
                                        stride_kind, stride_block, stride_tok, stride_head, stride_bt,
                                        HEAD_DIM, BLOCK_D, PAGE, BLOCK_M, BLOCK_N, IEEE, QUANT)
        rows = q_start + offs_m
        tl.store(TMP_ACC + rows[:, None] * stride_acc_t + h * stride_acc_h + part * stride_acc_s
                 + offs_d[None, :], acc, mask=mmask[:, None] & dmask[None, :])
        ml_off = rows * stride_ml_t + h * stride_ml_h + part
        tl.store(TMP_M + ml_off, m_i, mask=mmask)
        tl.store(TMP_L + ml_off, l_i, mask=mmask)


@triton.jit(do_not_specialize=["num_parts"])
def prefill_reduce_kernel(
    OUT, TMP_ACC, TMP_M, TMP_L, num_parts,
    stride_ot, stride_oh,
    stride_acc_t, stride_acc_h, stride_acc_s, stride_ml_t, stride_ml_h,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # One program per (new token, query head): its slices merged as decode merges partitions.
    _merge_partitions(OUT, TMP_ACC, TMP_M, TMP_L, tl.program_id(0), tl.program_id(1), num_parts,
                      stride_ot, stride_oh, stride_acc_t, stride_acc_h, stride_acc_s,
                      stride_ml_t, stride_ml_h, HEAD_DIM, BLOCK_D, BLOCK_S)


@triton.jit
def prefill_kernel(
    Q, KV, BT, SEQ, QSL, OUT,
    qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kind, stride_block, stride_tok, stride_head,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, QUANT: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    mt = tl.program_id(2)
    q_start = tl.load(QSL + b)
    q_len = tl.load(QSL + b + 1) - q_start
    if mt * BLOCK_M < q_len:
        seq_len = tl.load(SEQ + b)
        prefix = seq_len - q_len  # tokens already cached before this step's new ones
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mmask = offs_m < q_len
        dmask = offs_d < HEAD_DIM
        q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh
                    + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
        pos_m = prefix + offs_m  # absolute position of each query in its context
        kv_end = tl.minimum(seq_len, prefix + (mt + 1) * BLOCK_M)

        acc, m_i, l_i = _prefill_attend(q, pos_m, KV, BT, b, h // GROUP, 0, kv_end, qk_scale,
                                        stride_kind, stride_block, stride_tok, stride_head, stride_bt,
                                        HEAD_DIM, BLOCK_D, PAGE, BLOCK_M, BLOCK_N, IEEE, QUANT)

        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(OUT + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh
                 + offs_d[None, :], out.to(OUT.dtype.element_ty),
                 mask=mmask[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=["num_parts"])
def prefill_gqa_kernel(
    Q, KV, BT, SEQ, QSL, OUT, TMP_ACC, TMP_M, TMP_L, ARRIVED,
    qk_scale, num_parts,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kind, stride_block, stride_tok, stride_head,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr, QUANT: tl.constexpr,
):
    # One program per (sequence, kv head, tile of BLOCK_M // BLOCK_G new tokens, context
    # slice): its rows are every query head of the kv head's group for each of the tile's
    # tokens (row r: token r // BLOCK_G, head r % BLOCK_G of the group), so each K/V tile is
    # read once per kv head, not once per query head. The tile's causal context
    # [0, its last token's position] is cut into num_parts equal slices of whole inner tiles,
    # sized from the sequence's real length (loaded), not from the launch's bound: a graph
    # captured for a longer context splits a shorter one evenly. With num_parts > 1 each
    # program stores its slice's partial state and the last of a tile's programs to arrive
    # merges them in the same launch, as decode_kernel does (no second kernel). num_parts is
    # a runtime value, so every split compiles to the same kernel (no JIT while serving).
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    mt = tl.program_id(2) // num_parts
    part = tl.program_id(2) % num_parts
    TOKENS: tl.constexpr = BLOCK_M // BLOCK_G
    q_start = tl.load(QSL + b)
    q_len = tl.load(QSL + b + 1) - q_start
    if mt * TOKENS < q_len:
        seq_len = tl.load(SEQ + b)
        prefix = seq_len - q_len
        offs_r = tl.arange(0, BLOCK_M)
        tok = mt * TOKENS + offs_r // BLOCK_G
        g = offs_r % BLOCK_G
        rmask = (tok < q_len) & (g < GROUP)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < HEAD_DIM
        qrow = (q_start + tok).to(tl.int64)
        head = kvh * GROUP + g
        io_mask = rmask[:, None] & dmask[None, :]
        q = tl.load(Q + qrow[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=io_mask, other=0.0)
        tile_end = tl.minimum(seq_len, prefix + (mt + 1) * TOKENS)
        per = tl.cdiv(tl.cdiv(tile_end, num_parts), BLOCK_N) * BLOCK_N
        kv_lo = part * per
        kv_hi = tl.minimum(tile_end, kv_lo + per)
        acc, m_i, l_i = _prefill_attend(q, prefix + tok, KV, BT, b, kvh, kv_lo, kv_hi, qk_scale,
                                        stride_kind, stride_block, stride_tok, stride_head, stride_bt,
                                        HEAD_DIM, BLOCK_D, PAGE, BLOCK_M, BLOCK_N, IEEE, QUANT)
        out_ptr = OUT + qrow[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        if num_parts == 1:
            tl.store(out_ptr, (acc / tl.where(l_i > 0, l_i, 1.0)[:, None]).to(OUT.dtype.element_ty),
                     mask=io_mask)
        else:
            # Partials of (token, head, slice) at [T, H, num_parts] (acc rows BLOCK_D wide).
            ml_off = (qrow * (tl.num_programs(1) * GROUP) + head) * num_parts
            tl.store(TMP_ACC + (ml_off + part)[:, None] * BLOCK_D + offs_d[None, :], acc, mask=io_mask)
            tl.store(TMP_M + ml_off + part, m_i, mask=rmask)
            tl.store(TMP_L + ml_off + part, l_i, mask=rmask)
            # Ordering as in decode_kernel: every thread's stores before the release, the
            # merge's loads (.cg: written on other SMs) after the acquire; the merging program
            # zeroes the counter for the next launch or graph replay.
            tl.debug_barrier()
            arrived = ARRIVED + (b * tl.num_programs(1) + kvh) * (tl.num_programs(2) // num_parts) + mt
            if tl.atomic_add(arrived, 1, sem="acq_rel") == num_parts - 1:
                m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
                l_run = tl.zeros([BLOCK_M], tl.float32)
                acc_run = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
                for p in range(num_parts):
                    m_p = tl.load(TMP_M + ml_off + p, mask=rmask, other=float("-inf"), cache_modifier=".cg")
                    l_p = tl.load(TMP_L + ml_off + p, mask=rmask, other=0.0, cache_modifier=".cg")
                    acc_p = tl.load(TMP_ACC + (ml_off + p)[:, None] * BLOCK_D + offs_d[None, :], mask=io_mask,
                                    other=0.0, cache_modifier=".cg")
                    m_new = tl.maximum(m_run, m_p)
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    a_run = tl.exp2(m_run - m_safe)
                    a_p = tl.exp2(m_p - m_safe)
                    l_run = l_run * a_run + l_p * a_p
                    acc_run = acc_run * a_run[:, None] + acc_p * a_p[:, None]
                    m_run = m_new
                tl.store(out_ptr, (acc_run / tl.where(l_run > 0, l_run, 1.0)[:, None]).to(OUT.dtype.element_ty),
                         mask=io_mask)
                tl.atomic_xchg(arrived, 0, sem="relaxed")
