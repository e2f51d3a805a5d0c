"""Where blocks live, for routing: the node's event log, the wire checks, the coordinator's
index (events, gaps, resync, removal) and the longest-prefix choice under bounded load."""

import grpc
import pytest
from ultrakv.cluster.block_events import (
    MAX_EVENTS_PER_MESSAGE,
    MAX_HASHES_PER_EVENT,
    BlockEvent,
    BlockEventBatch,
    batch_from_message,
    batch_to_message,
)
from ultrakv.cluster.block_hashing import chain_root, hash_token_blocks
from ultrakv.cluster.ring import HashRing, bounded_lookup
from ultrakv.cluster.validation import RequestRejected
from ultrakv.coordinator.block_index import BlockIndex, Cursor, HashScheme
from ultrakv.coordinator.prefix_router import PrefixChoice, choose_node, overloaded
from ultrakv.node.kv.block_event_log import BlockEventLog
from ultrakv.node.kv.block_pool import BlockPool
from ultrakv.v1 import node_pb2 as npb

BS = 4


def sync(index: BlockIndex, node: str, log: BlockEventLog) -> list[BlockEventBatch]:
    """Deliver what ``log`` owes ``node``'s cursor, through the wire form, as the feed does."""
    cursor = index.cursor(node)
    batches = [batch_from_message(batch_to_message(b)) for b in log.read(cursor.epoch, cursor.seq)]
    for batch in batches:
        assert index.apply(node, batch)
    return batches


def test_pool_changes_reach_the_index_through_the_log():
    pool, log, index = BlockPool(8, BS), BlockEventLog(BS), BlockIndex()
    pool.add_observer(log)
    a = hash_token_blocks(list(range(12)), BS)
    blocks = pool.allocate(3)
    for b, h in zip(blocks, a, strict=True):
        pool.commit(b, h)
    first = sync(index, "n1", log)
    assert first[0].snapshot and first[0].reset  # a new subscriber starts from a snapshot
    assert index.prefix_lengths(a, ["n1"]) == {"n1": 3}
    assert index.holders(a[0]) == {"n1": ("gpu",)}
    pool.free(blocks)
    pool.evict_unreferenced()
    later = sync(index, "n1", log)
    assert [b.snapshot for b in later] == [False]  # continued, not a snapshot
    assert index.num_blocks("n1") == 0 and index.holders(a[0]) == {}
    assert index.cursor("n1") == Cursor(log.epoch, log.seq)
    assert sync(index, "n1", log) == []  # up to date: nothing owed


def test_tiers_add_up_and_leave_one_by_one():
    log, index = BlockEventLog(BS), BlockIndex()
    sync(index, "n1", log)
    log(True, [1, 2], "gpu")
    log(True, [2], "cpu")
    log(False, [2], "gpu")
    sync(index, "n1", log)
    assert index.holders(2) == {"n1": ("cpu",)} and index.holders(1) == {"n1": ("gpu",)}
    log(False, [2], "disk")  # a tier that never held it: nothing changes
    log(False, [2], "cpu")
    sync(index, "n1", log)
    assert index.holders(2) == {} and index.num_blocks("n1") == 1


def test_a_sequence_gap_is_refused_and_resynced_from_a_snapshot():
    log, index = BlockEventLog(BS), BlockIndex()
    sync(index, "n1", log)
    log(True, [1], "gpu")
    log(True, [2], "gpu")
    log(False, [1], "gpu")
    lost, *rest = log.read(log.epoch, index.cursor("n1").seq)[0].events
    gap = BlockEventBatch(log.epoch, rest[-1].seq, BS, tuple(rest))  # event 1 never arrived
    assert not index.apply("n1", gap)
    assert index.prefix_lengths([2], ["n1"]) == {"n1": 0}  # nothing of it was applied
    index.forget_cursor("n1")
    again = sync(index, "n1", log)
    assert again[0].reset and index.holders(2) == {"n1": ("gpu",)} and index.holders(1) == {}


