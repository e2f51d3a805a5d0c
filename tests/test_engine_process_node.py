"""NodeService over a node whose engine runs in a process of its own (``engine_process``):
the session export/import, replication, promotion, stats and health tests of
test_wire_node.py, and the checkpoint and restore tests of test_cluster_checkpoint.py, run
again over EngineClients."""

from __future__ import annotations

import pytest
from test_cluster_checkpoint import (  # noqa: F401  (checkpoints written and restored by cores)
    test_corrupted_or_missing_files_are_detected_and_recomputed,
    test_replicas_are_checkpointed_and_restored_as_replicas,
)
from test_wire_node import (  # noqa: F401  (tests and fixtures run here over a core process)
    node,
    secret,
    server,
    test_a_last_survivor_acknowledges_its_turns_without_a_copy,
    test_a_promoted_replica_keeps_its_tenant_and_the_tenants_cache,
    test_export_of_an_unknown_session_is_not_found,
    test_export_then_import_restores_the_session_and_its_cache,
    test_history_only_export,
    test_import_rejects_a_corrupted_or_truncated_stream,
    test_import_rejects_another_models_kv,
    test_node_stats_and_health,
    test_replicate_history_then_promote,
    test_replicator_sends_the_sessions_tenant,
)
from ultrakv.node import EngineConfig
from ultrakv.node.engine_client import EngineClient

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def engine():
    eng = EngineClient(EngineConfig(model="tiny", device="cpu", num_blocks=128))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def engines(engine):
    """A checkpointing core of its own (the checkpoint tests count every session it holds),
    restoring into the module's."""
    own = EngineClient(EngineConfig(model="tiny", device="cpu", num_blocks=256))
    yield own, engine
    own.shutdown()
