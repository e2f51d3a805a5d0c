"""A session turn run on a stand-in while its owner is overloaded: the pure choice of the
stand-in (coordinator/session_offload.py), the session store's conditional append, and the
engine's prepare/append pair (a racing turn makes the append fail, never fork the history)."""

import pytest
from ultrakv.cluster.block_events import BlockEvent, BlockEventBatch
from ultrakv.cluster.block_hashing import hash_token_blocks
from ultrakv.cluster.ring import HashRing
from ultrakv.coordinator.block_index import BlockIndex
from ultrakv.coordinator.session_offload import StandIn, choose_stand_in, may_stand_in
from ultrakv.node import Engine, EngineConfig, SamplingParams
from ultrakv.node.outputs import GenerateRequest
from ultrakv.node.sessions import SessionStore, TurnConflictError

BS = 4
EPS = 0.25
HASHES = hash_token_blocks(list(range(40)), BS)  # a turn's prompt: 10 full blocks


def index_holding(held: dict[str, int]) -> BlockIndex:
    """An index where each node holds that many leading blocks of HASHES."""
    index = BlockIndex()
    for node, n in held.items():
        index.apply(node, BlockEventBatch("e-" + node, 0, BS, (BlockEvent(0, True, "gpu", tuple(HASHES[:n])),),
                                          snapshot=True, reset=True))
    return index


RING = HashRing(["n1", "n2", "n3"])
SID = "conversation-7"
OWNER = RING.lookup(SID)
OTHERS = [n for n in RING.lookup_n(SID, 3) if n != OWNER]  # clockwise: the replica holder first
BUSY = {OWNER: 9}  # over its bound: ceil(1.25 * 10 / 3) = 5


def test_an_owner_under_its_bound_runs_its_turns():
    index = index_holding({OTHERS[0]: 10})
    assert not may_stand_in(RING, OWNER, {OWNER: 4, OTHERS[0]: 4, OTHERS[1]: 4}, EPS)
    # One request in flight in all puts its node at a tight bound, yet moving the turn would
    # only swap which node is busier.
    assert not may_stand_in(RING, OWNER, {OWNER: 1}, EPS)
    assert choose_stand_in(RING, SID, OWNER, HASHES, index, {OWNER: 1}, EPS) is None
    assert choose_stand_in(RING, SID, OWNER, HASHES, index, {OWNER: 2}, EPS) == StandIn(OTHERS[0], 10)


def test_an_overloaded_owner_gives_the_turn_to_the_longest_prefix_holder():
    index = index_holding({OTHERS[0]: 6, OTHERS[1]: 9, OWNER: 10})
    assert choose_stand_in(RING, SID, OWNER, HASHES, index, BUSY, EPS) == StandIn(OTHERS[1], 9)


def test_ties_go_to_the_ring_successor_and_too_short_a_prefix_keeps_the_owner():
    index = index_holding({OTHERS[0]: 7, OTHERS[1]: 7})
    assert choose_stand_in(RING, SID, OWNER, HASHES, index, BUSY, EPS) == StandIn(OTHERS[0], 7)
    # Less than half the prompt cached elsewhere (a shared preamble): the owner keeps it.
    short = index_holding({OTHERS[0]: 4, OTHERS[1]: 2})
    assert choose_stand_in(RING, SID, OWNER, HASHES, short, BUSY, EPS) is None
    assert choose_stand_in(RING, SID, OWNER, HASHES, index_holding({}), BUSY, EPS) is None
    assert choose_stand_in(RING, SID, OWNER, [], index, BUSY, EPS) is None


def test_a_prefix_holder_over_its_own_bound_is_passed_over():
    index = index_holding({OTHERS[0]: 10, OTHERS[1]: 8})
    loads = {OWNER: 9, OTHERS[0]: 9}
    assert choose_stand_in(RING, SID, OWNER, HASHES, index, loads, EPS) == StandIn(OTHERS[1], 8)
    everyone = {OWNER: 9, OTHERS[0]: 9, OTHERS[1]: 9}
    assert not may_stand_in(RING, OWNER, everyone, EPS)
    assert choose_stand_in(RING, SID, OWNER, HASHES, index, everyone, EPS) is None


# -- the session store's conditional append ------------------------------------------------


def test_append_turn_needs_the_version_it_ran_from_and_no_running_turn():
    store = SessionStore(max_sessions=8)
    store.begin_turn("s", "t")
    store.end_turn("s", [1, 2, 3])
    assert store.turn_version("s", "t") == (1, False)
    with pytest.raises(TurnConflictError, match="had 0 turns .* it has 1 turns now"):
        store.append_turn("s", "t", 0, [1, 2, 3, 4], [])
    store.begin_turn("s", "t")  # a turn runs on the owner now
    with pytest.raises(TurnConflictError, match="a turn is running on it"):
        store.append_turn("s", "t", 1, [1, 2, 3, 4], [])
    store.end_turn("s", [1, 2, 3, 9, 9])
    assert store.get("s").token_ids == [1, 2, 3, 9, 9] and store.get("s").turns == 2


