"""Keeps the coordinator's :class:`BlockIndex` current: one ``BlockEvents`` subscription
per member node (an internal call, with the cluster secret like every other).

A subscription resumes from the index's cursor for the node; the node answers with the
changes since then or a snapshot. A message that does not continue what the index knows (a
sequence gap), or breaks a cap, ends the subscription and the next one asks for a snapshot.
A broken stream is retried after a pause, keeping the node's blocks meanwhile; the health
loop's verdict (:meth:`BlockFeed.node_down`) or the node leaving the membership drops them.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from ultrakv.cluster.block_events import batch_from_message
from ultrakv.cluster.peers import PeerChannels
from ultrakv.cluster.tasks import cancel_task
from ultrakv.cluster.validation import RequestRejected
from ultrakv.coordinator.block_index import BlockIndex
from ultrakv.v1 import node_pb2 as npb

log = logging.getLogger("ultrakv.coordinator.block_feed")

RETRY_S = 0.5  # pause before subscribing again after a stream ended


class BlockFeed:
    """Subscriptions to the members' block events, applied to ``index``."""

    def __init__(self, index: BlockIndex, peers: PeerChannels) -> None:
        self.index = index
        self.peers = peers
        self._tasks: dict[str, tuple[str, asyncio.Task[None]]] = {}  # node -> (address, task)
        self.resyncs = 0  # snapshots asked for after a gap or a bad message

    def set_targets(self, addresses: dict[str, str]) -> None:
        """Follow exactly these nodes (id -> address): new ones are subscribed, gone ones
        dropped from the index, a changed address resubscribed."""
        for node in list(self._tasks):
            if addresses.get(node) != self._tasks[node][0]:
                _, task = self._tasks.pop(node)
                task.cancel()
                if node not in addresses:
                    self.index.drop(node)
        for node, address in addresses.items():
            if node not in self._tasks:
                task = asyncio.create_task(self._follow(node, address), name=f"block-feed-{node}")
                self._tasks[node] = (address, task)

    def node_down(self, node: str) -> None:
        """The health loop holds ``node`` down: its blocks leave the index (the subscription
        keeps trying, and a node that comes back sends a snapshot)."""
        self.index.drop(node)

    async def stop(self) -> None:
        tasks = [task for _, task in self._tasks.values()]
        self._tasks.clear()
        for task in tasks:
            await cancel_task(task)

    async def _follow(self, node: str, address: str) -> None:
        while True:
            try:
                await self._subscribe(node, address)
            except grpc.aio.AioRpcError:
                pass  # the node is down or restarting: the health loop decides about it
            except Exception:
                log.exception("following node %s's block events failed", node)
            await asyncio.sleep(RETRY_S)

    async def _subscribe(self, node: str, address: str) -> None:
        cursor = self.index.cursor(node)
        call = self.peers.stub(address).BlockEvents(
            npb.BlockEventsRequest(epoch=cursor.epoch, since_seq=cursor.seq))
        try:
            async for message in call:
                try:
                    batch = batch_from_message(message)
                except RequestRejected as exc:
                    log.warning("node %s sent a bad block event (%s: %s); resyncing",
                                node, exc.field, exc.message)
                    ok = False
                else:
                    ok = self.index.apply(node, batch)
                if not ok:
                    self.resyncs += 1
                    self.index.forget_cursor(node)
                    return
        finally:
            call.cancel()
