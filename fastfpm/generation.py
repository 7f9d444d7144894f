"""A generation: the pools one configuration started, from the start or reload that made them to
the exit of their last worker.

The master serves one generation at a time. A reload (SIGUSR2) starts the next beside it; the
running one serves on until the new one's initial workers have loaded the application, then it is
retired: its workers finish their requests and exit, and it is gone. A new generation whose
application cannot be loaded fails instead and the previous one keeps serving. Sockets whose
address did not change pass from one generation to the next, so no connection is refused.

    starting --(initial workers up)--> serving --(the next one is up)--> draining --> gone
        \\--(the application cannot be loaded: rolled back)--> failed --> gone
"""

from __future__ import annotations

import signal
import time
from typing import Any

from fastfpm import systemd
from fastfpm.address import parse_address
from fastfpm.config import Config
from fastfpm.log import ErrorLog
from fastfpm.pool import Child, Pool

STARTING, SERVING, DRAINING, FAILED = "starting", "serving", "draining", "failed"
# How often a generation going away repeats SIGQUIT: a worker that was between its stop check and
# its wait when the first one came would otherwise sleep until its next connection.
QUIT_REPEAT_SECONDS = 1.0


class Generation:
    """One configuration's pools and workers, numbered from 1 in the order reloads made them."""

    def __init__(self, number: int, config: Config, log: ErrorLog) -> None:
        self.number = number
        self.config = config
        self.log = log                   # the error log its [global] asks for
        self.pools: list[Pool] = []
        self.state = STARTING
        # ids of the listen sockets another generation serves on: closing a pool leaves those open.
        self.shared_sockets: set[int] = set()
        # While going away: SIGKILL for whoever is still busy at the deadline; SIGQUIT repeated.
        self.deadline = 0.0
        self.next_quit = 0.0

    # ------------------------------------------------------------------ starting

    def open_pools(self, identities: dict[str, Any], inherited_sockets: list[tuple[str, Any]]) -> None:
        """The first generation's pools, on the sockets systemd passed (socket activation) or new ones."""
        inherited = [sock for _, sock in inherited_sockets]
        for pool_config in self.config.pools:
            sock = systemd.match_socket(inherited, pool_config.listen) if inherited else None
            if sock is not None:
                inherited.remove(sock)
                self.log.notice(f"[pool {pool_config.name}] using the socket systemd passed for "
                                f"{pool_config.listen}")
            self.pools.append(Pool(pool_config, self.log, self.number, sock=sock,
                                   identity=identities.get(pool_config.name),
                                   inherited=sock is not None))
        for sock in inherited:
            self.log.warning(f"no pool listens on the socket systemd passed as fd {sock.fileno()}; "
                             "closing it")
            sock.close()

    def open_pools_after(self, running: Generation, identities: dict[str, Any]) -> None:
        """A reload's pools: each takes over the running generation's socket on the same address.

        Raises OSError or ValueError (a socket that cannot be made); the pools made so far stay in
        self.pools for close().
        """
        sockets = {str(p.address): p for p in running.pools}
        for pool_config in self.config.pools:
            old = sockets.pop(str(parse_address(pool_config.listen)), None)
            self.pools.append(Pool(pool_config, self.log, self.number,
                                   sock=old.socket if old is not None else None,
                                   identity=identities[pool_config.name],
                                   inherited=old is not None and old.inherited))

    def share_sockets_with(self, other: Generation) -> None:
        """Remember which of this generation's listen sockets other serves on too."""
        self.shared_sockets = {id(p.socket) for p in self.pools} & {id(p.socket) for p in other.pools}

    def all_started(self) -> bool:
        """True once every pool's initial workers have imported the app and wait for connections."""
        return all(p.all_started() for p in self.pools)

    def serve(self) -> None:
        """Its initial workers are up (or it is what a failed reload falls back on): it serves."""
        self.state = SERVING

    # ------------------------------------------------------------------ workers

    def alive(self) -> bool:
        """Any worker of this generation still running."""
        return any(p.children for p in self.pools)

    def children(self) -> list[Child]:
        """Every live worker, pool by pool."""
        return [child for pool in self.pools for child in pool.children.values()]

    def pop_child(self, pid: int) -> Child | None:
        """The worker with this pid (which has exited), no longer counted among its pool's."""
        for pool in self.pools:
            child = pool.children.pop(pid, None)
            if child is not None:
                return child
        return None

    def signal_all(self, sig: int) -> None:
        """Send sig to every live worker."""
        for child in self.children():
            child.signal(sig)

    # ------------------------------------------------------------------ going away

    def retire(self, grace: float) -> None:
        """The next generation is up: workers finish their current request (SIGQUIT) and exit."""
        self.state = DRAINING
        self.stop_workers(signal.SIGQUIT, grace)

    def fail(self, grace: float) -> None:
        """The application cannot be loaded: its workers are terminated (SIGTERM), not replaced."""
        self.state = FAILED
        for child in self.children():
            child.killed_by_pm = True
        self.stop_workers(signal.SIGTERM, grace)

    def stop_workers(self, sig: int, grace: float) -> None:
        """Tell every worker to stop (sig); whoever is left after grace gets SIGKILL (move_along)."""
        now = time.monotonic()
        for child in self.children():
            child.stopping = True
            child.signal(sig)
        self.deadline = now + grace
        self.next_quit = now + QUIT_REPEAT_SECONDS

    def move_along(self, now: float) -> None:
        """Going away: SIGQUIT again each second, SIGKILL after the deadline; a pool whose workers
        are all gone is closed (gone() once none is left)."""
        quit_due = now >= self.next_quit
        if quit_due:
            self.next_quit = now + QUIT_REPEAT_SECONDS
        for pool in list(self.pools):
            if not pool.children:
                self.pools.remove(pool)
                pool.close(keep_socket=id(pool.socket) in self.shared_sockets)
            elif now >= self.deadline:
                for child in pool.children.values():
                    child.signal(signal.SIGKILL)
            elif quit_due:
                for child in pool.children.values():
                    child.signal(signal.SIGQUIT)

    def gone(self) -> bool:
        """Every pool closed: nothing of this generation is left."""
        return not self.pools

    def close(self, keep_shared: bool = False) -> None:
        """Close every pool: its scoreboard, and its socket unless keep_shared and another
        generation serves on it."""
        for pool in self.pools:
            pool.close(keep_socket=keep_shared and id(pool.socket) in self.shared_sockets)
        self.pools = []