def test_a_restarted_node_new_epoch_resets_what_was_known():
    old, index = BlockEventLog(BS), BlockIndex()
    old(True, [1, 2, 3], "gpu")
    sync(index, "n1", old)
    new = BlockEventLog(BS)  # the same node id, a new process
    new(True, [7], "gpu")
    # Deltas of another epoch are refused...
    assert not index.apply("n1", BlockEventBatch(new.epoch, 1, BS, (BlockEvent(1, True, "gpu", (7,)),)))
    # ...and the new process answers the old cursor with a snapshot that resets.
    sync(index, "n1", new)
    assert index.num_blocks("n1") == 1 and index.holders(1) == {}
    assert index.cursor("n1").epoch == new.epoch


def test_deltas_hashed_another_way_are_refused():
    index = BlockIndex()
    log = BlockEventLog(BS, chain_root=7)
    sync(index, "n1", log)
    assert index.scheme("n1") == HashScheme(BS, 7)
    log(True, [1], "gpu")
    (delta,) = log.read(log.epoch, index.cursor("n1").seq)
    assert not index.apply("n1", BlockEventBatch(log.epoch, delta.seq, BS, delta.events))  # root lost
    assert not index.apply("n1", BlockEventBatch(log.epoch, delta.seq, BS * 2, delta.events, chain_root=7))
    assert index.apply("n1", delta)


def test_a_subscriber_older_than_the_kept_events_gets_a_snapshot():
    log, index = BlockEventLog(BS, max_events=4), BlockIndex()
    sync(index, "n1", log)
    for h in range(10):
        log(True, [h], "gpu")
    batches = sync(index, "n1", log)
    assert batches[0].reset and index.num_blocks("n1") == 10


def test_a_full_log_owes_a_subscriber_exactly_the_events_after_its_cursor():
    log = BlockEventLog(BS, max_events=4)
    for h in range(10):  # the log keeps events 7..10
        log(True, [h], "gpu")
    for since in (6, 8, 9):
        (delta,) = log.read(log.epoch, since)
        assert not delta.snapshot
        assert [e.seq for e in delta.events] == list(range(since + 1, 11))
        assert [e.hashes for e in delta.events] == [(h,) for h in range(since, 10)]
    assert log.read(log.epoch, 10) == []


def test_a_dropped_node_leaves_the_index():
    index = BlockIndex()
    for node in ("n1", "n2"):
        index.apply(node, BlockEventBatch("e-" + node, 0, BS, (BlockEvent(0, True, "gpu", (1, 2)),),
                                          snapshot=True, reset=True))
    index.drop("n1")
    assert index.holders(1) == {"n2": ("gpu",)} and index.nodes() == ["n2"]
    assert index.cursor("n1") == Cursor()


def test_big_changes_and_snapshots_stay_within_the_caps():
    log = BlockEventLog(BS)
    log(True, range(MAX_HASHES_PER_EVENT * 2 + 5), "gpu")
    assert log.seq == 3  # one change split into capped events
    snapshot = log.read("", 0)
    assert all(len(e.hashes) <= MAX_HASHES_PER_EVENT for b in snapshot for e in b.events)
    index = BlockIndex()
    for batch in snapshot:
        assert index.apply("n1", batch_from_message(batch_to_message(batch)))
    assert index.num_blocks("n1") == MAX_HASHES_PER_EVENT * 2 + 5


def test_capped_index_ignores_blocks_past_the_limit():
    index = BlockIndex(max_blocks_per_node=3)
    index.apply("n1", BlockEventBatch("e", 0, BS, (BlockEvent(0, True, "gpu", (1, 2, 3, 4, 5)),),
                                      snapshot=True, reset=True))
    assert index.num_blocks("n1") == 3 and index.dropped_over_cap == 2


