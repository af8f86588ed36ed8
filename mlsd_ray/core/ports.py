"""Ports on this machine: whether one is taken, and a free one to give a server."""

from __future__ import annotations

import random
import socket
from pathlib import Path

__all__ = ["FIRST_CHOSEN_PORT", "free_port", "port_in_use"]


def port_in_use(host: str, port: int) -> str | None:
    """Why `host:port` cannot be bound, or None when it is free."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


FIRST_CHOSEN_PORT = 20000  # above the ports that servers commonly default to


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing uses now, below the kernel's ephemeral range. A port from that range
    (what binding port 0 gives) is handed out again to the next outgoing connection or port-0
    bind, and every Ray worker makes many: a test's Serve port picked that way was taken
    before Serve bound it ("Failed to bind to address")."""
    below = _ephemeral_ports_start()
    for _ in range(200):
        port = random.randrange(FIRST_CHOSEN_PORT, below)
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # all those tried are taken: any free one
        probe.bind((host, 0))
        return probe.getsockname()[1]


def _ephemeral_ports_start() -> int:
    """The first port of Linux's ephemeral range (32768 by default; macOS's starts at 49152)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
