"""Free TCP ports on the loopback interface, for the servers and process groups that tests,
benchmarks and the SeaweedFS launcher start."""

from __future__ import annotations

import socket
from contextlib import ExitStack


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now (all bound at once, so they differ, then
    released): nothing listens on them until the caller starts something there."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def free_port() -> int:
    """One port free on 127.0.0.1 now (see ``free_ports``)."""
    return free_ports(1)[0]
