"""A coordinator's requests to one node on one GenerateMany stream (coordinator/node_link.py),
against a stand-in node that sends batches the test chooses."""

from __future__ import annotations

import asyncio

import grpc
from ultrakv.coordinator.node_link import NodeLink
from ultrakv.v1 import node_pb2_grpc
from ultrakv.v1 import types_pb2 as pb


def _chunk(request_id: str, text: str) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(request_id=request_id, chunk=pb.TokenChunk(text=text))


class _ScriptedNode(node_pb2_grpc.NodeServiceServicer):
    """Takes two requests, sends the first one's first chunk, and once ``go`` is set one
    batch with the first one's next chunk ahead of the second one's first."""

    def __init__(self) -> None:
        self.go = asyncio.Event()

    async def GenerateMany(self, requests, context):
        ids = []
        async for message in requests:
            ids.append(message.generate.request_id)
            if len(ids) == 2:
                break
        yield pb.GenerateBatch(events=[_chunk(ids[0], "a")])
        await self.go.wait()
        yield pb.GenerateBatch(events=[_chunk(ids[0], "b"), _chunk(ids[1], "x")])
        await asyncio.Event().wait()  # the stream stays open until the test ends it


async def test_a_batchs_first_events_are_relayed_before_its_others():
    """The relay of a request's first event, and the work it wakes (its client stream's
    writer), run before the relays of the batch's other events: a first token does not wait
    for the coordinator to relay every running request's token of that step."""
    node = _ScriptedNode()
    server = grpc.aio.server()
    node_pb2_grpc.add_NodeServiceServicer_to_server(node, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            link = NodeLink(node_pb2_grpc.NodeServiceStub(channel), lambda _: None)
            running, new = (link.submit(pb.GenerateStreamRequest(
                generate=pb.GenerateRequest(request_id=rid))) for rid in ("running", "new"))
            assert (await anext(running)).chunk.text == "a"
            log: list[str] = []
            relayed = asyncio.Event()

            async def relay(receiver, name: str) -> None:
                log.append(f"{name} got {(await anext(receiver)).chunk.text}")
                if name == "new":
                    relayed.set()

            async def writer() -> None:
                await relayed.wait()
                log.append("new written")

            tasks = [asyncio.create_task(relay(running, "running")),
                     asyncio.create_task(relay(new, "new")), asyncio.create_task(writer())]
            await asyncio.sleep(0)  # all three wait now
            node.go.set()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
            assert log == ["new got x", "new written", "running got b"]
            link.close()
    finally:
        await server.stop(None)
