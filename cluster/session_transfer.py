"""SessionState <-> a stream of SessionChunk messages (session migration on the wire).

A session travels as a header (history, turns, chat messages, the record of its last turn,
model fingerprint, KV shape and dtype), the KV
tensor's bytes cut into chunks that each carry their sha256, and a trailer with the chunk
count, the byte count and the sha256 of all the bytes. Pure functions, no I/O: the node
server and the cluster's re-sharding both use them.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import grpc
from ultrakv.cluster.session_state import LastTurn, SessionState
from ultrakv.cluster.validation import Malformed, RequestRejected
from ultrakv.v1 import node_pb2 as npb
from ultrakv.v1 import types_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20  # well under gRPC's 4 MiB default message limit


class TransferError(ValueError):
    """A chunk stream that is malformed, truncated or corrupted."""


def chat_messages(pairs: Iterable[tuple[str, str]]) -> list[pb.ChatMessage]:
    """(role, content) pairs -> wire messages."""
    return [pb.ChatMessage(role=role, content=content) for role, content in pairs]


def message_pairs(messages: Iterable[pb.ChatMessage]) -> list[tuple[str, str]]:
    """Wire messages -> (role, content) pairs."""
    return [(m.role, m.content) for m in messages]


def state_to_chunks(state: SessionState, chunk_bytes: int = DEFAULT_CHUNK_BYTES
                    ) -> Iterator[npb.SessionChunk]:
    """Yield header, KV chunks and trailer for ``state``."""
    data = b""
    shape: list[int] = []
    dtype = ""
    if state.kv is not None:
        import torch  # here, not at import: client commands and coordinators load this module

        kv = state.kv.detach().to("cpu").contiguous()
        data = kv.view(torch.uint8).numpy().tobytes() if kv.numel() else b""
        shape = list(kv.shape)
        dtype = str(kv.dtype).removeprefix("torch.")
    header = npb.SessionHeader(
        session_id=state.session_id, token_ids=state.token_ids, turns=state.turns,
        model_fingerprint=state.model_fingerprint,
        kv_tokens=state.kv_tokens if state.kv is not None else 0,
        kv_shape=shape, kv_dtype=dtype, tenant=state.tenant,
        messages=chat_messages(state.messages))
    if state.last_turn is not None:
        header.last_result.CopyFrom(state.last_turn.result)
        header.last_digest = state.last_turn.digest
    yield from bytes_to_chunks(header, data, chunk_bytes)


def bytes_to_chunks(header: npb.SessionHeader, data: bytes,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[npb.SessionChunk]:
    """Yield ``header`` (its ``num_chunks`` set here), ``data`` (the KV tensor's raw bytes,
    as checkpoint and backup files hold them) in chunks, and the trailer; needs no torch."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    num_chunks = (len(data) + chunk_bytes - 1) // chunk_bytes
    first = npb.SessionHeader()
    first.CopyFrom(header)
    first.num_chunks = num_chunks
    yield npb.SessionChunk(header=first)
    total = hashlib.sha256()
    for index in range(num_chunks):
        piece = data[index * chunk_bytes:(index + 1) * chunk_bytes]
        total.update(piece)
        yield npb.SessionChunk(kv=npb.KVChunk(index=index, data=piece,
                                              sha256=hashlib.sha256(piece).digest()))
    yield npb.SessionChunk(trailer=npb.SessionTrailer(
        num_chunks=num_chunks, total_bytes=len(data), sha256=total.digest()))


def chunks_to_state(chunks: Iterable[npb.SessionChunk]) -> SessionState:
    """Rebuild a SessionState, verifying order, every checksum and the trailer."""
    assembler = StateAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


