from ultrakv.v1 import node_pb2 as _node_pb2
from ultrakv.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportSessionsRequest(_message.Message):
    __slots__ = ("history_only",)
    HISTORY_ONLY_FIELD_NUMBER: _ClassVar[int]
    history_only: bool
    def __init__(self, history_only: _Optional[bool] = ...) -> None: ...

class BackupNode(_message.Message):
    __slots__ = ("node_id", "model", "model_fingerprint")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    model: str
    model_fingerprint: str
    def __init__(self, node_id: _Optional[str] = ..., model: _Optional[str] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class BackupHeader(_message.Message):
    __slots__ = ("nodes", "num_sessions", "config_json", "checkpoints_json", "cut")
    NODES_FIELD_NUMBER: _ClassVar[int]
    NUM_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_JSON_FIELD_NUMBER: _ClassVar[int]
    CUT_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[BackupNode]
    num_sessions: int
    config_json: str
    checkpoints_json: str
    cut: BackupCut
    def __init__(self, nodes: _Optional[_Iterable[_Union[BackupNode, _Mapping]]] = ..., num_sessions: _Optional[int] = ..., config_json: _Optional[str] = ..., checkpoints_json: _Optional[str] = ..., cut: _Optional[_Union[BackupCut, _Mapping]] = ...) -> None: ...

class BackupCut(_message.Message):
    __slots__ = ("cut_id", "taken_at", "etcd_revision", "hold_s", "attempts")
    CUT_ID_FIELD_NUMBER: _ClassVar[int]
    TAKEN_AT_FIELD_NUMBER: _ClassVar[int]
    ETCD_REVISION_FIELD_NUMBER: _ClassVar[int]
    HOLD_S_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    cut_id: str
    taken_at: float
    etcd_revision: int
    hold_s: float
    attempts: int
    def __init__(self, cut_id: _Optional[str] = ..., taken_at: _Optional[float] = ..., etcd_revision: _Optional[int] = ..., hold_s: _Optional[float] = ..., attempts: _Optional[int] = ...) -> None: ...

class BackupPart(_message.Message):
    __slots__ = ("header", "session")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    header: BackupHeader
    session: _node_pb2.SessionChunk
    def __init__(self, header: _Optional[_Union[BackupHeader, _Mapping]] = ..., session: _Optional[_Union[_node_pb2.SessionChunk, _Mapping]] = ...) -> None: ...

class ImportSessionsResponse(_message.Message):
    __slots__ = ("sessions", "num_tokens", "kv_tokens", "skipped")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    sessions: int
    num_tokens: int
    kv_tokens: int
    skipped: int
    def __init__(self, sessions: _Optional[int] = ..., num_tokens: _Optional[int] = ..., kv_tokens: _Optional[int] = ..., skipped: _Optional[int] = ...) -> None: ...
