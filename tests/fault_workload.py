"""A conversational load for the fault-injection tests and ``benchmarks/bench_faults.py``.

Clients hold conversations of ``turns`` turns each (then start a new session), against
every coordinator of a cluster (the client fails over between them), while a fault is
injected. The client-side record of each session is
the truth: the history it was acknowledged (every successful turn's prompt and completion
token ids, in order). After the load, every session's history as its owner node stores it
is fetched and compared token for token: a turn missing is *lost*, any other difference is
*rewritten*.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from ultrakv.client import AsyncClient, RequestError
from ultrakv.client.local_cluster import LocalCluster
from ultrakv.cluster.peer_auth import read_cluster_secret
from ultrakv.cluster.peers import PeerChannels
from ultrakv.cluster.session_transfer import chunks_to_state
from ultrakv.v1 import node_pb2 as npb

PROMPT_TOKENS = 11  # never a whole block: each turn leaves a partial block behind
STALL_S = 6.0  # SIGSTOP this long: past the coordinators' down detection (3 misses of 1 s)
TINY_BLOCKS = 12  # 192 tokens of KV: two 6-turn conversations (90 tokens each) fit


@dataclass
class Turn:
    """One request of a session as the client saw it (monotonic seconds)."""

    started: float
    finished: float
    ok: bool
    prompt: list[int]
    completion: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    error: str = ""


@dataclass
class Conversation:
    """One session as its client saw it."""

    session_id: str
    index: int
    turns: list[Turn] = field(default_factory=list)

    @property
    def acknowledged(self) -> list[int]:
        """The history the client was told the session has."""
        out: list[int] = []
        for t in self.turns:
            if t.ok:
                out += t.prompt + t.completion
        return out

    def prompt(self, turn: int) -> list[int]:
        return [(self.index * 7 + turn * 13 + i) % 250 + 1 for i in range(PROMPT_TOKENS)]


def first_difference(have: list[int], want: list[int]) -> str:
    """Where a stored history departs from the acknowledged one, for failure messages."""
    at = next((i for i, (a, b) in enumerate(zip(have, want, strict=False)) if a != b),
              min(len(have), len(want)))
    return f"stored {len(have)} tokens, acknowledged {len(want)}, first difference at {at}"


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]


@dataclass
class FaultReport:
    """What one scenario measured; ``lost`` and ``rewritten`` name sessions."""

    scenario: str
    total: int
    failed: int
    errors: list[str]
    lost: list[str]
    rewritten: list[str]
    differences: list[str]
    unreadable: list[str]
    p99_before_ms: float
    p99_during_ms: float
    recovery_s: float
    hit_rate_after: float

    def as_dict(self) -> dict:
        return {"scenario": self.scenario, "failed": self.failed, "total": self.total,
                "lost_turns_sessions": len(self.lost), "rewritten_sessions": len(self.rewritten),
                "unreadable_sessions": len(self.unreadable),
                "p99_before_ms": round(self.p99_before_ms, 1),
                "p99_during_ms": round(self.p99_during_ms, 1),
                "recovery_s": round(self.recovery_s, 2),
                "hit_rate_after": round(self.hit_rate_after, 3), "errors": self.errors[:5],
                "differences": self.differences[:5]}


class ConversationLoad:
    """``clients`` clients holding ``turns``-turn conversations until :meth:`stop`, with
    ``think_s`` between a reply and the next turn."""

    def __init__(self, addresses: list[str], prefix: str, clients: int, turns: int = 6,
                 think_s: float = 0.1, max_length: int = 4, timeout_s: float = 60.0) -> None:
        self.addresses = addresses
        self.prefix = prefix
        self.clients = clients
        self.turns = turns
        self.think_s = think_s
        self.conversations: list[Conversation] = []
        self.current: list[Conversation] = []  # each client's conversation now
        self.max_length = max_length
        self.timeout_s = timeout_s
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._client: AsyncClient | None = None

    async def __aenter__(self) -> ConversationLoad:
        self._client = AsyncClient(self.addresses, timeout=self.timeout_s)
        self._tasks = [asyncio.create_task(self._client_loop(i)) for i in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await self._client.close()

    async def stop(self) -> None:
        """Let every session finish the turn it is in, then stop."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client_loop(self, client: int) -> None:
        self.current.append(None)
        number = 0
        while not self._stop.is_set():
            conv = Conversation(f"{self.prefix}-{client}-{number}", client * 1000 + number)
            self.conversations.append(conv)
            self.current[client] = conv
            await self._converse(conv)
            number += 1

    async def _converse(self, conv: Conversation) -> None:
        while not self._stop.is_set() and len(conv.turns) < self.turns:
            if conv.turns:
                await asyncio.sleep(self.think_s)
            prompt = conv.prompt(len(conv.turns))
            started = time.monotonic()
            r = await self._client.process_request({
                "token_ids": prompt, "session_id": conv.session_id,
                "max_length": self.max_length, "temperature": 0.0, "ignore_eos": True})
            turn = Turn(started, time.monotonic(), bool(r["success"]), prompt)
            if turn.ok:
                turn.completion = list(r["response"]["token_ids"])
                turn.cached_tokens = int(r["cached_tokens"])
            else:
                turn.error = f"{r.get('error_code')}: {r.get('error')}"
            conv.turns.append(turn)

    async def wait(self, turns: int, after: float = 0.0, timeout_s: float = 120.0) -> float:
        """Wait until every client finished ``turns`` successful turns started after
        ``after``; returns when that happened (monotonic)."""
        deadline = time.monotonic() + timeout_s
        while True:
            done = [sum(t.ok and t.started >= after for c in self.conversations
                        if c.index // 1000 == client for t in c.turns) >= turns
                    for client in range(self.clients)]
            if all(done):
                return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{done.count(False)} of {len(done)} clients did not finish "
                                   f"{turns} turns within {timeout_s:.0f} s")
            await asyncio.sleep(0.05)

    def report(self, scenario: str, fault_at: float, stored: dict[str, list[int]],
               unreadable: list[str]) -> FaultReport:
        """Failures, lost/rewritten sessions against ``stored`` (``unreadable`` ones apart),
        latencies around the fault."""
        turns = [t for c in self.conversations for t in c.turns]
        failed = [t for t in turns if not t.ok]
        lost, rewritten, differences = [], [], []
        for c in self.conversations:
            if c.session_id in unreadable:
                continue
            have, want = stored.get(c.session_id, []), c.acknowledged
            if have != want:
                (lost if len(have) < len(want) and want[:len(have)] == have
                 else rewritten).append(c.session_id)
                differences.append(f"{c.session_id}: {first_difference(have, want)}")
        # recovered: every client has finished a turn that started after the fault
        firsts = [min((t.finished for c in self.conversations if c.index // 1000 == client
                       for t in c.turns if t.started >= fault_at and t.ok), default=math.inf)
                  for client in range(self.clients)]
        recovered_at = max(firsts)
        before = [t.finished - t.started for t in turns if t.finished < fault_at]
        during = [t.finished - t.started for t in turns
                  if t.finished >= fault_at and t.started <= recovered_at]
        after = [t for t in turns if t.started > recovered_at and t.ok]
        return FaultReport(
            scenario, len(turns), len(failed), [t.error for t in failed], lost, rewritten,
            differences, unreadable,
            _p99(before) * 1000, _p99(during) * 1000, recovered_at - fault_at,
            sum(t.cached_tokens > 0 for t in after) / len(after) if after else 0.0)


