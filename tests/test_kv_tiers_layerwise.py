"""Layer-wise tier loads (KVTiers layerwise, EngineConfig.kv_tier_layerwise): a load's blocks
enter the pool group of layers by group as the forward reaches them, bit-exact with a
whole load; on CPU through the same code path (synchronous copies), the CUDA branches with
stand-in streams and events, and on CUDA itself (gpu-marked)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from test_kv_tiers import (  # noqa: F401
    BS,
    GREEDY,
    PROMPTS,
    _engine,
    _planned,
    _prompts,
    _run,
    _StandInEvent,
    _StandInStream,
    reference,
)
from ultrakv.node import Engine, EngineConfig
from ultrakv.node.kv.disk_tier import DiskTier
from ultrakv.node.kv.host_tier import HostTier
from ultrakv.node.kv.tiers import BlockIdentity, KVTiers, stacked_kv

LAYERS = 4  # four groups of one layer (LAYER_GROUPS)
HASHES = [1011, 900, 1006, 905, 1009, 902, 1007]
TARGETS = [3, 10, 1, 8, 0, 4, 2]


def _stacked_caches(device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    caches = list(torch.randn((LAYERS, 2, 12, BS, 2, 4), generator=g).to(device).unbind(0))
    assert stacked_kv(caches) is not None
    return caches


def _tiers(caches: list[torch.Tensor], tmp_path: Path, layerwise: bool) -> KVTiers:
    identity = BlockIdentity("fp-layers", "float32", BS)
    shape = KVTiers.block_shape(caches)
    host = HostTier(6, shape, caches[0].dtype, pin=caches[0].is_cuda)
    disk = DiskTier(tmp_path / str(layerwise), identity.namespace, identity.key, shape, caches[0].dtype, 1 << 30)
    return KVTiers(caches, identity, host, disk, batched=True, layerwise=layerwise)


def _offload_and_wipe(caches: list[torch.Tensor], tiers: KVTiers) -> dict[int, int]:
    """Blocks offloaded into host slots with holes, one spilled to disk (both sources of a
    load), the caches zeroed; returns hash -> the pool block it came from."""
    for block, h in enumerate(range(900, 906)):
        tiers.on_evict(block, h)
    tiers.flush()
    tiers.settle()
    for h in (901, 903, 904):
        tiers.host.discard(h)
    for block in (9, 6, 11, 7):
        tiers.on_evict(block, 1000 + block)
    tiers.flush()
    tiers.settle()
    tiers.disk.flush()
    for c in caches:
        c.zero_()
    return {900: 0, 902: 2, 905: 5, **{1000 + b: b for b in (9, 6, 11, 7)}}


def _layer_in_place(caches, original, want, layer: int) -> bool:
    return all(torch.equal(caches[layer][:, dst], original[layer][:, want[h]])
               for h, dst in zip(HASHES, TARGETS, strict=True))


def test_a_layerwise_load_enters_the_pool_as_the_forward_reaches_each_layer(tmp_path):
    """Nothing is in the pool when the load returns; layer_ready(i) brings the groups up to
    layer i's and no further; layers_ready() the rest; the end state is bit-exact and equal
    to a whole (not layer-wise) load's."""
    caches = _stacked_caches()
    original = [c.clone() for c in caches]
    tiers = _tiers(caches, tmp_path, layerwise=True)
    try:
        assert tiers.layerwise and not tiers.layers_pending
        want = _offload_and_wipe(caches, tiers)
        assert _planned(tiers, HASHES) == len(HASHES)
        assert tiers.load(HASHES, TARGETS) == len(HASHES)
        assert tiers.counters.disk_hits == 1 and tiers.layers_pending
        assert not any(_layer_in_place(caches, original, want, layer) for layer in range(LAYERS))
        tiers.layer_ready(1)
        assert [_layer_in_place(caches, original, want, layer) for layer in range(LAYERS)] == [True, True, False, False]
        tiers.layer_ready(1)  # again: nothing more
        assert not _layer_in_place(caches, original, want, 2)
        tiers.layers_ready()
        assert not tiers.layers_pending
        assert all(_layer_in_place(caches, original, want, layer) for layer in range(LAYERS))
        layered = torch.stack(caches).clone()
    finally:
        tiers.close()
    caches = _stacked_caches()
    whole = _tiers(caches, tmp_path, layerwise=False)
    try:
        _offload_and_wipe(caches, whole)
        assert _planned(whole, HASHES) == len(HASHES) and whole.load(HASHES, TARGETS) == len(HASHES)
        assert torch.equal(torch.stack(caches), layered)
    finally:
        whole.close()