class StateAssembler:
    """Incremental form of :func:`chunks_to_state`, for async streams: ``add`` each chunk
    (``header`` is readable after the first, to validate it before reading on), then
    ``finish``."""

    def __init__(self) -> None:
        self.header: npb.SessionHeader | None = None
        self._parts: list[bytes] = []
        self._received = 0
        self._max_bytes: int | None = None
        self._total = hashlib.sha256()
        self._trailer: npb.SessionTrailer | None = None

    def expect_kv_bytes(self, size: int) -> None:
        """Refuse, chunk by chunk, more than ``size`` KV bytes (what the validated header's
        shape holds): a stream is never buffered beyond what it declared."""
        self._max_bytes = size

    def add(self, chunk: npb.SessionChunk) -> None:
        part = chunk.WhichOneof("part")
        if self._trailer is not None:
            raise TransferError(f"session chunk after the trailer: {part}")
        if part == "header":
            if self.header is not None:
                raise TransferError("second session header")
            self.header = chunk.header
            return
        if self.header is None:
            raise TransferError(f"session stream must start with a header, got {part}")
        if part == "kv":
            kv = chunk.kv
            if kv.index != len(self._parts):
                raise TransferError(f"kv chunk index must be {len(self._parts)}, got {kv.index}")
            if hashlib.sha256(kv.data).digest() != kv.sha256:
                raise TransferError(f"kv chunk {kv.index} failed its sha256 check")
            if self._max_bytes is not None:
                if kv.index >= self.header.num_chunks:
                    raise RequestRejected(
                        grpc.StatusCode.INVALID_ARGUMENT, "kv.index",
                        f"kv chunks must number at most {self.header.num_chunks} (the header's "
                        f"num_chunks), got chunk index {kv.index}")
                if self._received + len(kv.data) > self._max_bytes:
                    raise RequestRejected(
                        grpc.StatusCode.INVALID_ARGUMENT, "kv.data",
                        f"kv chunks must total at most {self._max_bytes} bytes (the header's "
                        f"kv_shape), got {self._received + len(kv.data)} by chunk {kv.index}")
            self._received += len(kv.data)
            self._parts.append(kv.data)
            self._total.update(kv.data)
        elif part == "trailer":
            self._trailer = chunk.trailer
        else:
            raise TransferError("empty session chunk")

    def finish_bytes(self) -> tuple[npb.SessionHeader, bytes]:
        """The header and the KV's raw bytes, every check done; needs no torch."""
        header, trailer = self.header, self._trailer
        if header is None:
            raise TransferError("session stream had no header")
        if trailer is None:
            raise TransferError("session stream ended before its trailer (truncated)")
        data = b"".join(self._parts)
        if (trailer.num_chunks != len(self._parts) or header.num_chunks != len(self._parts)
                or trailer.total_bytes != len(data)):
            raise TransferError(
                f"session stream must hold {header.num_chunks} chunks / {trailer.total_bytes} "
                f"bytes, got {len(self._parts)} / {len(data)}")
        if trailer.sha256 != self._total.digest():
            raise TransferError("session stream failed its overall sha256 check")
        return header, data

    def finish(self) -> SessionState:
        header, data = self.finish_bytes()
        kv = None
        if header.kv_dtype:
            import torch  # here, not at import: client commands and coordinators load this module

            dtype = getattr(torch, header.kv_dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise TransferError(f"kv_dtype must be a torch dtype name, got {header.kv_dtype!r}")
            shape = tuple(header.kv_shape)
            flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
                torch.empty(0, dtype=torch.uint8)
            try:
                kv = flat.view(dtype).reshape(shape)
            except RuntimeError as exc:
                raise TransferError(f"kv bytes do not fit shape {list(shape)} of {dtype}") from exc
        return SessionState(session_id=header.session_id, token_ids=list(header.token_ids),
                            turns=header.turns, model_fingerprint=header.model_fingerprint,
                            kv_tokens=header.kv_tokens if kv is not None else 0, kv=kv,
                            tenant=header.tenant, messages=message_pairs(header.messages),
                            last_turn=last_turn_of(header))


def last_turn_of(header: npb.SessionHeader) -> LastTurn | None:
    """The record of the turn that made the header's history, when it carries one."""
    if not header.HasField("last_result"):
        return None
    return LastTurn(header.last_result, header.last_digest)


async def session_runs(chunks: AsyncIterator[Any]) -> AsyncIterator[list[npb.SessionChunk]]:
    """Split a stream of several sessions (a restore) into one run per session: header,
    KV chunks, trailer. The checksums are the importer's to verify; this only checks that
    each run starts with a header and that the stream does not end inside one."""
    run: list[npb.SessionChunk] = []
    async for chunk in chunks:
        if isinstance(chunk, Malformed):
            raise chunk.rejection()
        part = chunk.WhichOneof("part")
        if not run and part != "header":
            raise TransferError(f"each session must start with a header, got {part}")
        if run and part == "header":
            raise TransferError(f"session {run[0].header.session_id!r} has no trailer")
        run.append(chunk)
        if part == "trailer":
            yield run
            run = []
    if run:
        raise TransferError(f"session {run[0].header.session_id!r} ended before its trailer "
                            "(truncated)")


def history_only_chunks(header: npb.SessionHeader) -> list[npb.SessionChunk]:
    """A session's header as a stream without its KV (the history, chat messages and last
    turn's record): for a node whose KV cache holds another dtype, which refuses the KV
    (``kv_dtype``) and recomputes it on the session's next turn."""
    history = SessionState(header.session_id, list(header.token_ids), header.turns,
                           header.model_fingerprint, tenant=header.tenant,
                           messages=message_pairs(header.messages), last_turn=last_turn_of(header))
    return list(state_to_chunks(history))
