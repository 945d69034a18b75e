"""Free TCP ports for servers the tests start as processes of their own.

A port from ``bind(("127.0.0.1", 0))`` comes from the kernel's ephemeral range, the range
every outgoing connection takes its local port from: between the moment it is handed out and
the moment the process binds it, any connection on the machine can take it ("address already
in use": seen once in CI's fleet tests). These ports are taken below that range instead, where
no outgoing connection lands, and none is handed out twice in a row.
"""

from __future__ import annotations

import random
import socket
from collections import deque
from pathlib import Path

#: ports handed out lately: not handed out again before they age out
_RECENT: deque[int] = deque(maxlen=2000)
_RANGE = 10_000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on now, below the ephemeral range when there is
    room there (else one the kernel picks)."""
    top = _ephemeral_start()
    low = max(1024, top - _RANGE)
    for _ in range(200):
        port = random.randrange(low, top) if top - low >= 1000 else 0
        if port in _RECENT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        _RECENT.append(port)
        return port
    raise AssertionError("no free port on 127.0.0.1")