def test_evicting_a_block_still_loading_layerwise_offloads_all_its_layers(tmp_path):
    """A loaded block let go before any forward reached it (its request could not be
    scheduled) and evicted: the flush puts every layer in place before copying it out."""
    caches = _stacked_caches()
    original = [c.clone() for c in caches]
    tiers = _tiers(caches, tmp_path, layerwise=True)
    try:
        want = _offload_and_wipe(caches, tiers)
        assert _planned(tiers, HASHES[:1]) == 1 and tiers.load(HASHES[:1], [5]) == 1
        tiers.host.discard(HASHES[0])  # only the pool has it now
        tiers.on_evict(5, HASHES[0])
        tiers.flush()
        tiers.settle()
        assert not tiers.layers_pending
        assert torch.equal(tiers.host.slot(tiers.host.slot_of(HASHES[0])),
                           torch.stack([o[:, want[HASHES[0]]] for o in original]))
    finally:
        tiers.close()


def test_layerwise_cuda_branch_waits_per_group_on_the_compute_stream(tmp_path, monkeypatch):
    """The CUDA branch with stand-in streams and events: one event per group recorded on the
    load stream, and the compute stream waits for a group's event only when the forward
    reaches that group (not when the load is issued); blocks land bit-exact."""
    main = _StandInStream()
    monkeypatch.setattr(torch.cuda, "Event", _StandInEvent)
    monkeypatch.setattr(torch.cuda, "Stream", _StandInStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: None, raising=False)
    caches = _stacked_caches()
    original = [c.clone() for c in caches]
    tiers = _tiers(caches, tmp_path, layerwise=True)
    offload, load = _StandInStream(), _StandInStream()
    tiers._stream, tiers._load_stream = offload, load
    monkeypatch.setattr(tiers, "_index_tensor", lambda ids: torch.tensor(ids))
    try:
        want = _offload_and_wipe(caches, tiers)
        assert _planned(tiers, HASHES) == len(HASHES) and tiers.load(HASHES, TARGETS) == len(HASHES)
        assert main in load.waited_streams  # the load stream starts after the compute stream's work
        (pending,) = tiers._layer_loads
        assert len(pending.events) == LAYERS and all(e.recorded_on is load for e in pending.events)
        before = list(main.waited_events)
        assert not set(map(id, pending.events)) & set(map(id, before))
        tiers.layer_ready(0)
        assert [id(e) for e in main.waited_events[len(before):]] == [id(pending.events[0])]
        tiers.layers_ready()
        assert [id(e) for e in main.waited_events[len(before):]] == [id(e) for e in pending.events]
        assert all(_layer_in_place(caches, original, want, layer) for layer in range(LAYERS))
    finally:
        tiers.close()


def test_generation_with_layerwise_loads_equals_without(reference):  # noqa: F811
    """The engine on CPU with layer-wise loads: the model's layer hook paces every load, and
    the tokens and hits are those of whole loads (and of no tiers at all)."""
    engine = _engine(kv_cpu_gib=0.01, kv_tier_layerwise=True)
    readied: list[int] = []
    hook = engine.model.kv_ready
    assert hook is not None and engine.tiers.layerwise

    def ready(layer: int) -> None:
        if engine.tiers.layers_pending:
            readied.append(layer)
        hook(layer)

    engine.model.kv_ready = ready
    try:
        tokens, cached = _run(engine)
        loaded = engine.stats()["kv_tiers"]["loaded"]
    finally:
        engine.shutdown()
    assert tokens == reference[0]
    assert cached == [2 * BS] * len(PROMPTS) and loaded >= 2 * len(PROMPTS)
    assert readied and set(readied) == {0, 1}  # tiny: two layers, each its own group


