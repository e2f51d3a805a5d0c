"""The committed stubs match the .proto sources, and the package's surface is what we expect."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ultrakv.v1 import node_pb2, types_pb2, ultrakv_pb2

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_not_stale(tmp_path):
    generated = _generator().generate(tmp_path)
    committed_dir = ROOT / "proto" / "ultrakv" / "v1"
    assert {p.name for p in generated} >= {"types_pb2.py", "node_pb2_grpc.py",
                                          "ultrakv_pb2.pyi"}
    for fresh in generated:
        committed = committed_dir / fresh.name
        assert committed.exists(), f"{fresh.name} is not committed; run `make proto`"
        assert committed.read_bytes() == fresh.read_bytes(), (
            f"{fresh.name} is stale; run `make proto` and commit the result")
    on_disk = {p.name for p in committed_dir.iterdir()
               if p.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))}
    assert on_disk == {p.name for p in generated}, "stubs without a .proto source"


def test_services_and_streaming_shapes():
    client = ultrakv_pb2.DESCRIPTOR.services_by_name["UltraKV"]
    node = node_pb2.DESCRIPTOR.services_by_name["NodeService"]
    shapes = {m.name: (m.client_streaming, m.server_streaming) for m in client.methods}
    assert shapes == {"Generate": (True, True), "GenerateMany": (True, True), "Process": (False, False),
                      "ProcessBatch": (False, False), "Stats": (False, False),
                      "ClearCache": (False, False), "CleanupSessions": (False, False),
                      "GetSession": (False, False), "DeleteSession": (False, False),
                      "ExportSessions": (False, True), "ImportSessions": (True, False)}
    node_shapes = {m.name: (m.client_streaming, m.server_streaming) for m in node.methods}
    assert node_shapes["Generate"] == (True, True)
    assert node_shapes["GenerateMany"] == (True, True)  # a coordinator's requests to a node
    assert node_shapes["ExportSession"] == (False, True)
    assert node_shapes["ImportSession"] == (True, False)
    assert {"ReplicateHistory", "ListSessions", "DeleteSession", "Stats",
            "Health"} <= set(node_shapes)


def test_priority_enum_names():
    assert [v.name for v in types_pb2.Priority.DESCRIPTOR.values] == [
        "PRIORITY_UNSPECIFIED", "PRIORITY_CRITICAL", "PRIORITY_HIGH", "PRIORITY_NORMAL",
        "PRIORITY_LOW"]
