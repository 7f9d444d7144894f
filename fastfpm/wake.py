"""A pool's wake pipe: the worker that takes the pool's last idle slot writes a byte, the master wakes.

The master only re-reads a pool's scoreboard when it wakes (a signal, worker output, the tick, a
watched socket), so a burst that took the last idle worker between two wake-ups waited for the
next tick before the master watched the listen socket (issue 12). The workers count idle slots in
the pool header (csrc/scoreboard.h ffpm_idle_enter/ffpm_idle_leave: an atomic add each, no system
call) and only the one that takes the count to 0 writes here; waking is all the byte does, as the
master's loop then watches the socket of a pool with no idle worker and forks for what waits.
"""

from __future__ import annotations

import os
from typing import Any


class WakePipe:
    """The pipe of one pool: read end for the master's watcher, write end inherited by its workers."""

    def __init__(self, header: Any) -> None:
        # Both ends non-blocking: a worker never waits on a full pipe (a full pipe already wakes),
        # and the master's drain stops when it is empty. CLOEXEC: no exec'd program inherits them.
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.header = header
        header.wake_fd = self.write_fd + 1  # 0 in the header means no pipe

    def drain(self) -> None:
        """Empty the pipe (the watcher is level-triggered): one wake-up however many bytes came."""
        try:
            while os.read(self.read_fd, 512):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Disarm the header, then close both ends."""
        self.header.wake_fd = 0
        os.close(self.read_fd)
        os.close(self.write_fd)