async def stored_histories(addresses: list[str], session_ids: list[str], secret: str = "",
                           timeout_s: float = 60.0) -> tuple[dict[str, list[int]], list[str]]:
    """Every session's history as its owner node stores it (asked through a coordinator
    which node that is; asked again while a session is still moving), and the sessions
    that could not be read within ``timeout_s``. ``secret``: the cluster secret nodes
    demand of their peers."""
    out: dict[str, list[int]] = {}
    unreadable: list[str] = []
    peers = PeerChannels(secret)
    async with AsyncClient(addresses, timeout=10) as client:
        nodes = {n["node_id"]: n["address"] for n in (await client.stats())["nodes"]}
        try:
            for sid in session_ids:
                deadline = time.monotonic() + timeout_s
                while True:
                    try:
                        owner = (await client.get_session(sid))["node_id"]
                        if owner not in nodes:  # joined since we looked
                            nodes = {n["node_id"]: n["address"]
                                     for n in (await client.stats())["nodes"]}
                        chunks = [c async for c in peers.stub(nodes[owner]).ExportSession(
                            npb.ExportSessionRequest(session_id=sid, include_kv=False),
                            timeout=10)]
                        out[sid] = list(chunks_to_state(chunks).token_ids)
                        break
                    except (RequestError, grpc.aio.AioRpcError, KeyError) as exc:
                        if time.monotonic() > deadline:
                            if not (isinstance(exc, RequestError) and exc.code == "NOT_FOUND"):
                                unreadable.append(sid)  # not a verdict: reported apart
                            break  # NOT_FOUND: the owner has no copy, every turn is lost
                        await asyncio.sleep(0.2)  # maybe still moving to its owner
        finally:
            await peers.close()
    return out, unreadable


