"""IP allow and deny lists (CIDR): deny wins; a non-empty allow list admits only its ranges."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str], field: str) -> tuple[Network, ...]:
    out = []
    for cidr in cidrs:
        try:
            out.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{field} entries must be CIDR ranges like 10.0.0.0/8, got {cidr!r}") from None
    return tuple(out)


def peer_ip(peer: str) -> str:
    """The address of a gRPC peer string (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``), or of an
    HTTP ``host`` / ``host:port``; "" when it has none (unix sockets)."""
    if peer.startswith("ipv4:"):
        return peer[5:].rsplit(":", 1)[0]
    if peer.startswith("ipv6:"):
        return peer[5:].rsplit(":", 1)[0].strip("[]")
    if peer.startswith(("unix:", "unix-abstract:")):
        return ""
    return peer


@dataclass(frozen=True)
class IpRules:
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()

    @classmethod
    def from_cidrs(cls, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> IpRules:
        return cls(parse_networks(allow, "security.ip_allow"),
                   parse_networks(deny, "security.ip_deny"))

    @property
    def active(self) -> bool:
        return bool(self.allow or self.deny)

    def admits(self, ip: str) -> bool:
        if not self.active:
            return True
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return not self.allow  # no address (unix socket): only an allow list refuses it
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in net for net in self.deny):
            return False
        return not self.allow or any(address in net for net in self.allow)
