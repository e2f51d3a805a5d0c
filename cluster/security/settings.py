"""The ``security:`` section of the config file (and its command-line flags): one place for
everything the edge enforces."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SecuritySettings:
    """Edge security. Empty ``keys_file`` = no authentication (every caller is one anonymous
    admin tenant): meant for loopback development only."""

    keys_file: str = ""
    ip_allow: list[str] = field(default_factory=list)  # CIDR; empty = every address
    ip_deny: list[str] = field(default_factory=list)  # CIDR; wins over ip_allow
    # token buckets; 0 = off. Tokens are prompt tokens (estimated) + max_length.
    key_requests_per_s: float = 0.0
    key_tokens_per_s: float = 0.0
    ip_requests_per_s: float = 0.0
    ip_tokens_per_s: float = 0.0
    burst_s: float = 2.0  # a bucket holds this many seconds of its rate
    tenant_max_running: int = 0  # requests in flight per tenant (per coordinator); 0 = off
    tenant_max_queued: int = 0  # requests waiting for one of those slots
    tenant_max_sessions: int = 0  # sessions per tenant on each node; 0 = off
    tenant_max_session_tokens: int = 0  # history tokens of a tenant's sessions per node
    signature_window_s: float = 300.0  # signed requests: clock skew + replay window
    max_nonces: int = 100_000  # nonces remembered for the window, at most
    tls_cert: str = ""  # PEM chain; with tls_key the client port speaks TLS
    tls_key: str = ""
    tls_client_ca: str = ""  # PEM CA: clients must present a certificate it signed (mTLS)

    def __post_init__(self) -> None:
        for name in ("key_requests_per_s", "key_tokens_per_s", "ip_requests_per_s",
                     "ip_tokens_per_s", "tenant_max_running", "tenant_max_queued",
                     "tenant_max_sessions", "tenant_max_session_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"security.{name} must be >= 0, got {getattr(self, name)}")
        if self.burst_s <= 0:
            raise ValueError(f"security.burst_s must be > 0, got {self.burst_s}")
        if self.signature_window_s <= 0:
            raise ValueError(f"security.signature_window_s must be > 0, got {self.signature_window_s}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("security.tls_cert and security.tls_key must be set together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("security.tls_client_ca needs security.tls_cert and tls_key")
