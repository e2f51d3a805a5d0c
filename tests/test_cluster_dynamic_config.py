"""Dynamic coordinator config: parsing, the etcd watcher, the CLI, and live application."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from ultrakv.client.cli import main as cli_main
from ultrakv.cluster.etcd_server import EmbeddedEtcd
from ultrakv.cluster.store import DEFAULT_PREFIX, EtcdStore
from ultrakv.coordinator.dynamic_config import (
    CONFIG_KEY,
    ConfigError,
    DynamicConfig,
    DynamicConfigWatcher,
    apply_overrides,
    parse_assignment,
    parse_overrides,
    set_overrides,
)
from ultrakv.coordinator.health import HealthPolicy
from ultrakv.coordinator.server import ClusterBackend, CoordinatorSettings

pytestmark = pytest.mark.cluster


async def _until(predicate, timeout_s: float = 5.0) -> None:
    end = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


# -- pure parsing and validation ----------------------------------------------------------------


def test_defaults_match_coordinator_settings() -> None:
    settings = CoordinatorSettings(etcd="127.0.0.1:2379")
    assert DynamicConfig.from_settings(settings) == DynamicConfig()
    assert DynamicConfig().health_policy() == settings.health


def test_overrides_apply_over_base() -> None:
    base = DynamicConfig()
    cfg = apply_overrides(base, parse_overrides(b'{"load_eps": 0.5, "health_down_after": 5}'))
    assert cfg.load_eps == 0.5 and cfg.health_down_after == 5
    assert cfg.health_up_after == base.health_up_after
    assert apply_overrides(base, parse_overrides(b"")) == base  # deleted key: the base
    assert cfg.health_policy() == HealthPolicy(interval_s=1.0, timeout_s=1.0, down_after=5,
                                               up_after=2)


@pytest.mark.parametrize(("doc", "message"), [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b'{"load_epsilon": 1}', "unknown setting 'load_epsilon'"),
    (b'{"load_eps": 0}', "load_eps must be in (0, 10], got 0"),
    (b'{"load_eps": "big"}', "load_eps must be a number, got 'big'"),
    (b'{"health_down_after": 0}', "health_down_after must be in [1, 100], got 0"),
    (b'{"health_up_after": 2.5}', "health_up_after must be an integer, got 2.5"),
    (b'{"max_attempts": true}', "max_attempts must be an integer, got True"),
    (b'{"health_interval_s": 0.01}', "health_interval_s must be in [0.05, 60], got 0.01"),
    (b'{"health_interval_s": 0.5}', "health_timeout_s must be in (0, health_interval_s=0.5]"),
    (b'{"failed_hold_s": -1}', "failed_hold_s must be in [0, 600], got -1"),
])
def test_invalid_documents_name_the_field_and_limit(doc: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        apply_overrides(DynamicConfig(), parse_overrides(doc))
    assert message in str(err.value)


def test_parse_assignment() -> None:
    assert parse_assignment("load_eps=0.5") == ("load_eps", 0.5)
    assert parse_assignment("health_down_after=4") == ("health_down_after", 4)
    assert isinstance(parse_assignment("health_down_after=4")[1], int)
    for bad, message in [("load_eps", "KEY=VALUE"), ("nope=1", "unknown setting 'nope'"),
                         ("health_up_after=1.5", "health_up_after must be an integer")]:
        with pytest.raises(ConfigError, match=message):
            parse_assignment(bad)


# -- the watcher against real etcd --------------------------------------------------------------


async def test_watcher_reads_at_start_follows_changes_and_ignores_bad(store: EtcdStore) -> None:
    await store.put(CONFIG_KEY, json.dumps({"load_eps": 0.5}))
    seen: list[DynamicConfig] = []
    watcher = DynamicConfigWatcher(store, DynamicConfig(), on_change=seen.append)
    await watcher.start()
    try:
        assert watcher.current.load_eps == 0.5 and seen == [watcher.current]

        await store.put(CONFIG_KEY, json.dumps({"load_eps": 1.5, "health_down_after": 6}))
        await _until(lambda: len(seen) == 2)
        assert seen[-1] == DynamicConfig(load_eps=1.5, health_down_after=6)

        # Bad JSON, an invalid value, an unknown key: logged, ignored, last good config kept.
        for bad in ("{oops", '{"load_eps": -1}', '{"load_eps": 2, "typo": 1}'):
            await store.put(CONFIG_KEY, bad)
        await store.put("config/other", "{}")  # a sibling key is not ours
        await store.put(CONFIG_KEY, json.dumps({"load_eps": 1.5, "health_down_after": 6}))
        await store.put(CONFIG_KEY, json.dumps({"load_eps": 3.0}))
        await _until(lambda: seen[-1] == DynamicConfig(load_eps=3.0))
        assert len(seen) == 3  # none of the bad documents was applied
        assert watcher.current == seen[-1]

        await store.delete(CONFIG_KEY)  # back to the start-up config
        await _until(lambda: len(seen) == 4)
        assert seen[-1] == DynamicConfig()
    finally:
        await watcher.stop()


async def test_set_overrides_merges_and_validates(store: EtcdStore) -> None:
    assert await set_overrides(store, {"load_eps": 0.75}) == {"load_eps": 0.75}
    assert await set_overrides(store, {"max_attempts": 2}) == {"load_eps": 0.75,
                                                               "max_attempts": 2}
    with pytest.raises(ConfigError, match="max_attempts must be in \\[1, 16\\], got 99"):
        await set_overrides(store, {"max_attempts": 99})
    stored = await store.get(CONFIG_KEY)
    assert stored is not None and json.loads(stored.value) == {"load_eps": 0.75,
                                                               "max_attempts": 2}


# -- the CLI against real etcd ------------------------------------------------------------------


def test_cli_config_set_show_round_trip(etcd: EmbeddedEtcd,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    async def clear() -> None:
        async with EtcdStore(etcd.endpoint, DEFAULT_PREFIX) as s:
            await s.delete(CONFIG_KEY)

    asyncio.run(clear())
    try:
        assert cli_main(["config", "set", "load_eps=0.6", "health_down_after=4",
                         "--etcd", etcd.endpoint]) == 0
        capsys.readouterr()
        assert cli_main(["config", "show", "--etcd", etcd.endpoint]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["key"] == CONFIG_KEY
        assert shown["overrides"] == {"load_eps": 0.6, "health_down_after": 4}
        assert shown["effective_over_defaults"]["health_up_after"] == DynamicConfig().health_up_after

        assert cli_main(["config", "set", "health_up_after=0", "--etcd", etcd.endpoint]) == 2
        assert "health_up_after must be in [1, 100], got 0" in capsys.readouterr().err
        assert cli_main(["config", "show", "--etcd", etcd.endpoint]) == 0
        assert json.loads(capsys.readouterr().out)["overrides"] == {"load_eps": 0.6,
                                                                    "health_down_after": 4}
        assert cli_main(["config", "show"]) == 2
        assert "--etcd HOST:PORT is required" in capsys.readouterr().err
    finally:
        asyncio.run(clear())


# -- a running coordinator backend applies it live ----------------------------------------------


async def test_cluster_backend_applies_config_live(etcd: EmbeddedEtcd) -> None:
    prefix = f"/t-{uuid.uuid4().hex[:8]}/"
    settings = CoordinatorSettings(etcd=etcd.endpoint, prefix=prefix)
    backend = ClusterBackend(settings)
    await backend.start()
    try:
        async with EtcdStore(etcd.endpoint, prefix) as writer:
            await set_overrides(writer, {"load_eps": 2.0, "health_interval_s": 0.2,
                                         "health_timeout_s": 0.1, "health_up_after": 5,
                                         "max_attempts": 2, "prefix_routing": 0,
                                         "session_offload": 1})
            await _until(lambda: backend.settings.load_eps == 2.0)
            assert backend.settings.prefix_routing is False
            assert backend.settings.session_offload is True
            policy = HealthPolicy(interval_s=0.2, timeout_s=0.1, down_after=3, up_after=5)
            assert backend.health.policy == policy
            assert backend.health.tracker.policy == policy
            assert backend.settings.health == policy
            assert backend.settings.max_attempts == 2

            await writer.put(CONFIG_KEY, '{"load_eps": 0}')  # invalid: nothing changes
            await writer.delete(CONFIG_KEY)  # then back to the start-up settings
            await _until(lambda: backend.settings.load_eps == 0.25)
            assert backend.settings.prefix_routing is True
            assert backend.settings.session_offload is False
            assert backend.health.policy == CoordinatorSettings(etcd="x:1").health
    finally:
        await backend.stop()