@pytest.mark.parametrize(("message", "field"), [
    (npb.BlockEventsMessage(epoch="", block_size=BS), "epoch"),
    (npb.BlockEventsMessage(epoch="e" * 65, block_size=BS), "epoch"),
    (npb.BlockEventsMessage(epoch="e", block_size=0), "block_size"),
    (npb.BlockEventsMessage(epoch="e", block_size=BS, events=[
        npb.BlockEvent(seq=1, stored=True, tier="tape", hashes=[1])]), "events[0].tier"),
    (npb.BlockEventsMessage(epoch="e", block_size=BS, events=[
        npb.BlockEvent(seq=1, stored=True, tier="gpu", hashes=range(MAX_HASHES_PER_EVENT + 1))]),
     "events[0].hashes"),
    (npb.BlockEventsMessage(epoch="e", block_size=BS, events=[
        npb.BlockEvent(seq=i + 1, stored=True, tier="gpu") for i in range(MAX_EVENTS_PER_MESSAGE + 1)]),
     "events"),
    (npb.BlockEventsMessage(epoch="e", block_size=BS, snapshot=True, events=[
        npb.BlockEvent(seq=0, stored=False, tier="gpu", hashes=[1])]), "events[0]"),
    (npb.BlockEventsMessage(epoch="e", block_size=BS, reset=True), "reset"),
])
def test_bad_messages_are_refused_naming_field_and_limit(message, field):
    with pytest.raises(RequestRejected) as caught:
        batch_from_message(message)
    assert caught.value.field == field and caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def _index_with(held: dict[str, list[int]]) -> BlockIndex:
    index = BlockIndex()
    for node, hashes in held.items():
        index.apply(node, BlockEventBatch("e-" + node, 0, BS, (BlockEvent(0, True, "gpu", tuple(hashes)),),
                                          snapshot=True, reset=True))
    return index


def test_the_longest_prefix_wins_over_the_first_block_hash():
    ring = HashRing(("n1", "n2", "n3"))
    prompt = hash_token_blocks(list(range(40)), BS)  # 10 blocks
    key = "prefix:k"
    first_block_choice = bounded_lookup(ring, key, {}, 0.25)
    others = [n for n in ring.nodes if n != first_block_choice]
    # The first-block node holds 2 blocks, another 7, the third 5 of them.
    index = _index_with({first_block_choice: prompt[:2], others[0]: prompt[:7], others[1]: prompt[:5]})
    choice = choose_node(ring, key, prompt, index, {}, 0.25)
    assert (choice.node, choice.matched_blocks) == (others[0], 7)


def test_a_shared_preamble_alone_is_not_followed():
    """Prompts that share only their first blocks (a common preamble) spread to the node
    with the fewest blocks cached instead of piling onto the preamble's holder."""
    ring = HashRing(("n1", "n2", "n3"))
    preamble = list(range(8))  # 2 blocks
    cached = hash_token_blocks(preamble + [50] * 32, BS)  # a prompt n1 holds: 10 blocks
    index = _index_with({"n1": cached, "n2": hash_token_blocks([7] * 24, BS)})  # n2: 6 others
    new = hash_token_blocks(preamble + [60] * 32, BS)
    assert index.prefix_lengths(new, ["n1"]) == {"n1": 2}
    assert choose_node(ring, "prefix:k", new, index, {}, 0.25) == PrefixChoice("n3", 0, "spread")
    # The same prompt again is followed to where it is.
    assert choose_node(ring, "prefix:k", cached, index, {}, 0.25) == PrefixChoice("n1", 10, "prefix")
    # A prompt without a full block: the first-block key under bounded load, as before.
    assert choose_node(ring, "prefix:k", [], index, {}, 0.25).node == bounded_lookup(ring, "prefix:k", {}, 0.25)


def test_bounded_load_passes_over_a_full_prefix_holder():
    ring = HashRing(("n1", "n2", "n3"))
    prompt = hash_token_blocks(list(range(40)), BS)
    index = _index_with({"n1": prompt[:9], "n2": prompt[:6]})
    loads = {"n1": 6, "n2": 1, "n3": 1}  # capacity ceil(1.25 * 9 / 3) = 4: n1 is over it
    assert overloaded(ring, "n1", loads, 0.25) and not overloaded(ring, "n2", loads, 0.25)
    assert choose_node(ring, "prefix:k", prompt, index, loads, 0.25) == PrefixChoice("n2", 6, "prefix")
    # Every holder over its bound: the node under it.
    assert choose_node(ring, "prefix:k", prompt, index, {"n1": 6, "n2": 6, "n3": 0}, 0.25).node == "n3"


def test_ties_break_alike_in_every_coordinator():
    ring = HashRing(("n1", "n2", "n3"))
    prompt = hash_token_blocks(list(range(16)), BS)
    index = _index_with({"n1": prompt, "n2": prompt, "n3": prompt})
    picks = {choose_node(ring, "prefix:k", prompt, index, {}, 0.25).node for _ in range(5)}
    assert picks == {ring.lookup("prefix:k")}


