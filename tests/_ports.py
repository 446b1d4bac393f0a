"""
Free TCP ports on loopback for the tests that start real processes.
"""

from __future__ import annotations

import socket


def freePorts(count: int) -> list[int]:
    """
    C{count} distinct ports on C{127.0.0.1} that were free a moment ago: all
    are bound at once, so none is given twice, then released for the caller
    to listen on.
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def freePort() -> int:
    """
    A port on C{127.0.0.1} that was free a moment ago.
    """
    return freePorts(1)[0]
