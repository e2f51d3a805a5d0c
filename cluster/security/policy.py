"""The edge's decisions, free of gRPC and HTTP: who is calling (``check_call``) and whether
their next request may run now (``admit``). Every denial is counted and audited
(events.py) and raised as :class:`Denied`, which maps to a gRPC status and an HTTP status.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import grpc
from ultrakv.cluster.security.events import SecurityEvents
from ultrakv.cluster.security.ip_rules import IpRules, peer_ip
from ultrakv.cluster.security.keys import KeyStore
from ultrakv.cluster.security.principal import OPEN, Principal, Role
from ultrakv.cluster.security.rate_limits import RateLimited, TenantSlots, TokenBuckets
from ultrakv.cluster.security.settings import SecuritySettings
from ultrakv.cluster.security.signing import ReplayGuard, ReplayRejected, verify
from ultrakv.cluster.validation import RequestRejected
from ultrakv.v1 import types_pb2 as pb

# Methods (the last part of the gRPC path) only an admin key may call.
# ExportSessions / ImportSessions: a backup holds, and a restore writes, every tenant's sessions.
ADMIN_METHODS = frozenset({"ClearCache", "CleanupSessions", "ExportSessions", "ImportSessions"})
# Services only an admin key may call: server reflection lists every service, method and
# message of the server (finding 17), which tells an attacker where to aim.
ADMIN_SERVICES = frozenset({"grpc.reflection.v1alpha.ServerReflection",
                            "grpc.reflection.v1.ServerReflection"})


def grpc_service(method: str) -> str:
    """The service of a gRPC path: ``/pkg.Service/Method`` -> ``pkg.Service``."""
    return method.lstrip("/").split("/", 1)[0]


_HTTP_STATUS = {grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403,
                grpc.StatusCode.RESOURCE_EXHAUSTED: 429}


class Denied(RequestRejected):
    """A request the edge refuses for security: ``kind`` is the event kind."""

    def __init__(self, kind: str, code: grpc.StatusCode, message: str,
                 retry_after_s: float = 0.0) -> None:
        super().__init__(code, "", message, retry_after_s)
        self.kind = kind

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS.get(self.code, 403)


def api_key_from(headers: Mapping[str, str]) -> str:
    """The key of ``authorization: Bearer KEY`` or ``x-api-key: KEY`` (headers lowercased)."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key", "").strip()


