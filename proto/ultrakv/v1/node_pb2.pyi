from ultrakv.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeHealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NodeHealthResponse(_message.Message):
    __slots__ = ("serving", "node_id", "model", "model_fingerprint", "uptime_s")
    SERVING_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    serving: bool
    node_id: str
    model: str
    model_fingerprint: str
    uptime_s: float
    def __init__(self, serving: _Optional[bool] = ..., node_id: _Optional[str] = ..., model: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id", "include_kv", "chunk_bytes", "cut_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_KV_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CUT_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    include_kv: bool
    chunk_bytes: int
    cut_id: str
    def __init__(self, session_id: _Optional[str] = ..., include_kv: _Optional[bool] = ..., chunk_bytes: _Optional[int] = ..., cut_id: _Optional[str] = ...) -> None: ...

class SessionHeader(_message.Message):
    __slots__ = ("session_id", "token_ids", "turns", "model_fingerprint", "kv_tokens", "kv_shape", "kv_dtype", "num_chunks", "tenant", "messages", "last_result", "last_digest")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_SHAPE_FIELD_NUMBER: _ClassVar[int]
    KV_DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    LAST_RESULT_FIELD_NUMBER: _ClassVar[int]
    LAST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    turns: int
    model_fingerprint: str
    kv_tokens: int
    kv_shape: _containers.RepeatedScalarFieldContainer[int]
    kv_dtype: str
    num_chunks: int
    tenant: str
    messages: _containers.RepeatedCompositeFieldContainer[_types_pb2.ChatMessage]
    last_result: _types_pb2.GenerateResult
    last_digest: bytes
    def __init__(self, session_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., turns: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., kv_tokens: _Optional[int] = ..., kv_shape: _Optional[_Iterable[int]] = ..., kv_dtype: _Optional[str] = ..., num_chunks: _Optional[int] = ..., tenant: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_types_pb2.ChatMessage, _Mapping]]] = ..., last_result: _Optional[_Union[_types_pb2.GenerateResult, _Mapping]] = ..., last_digest: _Optional[bytes] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("index", "data", "sha256")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    index: int
    data: bytes
    sha256: bytes
    def __init__(self, index: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class SessionTrailer(_message.Message):
    __slots__ = ("num_chunks", "total_bytes", "sha256")
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    num_chunks: int
    total_bytes: int
    sha256: bytes
    def __init__(self, num_chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class SessionChunk(_message.Message):
    __slots__ = ("header", "kv", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: SessionHeader
    kv: KVChunk
    trailer: SessionTrailer
    def __init__(self, header: _Optional[_Union[SessionHeader, _Mapping]] = ..., kv: _Optional[_Union[KVChunk, _Mapping]] = ..., trailer: _Optional[_Union[SessionTrailer, _Mapping]] = ...) -> None: ...

class ImportSessionResponse(_message.Message):
    __slots__ = ("session_id", "num_tokens", "kv_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    num_tokens: int
    kv_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., kv_tokens: _Optional[int] = ...) -> None: ...

class ReplicateHistoryRequest(_message.Message):
    __slots__ = ("session_id", "token_ids", "turns", "tenant", "messages", "last_result", "last_digest")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    LAST_RESULT_FIELD_NUMBER: _ClassVar[int]
    LAST_DIGEST_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    turns: int
    tenant: str
    messages: _containers.RepeatedCompositeFieldContainer[_types_pb2.ChatMessage]
    last_result: _types_pb2.GenerateResult
    last_digest: bytes
    def __init__(self, session_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., turns: _Optional[int] = ..., tenant: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_types_pb2.ChatMessage, _Mapping]]] = ..., last_result: _Optional[_Union[_types_pb2.GenerateResult, _Mapping]] = ..., last_digest: _Optional[bytes] = ...) -> None: ...

class ReplicateHistoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PromoteReplicaRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class PromoteReplicaResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReleaseSessionRequest(_message.Message):
    __slots__ = ("session_id", "turns")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turns: int
    def __init__(self, session_id: _Optional[str] = ..., turns: _Optional[int] = ...) -> None: ...

class ReleaseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BeginCutRequest(_message.Message):
    __slots__ = ("cut_id", "hold_s")
    CUT_ID_FIELD_NUMBER: _ClassVar[int]
    HOLD_S_FIELD_NUMBER: _ClassVar[int]
    cut_id: str
    hold_s: float
    def __init__(self, cut_id: _Optional[str] = ..., hold_s: _Optional[float] = ...) -> None: ...

class BeginCutResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[_types_pb2.SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[_types_pb2.SessionInfo, _Mapping]]] = ...) -> None: ...

class CutRequest(_message.Message):
    __slots__ = ("cut_id",)
    CUT_ID_FIELD_NUMBER: _ClassVar[int]
    cut_id: str
    def __init__(self, cut_id: _Optional[str] = ...) -> None: ...

class ReleaseCutResponse(_message.Message):
    __slots__ = ("intact", "held_s", "imported_session_ids")
    INTACT_FIELD_NUMBER: _ClassVar[int]
    HELD_S_FIELD_NUMBER: _ClassVar[int]
    IMPORTED_SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    intact: bool
    held_s: float
    imported_session_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, intact: _Optional[bool] = ..., held_s: _Optional[float] = ..., imported_session_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class EndCutResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[_types_pb2.SessionInfo]
    def __init__(self, sessions: _Optional[_Iterable[_Union[_types_pb2.SessionInfo, _Mapping]]] = ...) -> None: ...

class BlockEventsRequest(_message.Message):
    __slots__ = ("epoch", "since_seq")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SINCE_SEQ_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    since_seq: int
    def __init__(self, epoch: _Optional[str] = ..., since_seq: _Optional[int] = ...) -> None: ...

class BlockEvent(_message.Message):
    __slots__ = ("seq", "stored", "tier", "hashes")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    seq: int
    stored: bool
    tier: str
    hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq: _Optional[int] = ..., stored: _Optional[bool] = ..., tier: _Optional[str] = ..., hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class BlockEventsMessage(_message.Message):
    __slots__ = ("epoch", "snapshot", "reset", "seq", "block_size", "events", "chain_root")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_ROOT_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    snapshot: bool
    reset: bool
    seq: int
    block_size: int
    events: _containers.RepeatedCompositeFieldContainer[BlockEvent]
    chain_root: int
    def __init__(self, epoch: _Optional[str] = ..., snapshot: _Optional[bool] = ..., reset: _Optional[bool] = ..., seq: _Optional[int] = ..., block_size: _Optional[int] = ..., events: _Optional[_Iterable[_Union[BlockEvent, _Mapping]]] = ..., chain_root: _Optional[int] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class PreparedTurn(_message.Message):
    __slots__ = ("token_ids", "turns", "busy", "would_wait", "free_slots")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FIELD_NUMBER: _ClassVar[int]
    WOULD_WAIT_FIELD_NUMBER: _ClassVar[int]
    FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    turns: int
    busy: bool
    would_wait: bool
    free_slots: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., turns: _Optional[int] = ..., busy: _Optional[bool] = ..., would_wait: _Optional[bool] = ..., free_slots: _Optional[int] = ...) -> None: ...

class CommitTurnRequest(_message.Message):
    __slots__ = ("request", "turns", "prompt_token_ids", "result")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    request: _types_pb2.GenerateRequest
    turns: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    result: _types_pb2.GenerateResult
    def __init__(self, request: _Optional[_Union[_types_pb2.GenerateRequest, _Mapping]] = ..., turns: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., result: _Optional[_Union[_types_pb2.GenerateResult, _Mapping]] = ...) -> None: ...

class CommitTurnResponse(_message.Message):
    __slots__ = ("turns",)
    TURNS_FIELD_NUMBER: _ClassVar[int]
    turns: int
    def __init__(self, turns: _Optional[int] = ...) -> None: ...