# --- the faults ------------------------------------------------------------------------------
# Each takes a serving LocalCluster (3 nodes, 2 coordinators, supervised) under load.


async def kill_one_node(cluster: LocalCluster) -> None:
    await asyncio.to_thread(cluster.crash, "node-1")


async def stop_then_continue_one_node(cluster: LocalCluster) -> None:
    cluster.send_signal("node-2", signal.SIGSTOP)
    try:
        await asyncio.sleep(STALL_S)
    finally:
        cluster.send_signal("node-2", signal.SIGCONT)


async def kill_two_of_three_nodes(cluster: LocalCluster) -> None:
    await asyncio.gather(asyncio.to_thread(cluster.crash, "node-1"),
                         asyncio.to_thread(cluster.crash, "node-3"))


async def kill_one_coordinator(cluster: LocalCluster) -> None:
    await asyncio.to_thread(cluster.crash, "coordinator-1")


async def kill_etcd(cluster: LocalCluster) -> None:
    os.kill(cluster.etcd.pid, signal.SIGKILL)  # the supervisor restarts it


async def corrupt_checkpoint_then_kill_node(cluster: LocalCluster) -> None:
    await asyncio.sleep(1.5)  # a checkpoint round with this load's sessions in it
    corrupted = 0
    for path in Path(cluster.spec.data_dir, "checkpoints", "node-2").iterdir():
        try:
            data = bytearray(path.read_bytes())
            if data:
                data[len(data) // 2] ^= 0xFF
                path.write_bytes(bytes(data))
                corrupted += 1
        except FileNotFoundError:
            continue  # the checkpointer dropped an old version meanwhile
    assert corrupted > 0, "node-2 had no checkpoint to corrupt"
    await asyncio.to_thread(cluster.crash, "node-2")


async def add_a_node(cluster: LocalCluster) -> None:
    cluster.start_node()  # from the main thread: see LocalCluster
    await asyncio.to_thread(cluster.wait_ready, len(cluster.nodes), 180)


async def add_a_node_with_tiny_num_blocks(cluster: LocalCluster) -> None:
    """A node joins whose KV pool holds two conversations: its share of the sessions runs
    under eviction and preemption on every step."""
    cluster.start_node(num_blocks=TINY_BLOCKS)
    await asyncio.to_thread(cluster.wait_ready, len(cluster.nodes), 180)


SCENARIOS: dict[str, Callable[[LocalCluster], Awaitable[None]]] = {
    "kill_one_node": kill_one_node,
    "sigstop_sigcont_one_node": stop_then_continue_one_node,
    "kill_two_of_three_nodes": kill_two_of_three_nodes,
    "kill_one_of_two_coordinators": kill_one_coordinator,
    "kill_etcd_and_restart": kill_etcd,
    "corrupt_checkpoint_then_kill_node": corrupt_checkpoint_then_kill_node,
    "add_a_node_mid_load": add_a_node,
    "tiny_num_blocks": add_a_node_with_tiny_num_blocks,
}


async def run_scenario(cluster: LocalCluster, name: str, clients: int,
                       turns_after: int = 2, hold_s: float = 0.0,
                       recovery_timeout_s: float = 120.0) -> FaultReport:
    """Wait for full strength, start the load, inject ``name``'s fault once every client
    took two turns, keep the load until every client took ``turns_after`` turns after the
    fault (and ``hold_s`` more seconds), then compare the stored histories."""
    await asyncio.to_thread(cluster.wait_ready, len(cluster.nodes), 180)
    async with ConversationLoad(cluster.addresses, name, clients) as load:
        await load.wait(2)
        fault_at = time.monotonic()
        await SCENARIOS[name](cluster)
        await load.wait(turns_after, after=fault_at, timeout_s=recovery_timeout_s)
        await asyncio.sleep(hold_s)
    stored, unreadable = await stored_histories(
        cluster.addresses, [c.session_id for c in load.conversations if c.turns],
        read_cluster_secret(cluster.cluster_secret_file))
    return load.report(name, fault_at, stored, unreadable)
