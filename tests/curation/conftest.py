"""Fixtures of the ingestion tests: a network sandbox that lets connections reach 127.0.0.1 only."""

from __future__ import annotations

import ipaddress
import socket

import pytest


@pytest.fixture
def loopback_only(monkeypatch):
    """Every connect() of the test goes to a loopback address, or the test fails (and nothing is sent)."""
    seen: list[str] = []
    real_connect = socket.socket.connect

    def connect(self, address):  # noqa: ANN001
        host = address[0] if isinstance(address, tuple) else str(address)
        seen.append(host)
        if not ipaddress.ip_address(host.split("%")[0]).is_loopback:
            raise AssertionError(f"test tried to connect to non-loopback {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    return seen