def test_tenants_never_match_each_others_prefix():
    ring = HashRing(("n1", "n2"))
    tokens = list(range(32))
    index = _index_with({"n2": hash_token_blocks(tokens, BS, salt="tenant-a")})
    other = hash_token_blocks(tokens, BS, salt="tenant-b")
    assert choose_node(ring, "prefix:k", other, index, {}, 0.25).matched_blocks == 0
    own = hash_token_blocks(tokens, BS, salt="tenant-a")
    assert choose_node(ring, "prefix:k", own, index, {}, 0.25) == PrefixChoice("n2", 8, "prefix")


def test_a_restarted_node_announces_the_blocks_its_disk_tier_kept(tmp_path):
    from ultrakv.node import Engine, EngineConfig, SamplingParams
    from ultrakv.node.server import NodeServer

    def engine() -> Engine:
        return Engine(EngineConfig(model="tiny", device="cpu", block_size=16, num_blocks=8,
                                   kv_disk_dir=str(tmp_path), kv_write_policy="write_through"))

    first = engine()
    try:
        first.generate([list(range(1, 40))], SamplingParams(max_tokens=2, temperature=0.0))
        first.tiers.disk.flush()
    finally:
        first.shutdown()
    kept = set(hash_token_blocks(list(range(1, 39)), 16))
    restarted = engine()
    try:
        log = NodeServer(restarted).block_log  # built before any request: from the scan alone
        assert kept <= log.held("disk")
        snapshot = log.read("", 0)
        assert snapshot[0].reset
        assert kept <= {h for b in snapshot for e in b.events if e.tier == "disk" for h in e.hashes}
    finally:
        restarted.shutdown()


def test_a_node_streams_its_block_events_and_tokenizes_over_grpc():
    """The node's two internal calls over a real server: BlockEvents (snapshot, then each
    change as it happens; a bad epoch refused naming the field) and Tokenize (what a
    generation would run; a session refused)."""
    import contextlib
    import queue
    import threading

    from ultrakv.node import Engine, EngineConfig, SamplingParams
    from ultrakv.node.server import BackgroundServer
    from ultrakv.v1 import node_pb2_grpc
    from ultrakv.v1 import types_pb2 as pb

    # A quantized cache: its hashes chain from the dtype's root, which the stream carries.
    engine = Engine(EngineConfig(model="tiny", device="cpu", block_size=16, num_blocks=32,
                                 kv_cache_dtype="int8"))
    try:
        with BackgroundServer(engine) as srv, grpc.insecure_channel(srv.address) as channel:
            stub = node_pb2_grpc.NodeServiceStub(channel)
            text = "a shared system prompt, long enough for a few blocks of sixteen bytes"
            ids = stub.Tokenize(pb.GenerateRequest(text=text), timeout=30).token_ids
            assert list(ids) == engine.tokenizer.encode(text, add_bos=True)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Tokenize(pb.GenerateRequest(text=text, session_id="s"), timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert ("ultrakv-field", "session_id") in caught.value.trailing_metadata()
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.BlockEvents(npb.BlockEventsRequest(epoch="e" * 65), timeout=30))
            assert ("ultrakv-field", "epoch") in caught.value.trailing_metadata()

            call = stub.BlockEvents(npb.BlockEventsRequest(), timeout=60)
            messages: queue.Queue = queue.Queue()

            def read() -> None:
                with contextlib.suppress(grpc.RpcError):  # cancelled at the end
                    for message in call:
                        messages.put(message)

            threading.Thread(target=read, daemon=True).start()
            snapshot = batch_from_message(messages.get(timeout=30))
            assert snapshot.reset and snapshot.events == ()  # nothing cached yet
            assert snapshot.chain_root == chain_root("int8") is not None
            engine.generate([list(ids)], SamplingParams(max_tokens=2, temperature=0.0))
            index = BlockIndex()
            assert index.apply("n", snapshot)
            assert index.scheme("n") == HashScheme(16, chain_root("int8"))
            want = set(hash_token_blocks(list(ids), 16, "", chain_root("int8")))
            while not want <= index.blocks("n"):
                assert index.apply("n", batch_from_message(messages.get(timeout=30)))
            call.cancel()
    finally:
        engine.shutdown()
