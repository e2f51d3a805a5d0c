"""Ports picked for processes started later are picked outside the kernel's ephemeral range.

A port picked with ``bind(0)`` comes from the range the kernel also hands to outgoing
connections, so it could be taken between the pick and the child's bind: a CI run lost a
cluster test that way (a node loading its model for two seconds found its port held by the
coordinator's connection to etcd).
"""

from __future__ import annotations

import random
import socket

import pytest
from ultrakv.cluster.etcd_server import PICKED_PORTS_FROM, ephemeral_port_range, free_port


def _room() -> int:
    low, _ = ephemeral_port_range()
    if low - PICKED_PORTS_FROM < 1000:
        pytest.skip(f"the ephemeral range starts at {low}: no room below it")
    return low


def test_free_ports_come_from_below_the_ephemeral_range_and_bind():
    low = _room()
    for port in (free_port() for _ in range(20)):
        assert PICKED_PORTS_FROM <= port < low
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


class _Scripted(random.Random):
    """Proposes the given ports first, then random ones."""

    def __init__(self, first: list[int]) -> None:
        super().__init__(7)
        self.first = list(first)

    def randrange(self, start, stop=None, step=1):
        return self.first.pop(0) if self.first else super().randrange(start, stop, step)


def test_a_port_in_use_is_never_picked():
    _room()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as below:
            below.bind(("127.0.0.1", free_port()))  # a port below the range, held too
            taken = below.getsockname()[1]
            port = free_port(rng=_Scripted([taken, taken]))
            assert port not in (busy, taken)