def estimated_tokens(request: pb.GenerateRequest, default_max_length: int) -> int:
    """What a request may cost in tokens, known before it runs: its prompt (text counted at
    one token per 4 bytes, a usual figure for BPE tokenizers, plus a few per chat message
    for the template) and its ``max_length``."""
    kind = request.WhichOneof("prompt")
    if kind == "token_ids":
        prompt = len(request.token_ids.ids)
    elif kind == "messages":
        prompt = sum(len(m.content.encode("utf-8")) // 4 + 4 for m in request.messages.messages)
    else:
        prompt = len(request.text.encode("utf-8")) // 4 + 1
    new = request.sampling.max_length if request.sampling.HasField("max_length") else default_max_length
    return prompt + max(0, new)


class EdgeSecurity:
    """Authentication, authorization, IP rules, signatures, rate limits and tenant slots."""

    def __init__(self, settings: SecuritySettings | None = None,
                 events: SecurityEvents | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings = settings or SecuritySettings()
        self.keys = KeyStore(settings.keys_file) if settings.keys_file else None
        self.ip_rules = IpRules.from_cidrs(settings.ip_allow, settings.ip_deny)
        self.replay = ReplayGuard(settings.signature_window_s, settings.max_nonces)
        burst = settings.burst_s

        def buckets(rate: float, what: str) -> TokenBuckets:
            return TokenBuckets(rate, rate * burst, what, clock)

        self.key_requests = buckets(settings.key_requests_per_s, "requests per second of this key")
        self.key_tokens = buckets(settings.key_tokens_per_s, "tokens per second of this key")
        self.ip_requests = buckets(settings.ip_requests_per_s, "requests per second of this address")
        self.ip_tokens = buckets(settings.ip_tokens_per_s, "tokens per second of this address")
        self.slots = TenantSlots(settings.tenant_max_running, settings.tenant_max_queued)
        self.events = events or SecurityEvents()

    @property
    def authenticates(self) -> bool:
        return self.keys is not None

    def reload_keys(self) -> None:
        if self.keys is not None:
            self.keys.reload()

    def deny(self, kind: str, code: grpc.StatusCode, message: str, *, method: str, ip: str,
             principal: Principal | None = None, retry_after_s: float = 0.0) -> Denied:
        """Count and audit a denial; returns the exception to raise."""
        self.events.record(kind, method=method, peer_ip=ip, reason=message,
                           key_id=principal.key_id if principal else "",
                           tenant=principal.tenant if principal else "")
        return Denied(kind, code, message, retry_after_s)

    def signs(self, headers: Mapping[str, str]) -> bool:
        """Whether the key in ``headers`` (if valid) signs its requests, so the body must be
        read before :meth:`check_call` (the HTTP API reads it only then)."""
        if self.keys is None:
            return False
        record = self.keys.lookup(api_key_from(headers))
        return record is not None and bool(record.signing_secret)

    def check_call(self, method: str, headers: Mapping[str, str], peer: str,
                   body: bytes = b"") -> Principal:
        """IP rules, then the key (and its signature), then whether its role may call
        ``method`` (a gRPC path or an HTTP path). Raises Denied."""
        ip = peer_ip(peer)
        if not self.ip_rules.admits(ip):
            raise self.deny("ip_denied", grpc.StatusCode.PERMISSION_DENIED,
                            "client address is not allowed", method=method, ip=ip)
        principal = self._authenticate(method, headers, body, ip)
        name = method.rsplit("/", 1)[-1]
        if grpc_service(method) in ADMIN_SERVICES:
            name = grpc_service(method)
        elif name not in ADMIN_METHODS:
            return principal
        if not principal.is_admin:
            raise self.deny("forbidden", grpc.StatusCode.PERMISSION_DENIED,
                            f"{name} needs an admin key", method=method, ip=ip,
                            principal=principal)
        return principal

    def _authenticate(self, method: str, headers: Mapping[str, str], body: bytes,
                      ip: str) -> Principal:
        if self.keys is None:
            return OPEN
        key = api_key_from(headers)
        if not key:
            raise self.deny("auth_failed", grpc.StatusCode.UNAUTHENTICATED,
                            "an API key is required (authorization: Bearer KEY or x-api-key)",
                            method=method, ip=ip)
        record = self.keys.lookup(key)
        if record is None:
            raise self.deny("auth_failed", grpc.StatusCode.UNAUTHENTICATED,
                            "API key is not valid", method=method, ip=ip)
        principal = Principal(tenant=record.tenant, role=Role.parse(record.role),
                              key_id=record.key_id)
        if record.signing_secret:
            try:
                ts, nonce = verify(record.signing_secret, method, headers, body)
                self.replay.check(record.key_id, ts, nonce)
            except ReplayRejected as exc:
                raise self.deny("replay_rejected", grpc.StatusCode.UNAUTHENTICATED, str(exc),
                                method=method, ip=ip, principal=principal) from None
            except ValueError as exc:
                raise self.deny("auth_failed", grpc.StatusCode.UNAUTHENTICATED, str(exc),
                                method=method, ip=ip, principal=principal) from None
        return principal

    def admit(self, principal: Principal, peer: str, *, requests: int = 1, tokens: int = 0,
              method: str = "") -> None:
        """Take ``requests`` and ``tokens`` from the key's and the address's buckets, or raise
        Denied (RESOURCE_EXHAUSTED with a retry-after hint)."""
        ip = peer_ip(peer)
        try:
            if principal.key_id:
                self.key_requests.take(principal.key_id, requests)
                self.key_tokens.take(principal.key_id, tokens)
            self.ip_requests.take(ip, requests)
            self.ip_tokens.take(ip, tokens)
        except RateLimited as exc:
            raise self.deny("rate_limited", grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                            method=method, ip=ip, principal=principal,
                            retry_after_s=exc.retry_after_s) from None

    async def acquire_slot(self, principal: Principal, peer: str, method: str = "") -> None:
        """A running-request slot of the principal's tenant (waiting in its queue if there is
        room), or Denied."""
        try:
            await self.slots.acquire(principal.tenant)
        except RateLimited as exc:
            raise self.deny("rate_limited", grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc),
                            method=method, ip=peer_ip(peer), principal=principal,
                            retry_after_s=exc.retry_after_s) from None

    def release_slot(self, principal: Principal) -> None:
        self.slots.release(principal.tenant)
