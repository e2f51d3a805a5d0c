"""The edge's pure pieces, alone: replay window and nonce cache, token buckets, IP rules,
the keys file and its reloads, header parsing."""

from __future__ import annotations

import pytest
from ultrakv.cluster.security import keys as keyfile
from ultrakv.cluster.security.ip_rules import IpRules, peer_ip
from ultrakv.cluster.security.policy import EdgeSecurity, api_key_from
from ultrakv.cluster.security.rate_limits import RateLimited, TokenBuckets
from ultrakv.cluster.security.settings import SecuritySettings
from ultrakv.cluster.security.signing import ReplayGuard, ReplayRejected


def test_replay_guard_refuses_reused_nonces_and_stale_timestamps():
    guard = ReplayGuard(window_s=60, max_nonces=3)
    now = 1_000_000.0
    guard.check("k", int(now * 1000), "nonce-001", now=now)
    with pytest.raises(ReplayRejected, match="used already"):
        guard.check("k", int(now * 1000), "nonce-001", now=now)
    guard.check("other-key", int(now * 1000), "nonce-001", now=now)  # nonces are per key
    with pytest.raises(ReplayRejected, match="window"):
        guard.check("k", int((now - 61) * 1000), "nonce-002", now=now)
    with pytest.raises(ReplayRejected, match="window"):
        guard.check("k", int((now + 61) * 1000), "nonce-003", now=now)


def test_a_full_nonce_cache_raises_a_floor_instead_of_forgetting_a_replay():
    guard = ReplayGuard(window_s=60, max_nonces=2)
    now = 1_000_000.0
    for i, ts in enumerate((now - 30, now - 20, now - 10)):
        guard.check("k", int(ts * 1000), f"nonce-{i:03d}", now=now)
    assert len(guard) == 2
    # nonce-000 was dropped; replaying it is still refused, by the floor.
    with pytest.raises(ReplayRejected, match="older than"):
        guard.check("k", int((now - 30) * 1000), "nonce-000", now=now)
    guard.check("k", int(now * 1000), "nonce-new", now=now)


def test_token_buckets_refill_and_hint_when_to_retry():
    clock = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=4.0, what="requests", clock=lambda: clock[0])
    for _ in range(4):
        buckets.take("a")
    with pytest.raises(RateLimited) as err:
        buckets.take("a")
    assert err.value.retry_after_s == pytest.approx(0.5)
    buckets.take("b")  # another name has its own bucket
    clock[0] = 0.5
    buckets.take("a")
    big = TokenBuckets(rate=10.0, burst=10.0, what="tokens", clock=lambda: clock[0])
    big.take("x", cost=500)  # bigger than the burst: allowed once from a full bucket...
    with pytest.raises(RateLimited):
        big.take("x", cost=1)  # ...and paid back before the next


def test_ip_rules():
    rules = IpRules.from_cidrs(allow=["10.0.0.0/8", "::1/128"], deny=["10.1.0.0/16"])
    assert rules.admits("10.2.3.4") and rules.admits("::1")
    assert not rules.admits("10.1.2.3") and not rules.admits("192.168.0.1")
    assert IpRules.from_cidrs(deny=["127.0.0.0/8"]).admits("::ffff:10.0.0.1")
    assert not IpRules.from_cidrs(deny=["127.0.0.0/8"]).admits("::ffff:127.0.0.1")
    assert peer_ip("ipv4:127.0.0.1:5555") == "127.0.0.1" and peer_ip("ipv6:[::1]:80") == "::1"
    with pytest.raises(ValueError, match="security.ip_allow entries must be CIDR"):
        IpRules.from_cidrs(allow=["ten.0.0.0/8"])


def test_keys_file_holds_hashes_and_a_broken_edit_keeps_the_keys(tmp_path):
    path = tmp_path / "keys.jsonl"
    key, record = keyfile.create_key(path, "acme", "admin")
    store = keyfile.KeyStore(path)
    assert store.lookup(key) == record and store.lookup(key + "x") is None
    assert store.lookup("ukv_" + record.key_id + "_" + "A" * 43) is None
    path.write_text(path.read_text() + "{not json\n")
    store.reload()
    assert store.lookup(key) == record  # a half-edited file locks nobody out
    with pytest.raises(ValueError, match="keys_file .* could not be read"):
        keyfile.KeyStore(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="role must be one of"):
        keyfile.create_key(path.with_name("k2"), "acme", "root")


def test_headers_and_open_edge():
    assert api_key_from({"authorization": "Bearer abc"}) == "abc"
    assert api_key_from({"authorization": "bearer  abc "}) == "abc"
    assert api_key_from({"x-api-key": "xyz"}) == "xyz"
    assert api_key_from({"authorization": "Basic dXNlcg=="}) == ""
    open_edge = EdgeSecurity(SecuritySettings())
    principal = open_edge.check_call("/ultrakv.v1.UltraKV/ClearCache", {}, "ipv4:127.0.0.1:1")
    assert principal.is_admin and principal.tenant == ""
    with pytest.raises(ValueError, match="tls_cert and security.tls_key must be set together"):
        SecuritySettings(tls_cert="c.pem")
