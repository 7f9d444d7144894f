"""A generation: the pools one configuration started, from the start or reload that made them to
the exit of their last worker.

The master serves one generation at a time. A reload (SIGUSR2) starts the next beside it; the
running one serves on until the new one's initial workers have loaded the application, then it is
retired: its workers finish their requests and exit, and it is gone. A new generation whose
application cannot be loaded fails instead and the previous one keeps serving. Sockets whose
address did not change pass from one generation to the next, so no connection is refused; so do the
pools' pm.status_listen listeners (fastfpm.statuslisten), which answer for whichever generation
serves and close with the generation that opened them when the next one no longer has them.

    starting --(initial workers up)--> serving --(the next one is up)--> draining --> gone
        \\--(the application cannot be loaded: rolled back)--> failed --> gone
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from fastfpm import handover, pm, systemd
from fastfpm.address import listen_queue, parse_address
from fastfpm.config import Config
from fastfpm.log import ErrorLog
from fastfpm.pool import Child, Pool, pending_connections
from fastfpm.slowlog import SLOWLOG_SIGNAL
from fastfpm.statuslisten import StatusListener
from fastfpm.watcher import Watcher

STARTING, SERVING, DRAINING, FAILED = "starting", "serving", "draining", "failed"
# How often a generation going away repeats SIGQUIT: a worker that was between its stop check and
# its wait when the first one came would otherwise sleep until its next connection.
QUIT_REPEAT_SECONDS = 1.0


class Generation:
    """One configuration's pools and workers, numbered from 1 in the order reloads made them."""

    def __init__(self, number: int, config: Config, log: ErrorLog, *, spawn_worker: Callable[[Pool], bool],
                 process_max_state: pm.ProcessMaxState, watcher: Watcher | None = None) -> None:
        self.number = number
        self.config = config
        self.log = log                   # the error log its [global] asks for
        self.spawn_worker = spawn_worker  # the master's: start one worker in a pool, False if it cannot
        self.process_max_state = process_max_state  # the master's, kept across reloads
        self.pools: list[Pool] = []
        self.state = STARTING
        # pool name -> its pm.status_listen, served on watcher (the master's; None: none is opened)
        self.watcher = watcher
        self.listeners: dict[str, StatusListener] = {}
        # ids of the listen sockets (and status listeners) another generation serves on: closing a
        # pool leaves those open.
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
        self.watch_wakes()
        self.open_listeners([])

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
        self.watch_wakes()
        self.open_listeners(list(running.listeners.values()))

    def watch_wakes(self) -> None:
        """Watch each growing pool's wake pipe (fastfpm.wake): waking is enough, as the master's next
        wait then watches the socket of a pool with no idle worker (spawn_could_follow)."""
        if self.watcher is None:
            return
        for pool in self.pools:
            if pool.wake is not None:
                self.watcher.register(pool.wake.read_fd, pool.wake.drain)

    def open_listeners(self, running: list[StatusListener]) -> None:
        """Each pool's pm.status_listen: a running listener on the same address is taken over (it
        answers for the running generation until this one serves), else one is opened. OSError
        (the address cannot be bound): those made so far stay in self.listeners for close()."""
        if self.watcher is None:
            return
        kept = {str(listener.address): listener for listener in running}
        for pool in self.pools:
            if pool.config.pm_status_listen:
                listener = kept.pop(str(parse_address(pool.config.pm_status_listen)), None)
                self.listeners[pool.name] = listener or StatusListener(pool, self.watcher)

    def share_sockets_with(self, other: Generation) -> None:
        """Remember which of this generation's listen sockets (and status listeners) other serves on too."""
        def owned(generation: Generation) -> set[int]:
            return {id(p.socket) for p in generation.pools} | {id(s) for s in generation.listeners.values()}

        self.shared_sockets = owned(self) & owned(other)

    def all_started(self) -> bool:
        """True once every pool's initial workers have imported the app and wait for connections."""
        return all(p.all_started() for p in self.pools)

    def log_pools(self) -> None:
        """At debug level, what each pool listens on and how it is managed (at start and reload)."""
        for pool in self.pools:
            self.log.debug(f"[pool {pool.name}] listening on {pool.address}, pm {pool.config.pm}, "
                           f"pm.max_children {pool.config.pm_max_children}")

    def serve(self) -> None:
        """Its initial workers are up (or it is what a failed reload falls back on): it serves, and
        its status listeners answer for its pools."""
        self.state = SERVING
        for pool in self.pools:
            self.publish(pool)
            if pool.name in self.listeners:
                self.listeners[pool.name].serve(pool)

    def publish(self, pool: Pool) -> None:
        """listen.reuseport: a pool that listens beside another master takes its address over now
        (fastfpm.handover); a failure is logged and the pool keeps what it had."""
        try:
            done = handover.publish(pool)
        except OSError as exc:
            self.log.error(f"[pool {pool.name}] cannot take over {pool.address}: {exc}")
            return
        if done:
            self.log.notice(f"[pool {pool.name}] {done}")

    # ------------------------------------------------------------------ process management

    def spawn_initial(self) -> None:
        """Start each pool's initial workers (pm.start_servers, max_children, or none)."""
        wanted = {p.name: [pm.Spawn(p.initial)] if p.initial else [] for p in self.pools}
        capped = self.cap(wanted)
        for pool in self.pools:
            actions = capped.get(pool.name, [])
            # What process.max left is what "ready" waits for.
            pool.initial = sum(a.n for a in actions if isinstance(a, pm.Spawn))
            self.execute(pool, actions)

    def maintain_pools(self, now: float) -> None:
        """The once-a-second idle-server maintenance of every pool."""
        for pool in self.pools:
            pool.scoreboard.sample(listen_queue(pool.socket))  # the status page's queue, max active
        actions = {p.name: pm.decide(p.snapshot(), p.config, p.state, now) for p in self.pools}
        for pool in self.pools:
            # An ondemand pool whose socket wait() leaves alone (see spawn_could_follow) may have
            # connections waiting: pm says whether that means a warning (or, with room again, a spawn).
            if pool.config.pm == "ondemand" and not self.spawn_could_follow(pool):
                pending = pending_connections(pool.socket)
                if pending:
                    actions[pool.name] += pm.on_connection_pending(pool.snapshot(), pool.config, pool.state,
                                                                   pending)
        capped = self.cap(actions)
        for pool in self.pools:
            self.execute(pool, capped.get(pool.name, []))

    def spawn_for_pending(self, pool: Pool) -> None:
        """ondemand, dynamic: fork for the connections in the accept queue no idle or starting worker takes.

        php-fpm forks one child per readiness event, so a burst of connections is served one new
        child at a time; the queue's length lets fastfpm fork for the whole burst at once.
        """
        pending = pending_connections(pool.socket)
        if pending:
            actions = pm.on_connection_pending(pool.snapshot(), pool.config, pool.state, pending)
            self.execute(pool, self.cap({pool.name: actions})[pool.name])

    def respawn(self, due: set[str]) -> None:
        """Replace the workers the pools named in due lost without asking, as pm says."""
        for pool in self.pools:
            if pool.name in due:
                actions = pm.on_worker_exit(pool.snapshot(), pool.config, killed_by_pm=False)
                self.execute(pool, self.cap({pool.name: actions})[pool.name])

    def ondemand_sockets(self) -> tuple[list[Pool], list[Pool]]:
        """The pools whose socket is to be watched for connections, and those whose accept queue
        is to be looked at again shortly instead (spawn_could_follow's "watch" and "recheck")."""
        could = {id(pool): self.spawn_could_follow(pool) for pool in self.pools}
        return ([p for p in self.pools if could[id(p)] == "watch"],
                [p for p in self.pools if could[id(p)] == "recheck"])

    def spawn_could_follow(self, pool: Pool) -> str | None:
        """Whether a connection waiting on this ondemand or dynamic pool's socket could fork a worker now.

        dynamic too (issue 12): once its last idle worker is busy the socket is watched, so a burst
        forks at once (pm.on_connection_pending) instead of at the next ticks. No worker-side cost:
        the master learns it from the listen socket, not from the request path.

        "watch": no worker idle or starting and room to spawn, so the socket is watched. select() is
        level-triggered: a connection left waiting for a busy full pool would wake the loop again at
        once, forever (php-fpm registers the socket edge-triggered instead). "recheck": workers are
        starting and there is room; the queue is checked every ONDEMAND_RECHECK_SECONDS meanwhile.
        None: nothing to do. Nobody waits on a full pool unseen: maintain_pools looks at its socket
        once a second for the max_children warning. (A stopping master watches no socket.)
        """
        if pool.config.pm not in ("ondemand", "dynamic"):
            return None
        snapshot = pool.snapshot()
        if snapshot.idle or snapshot.total >= pool.config.pm_max_children:
            return None
        process_max = self.config.global_.process_max
        if process_max > 0 and self.total_workers() >= process_max:
            return None
        return "recheck" if snapshot.starting else "watch"

    def total_workers(self) -> int:
        """Workers alive in every pool of this generation (what process.max caps).

        An older generation still finishing its requests after a reload is not counted: the
        scoreboards have room for two generations, and counting it would leave the new one without
        workers until the old requests end. So during a drain the total may briefly reach twice
        process.max (php-fpm never has two generations: it waits for the old one, then re-executes).
        """
        return sum(len(p.children) for p in self.pools)

    def cap(self, actions: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """pm's actions with the spawns process.max leaves no room for cut (and warned about once)."""
        return pm.cap_spawns(actions, self.total_workers(), self.config.global_.process_max,
                             self.process_max_state)

    def execute(self, pool: Pool, actions: list[Any]) -> None:
        """Carry out pm's actions for one pool."""
        for action in actions:
            if isinstance(action, pm.Spawn):
                for _ in range(action.n):
                    if not self.spawn_worker(pool):
                        break
            elif isinstance(action, pm.Kill):
                child = pool.children.get(action.pid)
                if child is not None:
                    child.stopping = child.killed_by_pm = True
                    child.signal(signal.SIGQUIT)
            elif isinstance(action, pm.Warn):
                self.log.warning(action.message)
            elif isinstance(action, pm.Terminate):
                child = pool.children.get(action.pid)
                if child is not None:
                    self.log.warning(action.message)
                    child.stopping = True
                    child.signal(signal.SIGKILL if action.force else signal.SIGTERM)
            elif isinstance(action, pm.SlowlogDump):
                child = pool.children.get(action.pid)
                if child is not None:
                    self.log.warning(action.message)
                    child.signal(SLOWLOG_SIGNAL)

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
        self.close_listeners(keep_shared=True)
        self.stop_workers(signal.SIGQUIT, grace)

    def fail(self, grace: float) -> None:
        """The application cannot be loaded: its workers are terminated (SIGTERM), not replaced."""
        self.state = FAILED
        self.close_listeners(keep_shared=True)
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
        generation serves on it; the status listeners likewise."""
        self.close_listeners(keep_shared)
        for pool in self.pools:
            if self.watcher is not None and pool.wake is not None:
                self.watcher.unregister(pool.wake.read_fd)  # still open: the number is still ours
            pool.close(keep_socket=keep_shared and id(pool.socket) in self.shared_sockets)
        self.pools = []

    def close_listeners(self, keep_shared: bool) -> None:
        """Close the status listeners (those another generation has too stay open, if keep_shared);
        this generation holds none after it."""
        for listener in self.listeners.values():
            if not (keep_shared and id(listener) in self.shared_sockets):
                listener.close()
        self.listeners = {}