def test_append_turn_is_applied_once_and_a_repeat_is_a_no_op():
    store = SessionStore(max_sessions=8)
    assert store.append_turn("s", "t", 0, [1, 2, 7], []) is True  # a new session's first turn
    assert store.append_turn("s", "t", 0, [1, 2, 7], []) is False  # a retried commit
    assert store.get("s").turns == 1 and store.get("s").token_ids == [1, 2, 7]
    with pytest.raises(TurnConflictError):  # the same version with another output: a fork
        store.append_turn("s", "t", 0, [1, 2, 8], [])


def test_append_turn_continues_a_newer_replica():
    store = SessionStore(max_sessions=8)
    store.store_replica("s", [5, 6], 3, "t")
    assert store.turn_version("s", "t") == (3, False)
    assert store.append_turn("s", "t", 3, [5, 6, 7, 8], [])
    assert store.newest("s") == (store.get("s"), False) and store.get("s").turns == 4


# -- the engine: prepare on the owner, run elsewhere, append -------------------------------


@pytest.fixture(scope="module")
def engines():
    config = EngineConfig(model="tiny", device="cpu", num_blocks=64, max_model_len=256)
    owner, stand_in = Engine(config), Engine(config)
    yield owner, stand_in
    owner.shutdown()
    stand_in.shutdown()


def _turn(text: str) -> GenerateRequest:
    return GenerateRequest(prompt=text, session_id="chat", sampling=SamplingParams(max_tokens=6, temperature=0.0))


def test_a_turn_run_elsewhere_leaves_the_owner_as_if_it_ran_there(engines):
    owner, stand_in = engines
    first = _turn("Hello there, owner.")
    seq = owner.add_request(first)
    while owner.has_unfinished():
        owner.step()
    history = owner.sessions.get("chat").token_ids
    assert seq.num_prompt_tokens < len(history)

    second = _turn(" And the next question?")
    prepared = owner.prepare_turn(second)
    assert prepared.turns == 1 and not prepared.busy and prepared.token_ids[: len(history)] == history
    assert not prepared.would_wait and prepared.free_slots == owner.scheduler.max_num_seqs
    out = stand_in.generate([prepared.token_ids], SamplingParams(max_tokens=6, temperature=0.0))[0]
    recorded, applied = owner.append_turn(second, prepared.turns, prepared.token_ids, out.token_ids,
                                          out.text, out.finish_reason)
    assert applied and recorded.prompt_token_ids == prepared.token_ids
    session = owner.sessions.get("chat")
    assert session.turns == 2 and session.token_ids == prepared.token_ids + out.token_ids
    # A repeated commit changes nothing; one from the old version is refused.
    assert owner.append_turn(second, 1, prepared.token_ids, out.token_ids, out.text, "length")[1] is False
    with pytest.raises(TurnConflictError):
        owner.append_turn(second, 1, prepared.token_ids, out.token_ids[:-1], out.text, "length")
    # The owner's next turn continues the appended history (its KV recomputed where missing).
    third = owner.add_request(_turn(" Thanks."))
    while owner.has_unfinished():
        owner.step()
    appended = prepared.token_ids + out.token_ids
    assert third.token_ids[: len(appended)] == appended and len(third.token_ids) > len(appended)
    assert owner.sessions.get("chat").turns == 3


def test_an_owner_with_a_queue_says_the_turn_would_wait(engines):
    owner, _ = engines
    queued = owner.add_request(GenerateRequest(prompt=[1, 2, 3], sampling=SamplingParams(max_tokens=2)))
    try:  # not stepped: it waits for admission
        waiting = owner.prepare_turn(_turn("Anyone there?"))
        assert waiting.would_wait and waiting.free_slots == 0
    finally:
        owner.abort(queued.request_id)
    assert not owner.prepare_turn(_turn("Anyone there?")).would_wait


def test_a_turn_that_ran_on_the_owner_meanwhile_makes_the_append_fail(engines):
    owner, stand_in = engines
    request = GenerateRequest(prompt=[5, 6, 7], session_id="race",
                              sampling=SamplingParams(max_tokens=4, temperature=0.0))
    prepared = owner.prepare_turn(request)
    assert prepared.turns == 0
    out = stand_in.generate([prepared.token_ids], SamplingParams(max_tokens=4, temperature=0.0))[0]
    racing = GenerateRequest(prompt=[9, 9], session_id="race", sampling=SamplingParams(max_tokens=2))
    owner.add_request(racing)
    while owner.has_unfinished():
        owner.step()
    before = list(owner.sessions.get("race").token_ids)
    with pytest.raises(TurnConflictError, match="had 0 turns"):
        owner.append_turn(request, 0, prepared.token_ids, out.token_ids, out.text, out.finish_reason)
    assert owner.sessions.get("race").token_ids == before and owner.sessions.get("race").turns == 1
