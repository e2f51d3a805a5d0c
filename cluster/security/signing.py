"""HMAC request signing with a replay window, for keys created with ``--signing``.

A signed call carries three headers besides its key: the time it was signed (unix
milliseconds), a nonce used once, and ``hex(HMAC-SHA256(secret, canonical))`` where
``canonical`` joins the method path, the timestamp, the nonce and the SHA-256 of the body
(a unary gRPC call's serialized request, an HTTP request's body; empty for a gRPC stream,
whose signature covers its opening). The server refuses a signature that does not match, a
timestamp outside the window, and a nonce it has seen: a captured request cannot be sent
again, and a captured key is useless without the secret, which never travels.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict

TIMESTAMP_HEADER = "x-ultrakv-timestamp"
NONCE_HEADER = "x-ultrakv-nonce"
SIGNATURE_HEADER = "x-ultrakv-signature"
MAX_NONCE_CHARS = 64


class ReplayRejected(Exception):
    """A signed request outside the window or with a nonce already used."""


def canonical(method: str, timestamp_ms: int, nonce: str, body: bytes) -> bytes:
    return "\n".join((method, str(timestamp_ms), nonce,
                      hashlib.sha256(body).hexdigest())).encode("utf-8")


def sign(secret: str, method: str, timestamp_ms: int, nonce: str, body: bytes = b"") -> str:
    return hmac.new(secret.encode("utf-8"), canonical(method, timestamp_ms, nonce, body),
                    hashlib.sha256).hexdigest()


def signature_headers(secret: str, method: str, body: bytes = b"",
                      now: float | None = None) -> list[tuple[str, str]]:
    """The headers that sign one call (what the client library sends)."""
    ts = int((time.time() if now is None else now) * 1000)
    nonce = secrets.token_hex(16)
    return [(TIMESTAMP_HEADER, str(ts)), (NONCE_HEADER, nonce),
            (SIGNATURE_HEADER, sign(secret, method, ts, nonce, body))]


def verify(secret: str, method: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
    """Check the signature headers; returns (timestamp ms, nonce). Raises ValueError."""
    try:
        ts = int(headers[TIMESTAMP_HEADER])
        nonce = headers[NONCE_HEADER]
        given = headers[SIGNATURE_HEADER]
    except (KeyError, ValueError):
        raise ValueError(f"this key signs its requests: {TIMESTAMP_HEADER}, {NONCE_HEADER} "
                         f"and {SIGNATURE_HEADER} must be set") from None
    if not 8 <= len(nonce) <= MAX_NONCE_CHARS:
        raise ValueError(f"{NONCE_HEADER} must be 8..{MAX_NONCE_CHARS} characters, got {len(nonce)}")
    if not hmac.compare_digest(sign(secret, method, ts, nonce, body), given):
        raise ValueError("request signature does not match")
    return ts, nonce


class ReplayGuard:
    """Accepts each (key, nonce) once within ``window_s`` of its timestamp.

    Memory stays bounded: at ``max_nonces`` the oldest nonce is dropped and its timestamp
    becomes a floor, below which every request is refused, so dropping never re-opens a
    replay (under a flood the window shrinks instead).
    """

    def __init__(self, window_s: float = 300.0, max_nonces: int = 100_000) -> None:
        if window_s <= 0 or max_nonces < 1:
            raise ValueError("window_s must be > 0 and max_nonces >= 1")
        self.window_ms = int(window_s * 1000)
        self.max_nonces = max_nonces
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()  # -> timestamp, by arrival
        self._floor_ms = 0
        self._lock = threading.Lock()

    def check(self, key_id: str, timestamp_ms: int, nonce: str, now: float | None = None) -> None:
        now_ms = int((time.time() if now is None else now) * 1000)
        if abs(now_ms - timestamp_ms) > self.window_ms:
            raise ReplayRejected(f"request timestamp is {abs(now_ms - timestamp_ms) / 1000:.0f} s "
                                 f"from the server's clock; the window is "
                                 f"{self.window_ms / 1000:.0f} s")
        with self._lock:
            self._expire(now_ms)
            if timestamp_ms <= self._floor_ms:
                raise ReplayRejected("request timestamp is older than the nonces still "
                                     "remembered; sign it again")
            if (key_id, nonce) in self._seen:
                raise ReplayRejected("nonce was used already (a replayed request)")
            self._seen[(key_id, nonce)] = timestamp_ms
            while len(self._seen) > self.max_nonces:
                _, ts = self._seen.popitem(last=False)
                self._floor_ms = max(self._floor_ms, ts)

    def _expire(self, now_ms: int) -> None:
        # Entries arrive roughly in timestamp order; stop at the first one still live.
        while self._seen:
            key, ts = next(iter(self._seen.items()))
            if ts >= now_ms - self.window_ms:
                break
            del self._seen[key]

    def __len__(self) -> int:
        return len(self._seen)
