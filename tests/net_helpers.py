"""What the tests that start servers share. (A plain module, not a test file: `tests/` is on
sys.path when pytest runs.)"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback TCP port that nothing listened on a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
