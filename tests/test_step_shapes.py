"""Eager steps run at a fixed set of padded row counts, which warmup runs once.

cuBLAS pays on the host for each matrix shape it has not met (a heuristic query, and a
kernel load when it picks a kernel not used before): on an H100 the first cold prompt of a
new length cost 6-8 ms more than the next (benchmarks/probe_first_eager.py). Here, on the CPU
with padding switched on as CUDA has it: the buckets bound padding, a padded step computes
what an unpadded one does (its inputs checked field by field against the unpadded step's,
and the generated tokens equal), and every product a serving mix meets was run by
``warm_matmuls`` first.
"""

from __future__ import annotations

import pytest
import torch
from serving_mix import serving_mix
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.step_shapes import row_bucket, row_buckets, token_bucket, token_buckets


def test_buckets_cover_every_count_with_bounded_padding():
    buckets = token_buckets(8192)
    assert len(buckets) == 88 and buckets == sorted(set(buckets)) and buckets[-1] == 8192
    for n in range(1, 8193):
        b = token_bucket(n)
        assert b in buckets and b >= n
        assert b - n < 16 if n <= 256 else (b - n) / n < 0.125
    assert token_buckets(270) == [*range(16, 257, 16), 288]  # 270 tokens pad to 288
    assert [row_bucket(n) for n in (1, 2, 16, 17, 256)] == [1, 16, 16, 32, 256]
    assert row_buckets(40) == [1, 16, 32, 48]
    for bad in (0, -3):
        with pytest.raises(ValueError, match="at least one"):
            token_bucket(bad)
        with pytest.raises(ValueError, match="at least one"):
            row_bucket(bad)


def _engine(pad: bool, dtype: str = "float32") -> Engine:
    engine = Engine(EngineConfig(model="tiny", device="cpu", dtype=dtype, num_blocks=512, block_size=16,
                                 max_num_batched_tokens=256, max_num_seqs=32, max_model_len=1024))
    engine.runner.pad_eager_steps = pad
    return engine


def _mix(engine: Engine) -> list[list[int]]:
    return serving_mix(engine, (3, 37, 50, 129, 300, 17, 1, 64), seed=5, max_tokens=6)


def _check_padding(runner, unpadded, padded, rows) -> None:
    """The padded step's inputs against the same step's unpadded ones."""
    ids, pos, meta, last = unpadded
    p_ids, p_pos, p_meta, p_last = padded
    n, size = ids.shape[0], p_ids.shape[0]
    extra = size - n
    assert size == token_bucket(n)
    assert torch.equal(p_ids[:n], ids) and torch.equal(p_pos[:n], pos)
    assert torch.equal(p_meta.slot_mapping[:n], meta.slot_mapping)
    assert (p_ids[n:] == 0).all() and (p_pos[n:] == pos[-1]).all() and (p_meta.slot_mapping[n:] == -1).all()
    # The padding extends the last sequence: its query and context grow by it, nothing else.
    assert torch.equal(p_meta.query_start_loc[:-1], meta.query_start_loc[:-1])
    assert int(p_meta.query_start_loc[-1]) == int(meta.query_start_loc[-1]) + extra
    assert torch.equal(p_meta.seq_lens[:-1], meta.seq_lens[:-1])
    assert int(p_meta.seq_lens[-1]) == int(meta.seq_lens[-1]) + extra
    width = meta.block_tables.shape[1]
    assert torch.equal(p_meta.block_tables[:, :width], meta.block_tables)
    assert p_meta.block_tables.shape[1] * runner.block_size >= int(p_meta.seq_lens[-1])
    if rows:
        r = len(rows)
        assert p_last.shape[0] == row_bucket(r)
        assert torch.equal(p_last[:r], last[:r]) and (p_last[r:] == last[r - 1]).all()


def test_padded_steps_compute_what_unpadded_steps_do():
    padded = _engine(pad=True)
    runner = padded.runner
    prepare = runner.prepare
    seen: list[tuple[int, int]] = []

    def checked(scheduled, rows=None, pad=False):
        if not pad:
            return prepare(scheduled, rows, pad)
        rows_ = rows if rows is not None else [i for i, item in enumerate(scheduled) if item.samples]
        plain = [x.clone() if torch.is_tensor(x) else x for x in prepare(scheduled, rows, pad=False)]
        plain[2] = type(plain[2])(**{k: (v.clone() if torch.is_tensor(v) else v)
                                     for k, v in vars(plain[2]).items()})
        out = prepare(scheduled, rows, pad=True)
        if plain[2].max_query_len > 1:
            _check_padding(runner, plain, out, rows_)
            seen.append((plain[0].shape[0], out[0].shape[0]))
        return out

    runner.prepare = checked
    assert _mix(padded) == _mix(_engine(pad=False))
    # The mix did pad: several steps, some of them more than a few tokens.
    assert len(seen) >= 3 and any(size - n > 8 for n, size in seen), seen


def test_warm_matmuls_runs_every_product_a_padded_step_meets():
    engine = _engine(pad=True, dtype="bfloat16")  # plain nn.Linear layers (float32 packs them for oneDNN)
    runner, model = engine.runner, engine.model
    met: set[tuple[tuple[int, ...], int]] = set()
    decode = [False]

    def record(module, args, _out):
        if not decode[0]:
            met.add((tuple(module.weight.shape), args[0].shape[0]))

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(record)
    compute_logits = model.compute_logits

    def logits(hidden, upcast=True):
        if not decode[0]:
            met.add((("logits",), hidden.shape[0]))
        return compute_logits(hidden, upcast)

    model.compute_logits = logits
    ran = runner.warm_matmuls()
    warmed = set(met)
    distinct = {(tuple(m.weight.shape), m.bias is not None) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert ran == len(token_buckets(256)) * len(distinct) + len(row_buckets(32))
    assert {n for shape, n in warmed if shape == ("logits",)} == set(row_buckets(32))
    met.clear()
    prepare = runner.prepare

    def marked(*args, **kwargs):
        out = prepare(*args, **kwargs)
        decode[0] = out[2].is_decode_only  # decode steps replay CUDA graphs there, unpadded here
        return out

    runner.prepare = marked
    _mix(engine)
    assert met and met <= warmed, sorted(met - warmed)