@pytest.mark.gpu
def test_layerwise_loads_are_bit_exact_on_cuda(tmp_path):
    """On CUDA: the group copies on the load stream, each group's scatter after its event,
    the same pool as a whole load; an engine with graphs generates the same tokens with
    layer-wise loads as without tiers."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    results = []
    for layerwise in (False, True):
        caches = _stacked_caches("cuda")
        tiers = _tiers(caches, tmp_path, layerwise)
        try:
            _offload_and_wipe(caches, tiers)
            assert _planned(tiers, HASHES) == len(HASHES) and tiers.load(HASHES, TARGETS) == len(HASHES)
            tiers.layers_ready()
            torch.cuda.synchronize()
            results.append(torch.stack(caches).cpu())
        finally:
            tiers.close()
    assert torch.equal(*results)
    runs = []
    for tiers in ({"kv_cpu_gib": 0.01, "kv_tier_layerwise": True}, {}):
        engine = Engine(EngineConfig(model="tiny", device="cuda", block_size=BS, num_blocks=6,
                                     num_scheduler_steps=1, **tiers))
        if engine.tiers is not None:
            engine.tiers.cost.blocks_to_load = len  # load every hit (the subject is the load path)
        try:
            runs.append(_run(engine))
            if engine.tiers is not None:
                assert engine.stats()["kv_tiers"]["loaded"] > 0 and all(runs[-1][1])
        finally:
            engine.shutdown()
    assert runs[0][0] == runs[1][0]


class _StandInGraphs:
    """A CudaGraphRunner's face to the runner, on CPU: a lone prefill of at most ``tokens``
    new tokens "fits" a prefill graph, every decode step a decode graph; it notes whether a
    layer-wise load was pending when asked to replay (a graph calls no layer hook) and
    computes eagerly."""

    lockstep = False  # one process (CudaGraphRunner.lockstep)

    def __init__(self, engine: Engine, tokens: int) -> None:
        self.engine = engine
        self.tokens = tokens
        self.prefills: list[bool] = []  # per run_prefill: loads pending then
        self.decodes: list[bool] = []

    def prefill_shape(self, start: int, num_new: int):
        return (start, num_new) if 1 < num_new <= self.tokens else None

    def run_prefill(self, shape, token_ids, start, block_table):
        self.prefills.append(self.engine.tiers.layers_pending)
        return None  # the runner then runs the step eagerly

    def can_run(self, meta) -> bool:
        return meta.is_decode_only

    def run(self, input_ids, positions, meta):
        self.decodes.append(self.engine.tiers.layers_pending)
        return self.engine.model(input_ids, positions, self.engine.kv_caches, meta)


@pytest.mark.parametrize("graph_tokens, layered", [(512, False), (1, True)], ids=["graph_step", "eager_step"])
def test_layerwise_loads_only_for_prefills_that_run_eagerly(reference, graph_tokens, layered):  # noqa: F811
    """Where prefill graphs replay (CUDA), a returning turn that one prefill graph takes
    loads its prefix whole (a graph calls no hook, and the whole copies run at full speed);
    one with more new tokens than three graph-sized steps runs eagerly and loads layer by
    layer. No graph ever replays with a load pending; tokens are unchanged."""
    engine = _engine(kv_cpu_gib=0.01, kv_tier_layerwise=True)
    graphs = engine.runner.graphs = _StandInGraphs(engine, graph_tokens)
    engine.scheduler.graph_prefill_tokens = graph_tokens
    readied: list[int] = []
    hook = engine.model.kv_ready

    def ready(layer: int) -> None:
        if engine.tiers.layers_pending:
            readied.append(layer)
        hook(layer)

    engine.model.kv_ready = ready
    deferred: list[int] = []  # layer-wise loads, by their block count
    defer = engine.tiers._defer
    engine.tiers._defer = lambda staged, events, ids: (deferred.append(len(ids)), defer(staged, events, ids))
    try:
        tokens, cached = _run(engine)  # each prompt's second turn: a lone prefill of 5 new tokens
    finally:
        engine.shutdown()
    assert tokens == reference[0] and cached == [2 * BS] * len(PROMPTS)
    assert not any(graphs.prefills) and not any(graphs.decodes)
    assert bool(deferred) == bool(readied) == layered
    if not layered:
        assert len(graphs.prefills) >= len(PROMPTS)  # the returning turns replayed their graph


def test_a_graph_replay_puts_pending_layerwise_loads_in_place_first(reference):  # noqa: F811
    """The runner's safety net: a step that replays a graph with a layer-wise load pending
    (here the scheduler is told there are no prefill graphs, so it loads layer by layer,
    while the runner has them) readies every group before the replay."""
    engine = _engine(kv_cpu_gib=0.01, kv_tier_layerwise=True)
    graphs = engine.runner.graphs = _StandInGraphs(engine, 512)
    deferred: list[int] = []
    defer = engine.tiers._defer
    engine.tiers._defer = lambda staged, events, ids: (deferred.append(len(ids)), defer(staged, events, ids))
    try:
        tokens, _ = _run(engine)
    finally:
        engine.shutdown()
    assert tokens == reference[0]
    assert deferred and len(graphs.prefills) >= len(PROMPTS) and not any(graphs.prefills)
