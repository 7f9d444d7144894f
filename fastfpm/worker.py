"""A worker process's life after fork: signals, the application, then the Cython request loop.

Everything here runs once per worker; the per-request path is fastfpm._core.Worker.serve().
"""

from __future__ import annotations

import os
import random
import signal
import socket
import struct
import sys
from typing import Any, NoReturn

from fastfpm import __version__, accesslog, handover, not_built

try:
    from fastfpm._core import FileWrapper, Worker
except ModuleNotFoundError as exc:
    raise not_built(exc) from None
from fastfpm.address import REFUSED_MESSAGE, AllowedClients, parse_address
from fastfpm.app import AppLoadError, load_app
from fastfpm.config import Size
from fastfpm.hooks import WorkerHooks
from fastfpm.log import ErrorLog, Throttle, WsgiErrors
from fastfpm.process import SetupError, prepare_worker, watch_master
from fastfpm.proctitle import set_worker_title
from fastfpm.script import SCRIPT_APP
from fastfpm.script import for_pool as script_dispatcher
from fastfpm.status import routes as status_routes

# Exit status of a worker whose application (or a hook) failed to import, or whose on_worker_start
# raised: the master stops (or rolls a reload back) rather than respawning it in a loop (gunicorn
# does the same with its WORKER_BOOT_ERROR).
EXIT_BOOT_ERROR = 3


def environ_template(pool: Any, errors: Any = None) -> dict[str, Any]:
    """The environ entries every request starts from, copied once per request.

    The CGI defaults cover servers that leave out variables PEP 3333 requires; the params a
    request carries overwrite them. errors is wsgi.errors (the error log; stderr when None).
    """
    return {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": errors if errors is not None else sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
        # The body stream ends where the request body ends, so apps may read() to EOF
        # (the extension gunicorn, uWSGI and mod_wsgi advertise under this name).
        "wsgi.input_terminated": True,
        "REQUEST_METHOD": "GET",
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.0",
        "SERVER_SOFTWARE": f"fastfpm/{__version__}",
    }


def reset_signals(on_graceful_stop: Any) -> None:
    """Undo the master's signal set-up in a fresh child.

    SIGQUIT ends the worker once its current request is done; SIGTERM kills it outright (the
    default action), as in php-fpm. SIGINT is ignored: Ctrl-C reaches the whole process group and
    the master decides. SIGPIPE is ignored so a vanished web server is an error code, not a death.
    """
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, on_graceful_stop)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def redirect_output(pool: Any, stdout_fd: int, stderr_fd: int) -> None:
    """Point fds 1 and 2 at the master's pipes (catch_workers_output) or at /dev/null (php-fpm's
    default: what an app prints is dropped, its log lines and tracebacks still reach the log)."""
    if pool.catch_workers_output:
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
    else:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.close(devnull)
    os.close(stdout_fd)
    os.close(stderr_fd)


def run_worker(pool: Any, listen_fd: int, scoreboard: Any, slot_index: int, log: ErrorLog, *,
               log_fd: int, stdout_fd: int, stderr_fd: int, identity: Any = None,
               access_log_fd: int = -1, master_pid: int = 0,
               preloaded: tuple[Any, WorkerHooks] | None = None) -> NoReturn:
    """Serve pool's application on listen_fd until told to stop (or the master, master_pid as it
    knew itself before the fork, dies), then exit the process. preloaded: the app and hooks a
    template process (fastfpm.template) imported and set up for before forking this worker."""
    worker: Worker | None = None
    master_pid = master_pid or os.getppid()

    def graceful_stop(signum: int, frame: Any) -> None:
        if worker is not None:
            worker.stopping = True
        else:
            os._exit(0)  # still importing the application: nothing in flight to finish

    reset_signals(graceful_stop)
    set_worker_title(pool.name, scoreboard, slot_index)
    log.for_worker(pool.name, log_fd)
    status = 1
    try:
        redirect_output(pool, stdout_fd, stderr_fd)
        if preloaded is None:
            prepare_or_exit(pool, identity, log)
        if not watch_master(master_pid):  # SIGQUIT from the kernel when the master dies
            os._exit(0)  # it died already: nobody would supervise this worker
        if pool.slowlog and pool.request_slowlog_timeout:
            install_slowlog(pool, scoreboard, slot_index, log)
        app, hooks = preloaded or load_or_exit(pool, log)
        if preloaded is None:
            set_accept_timeout(listen_fd)
        worker = Worker(
            listen_fd, app, environ_template=environ_template(pool, WsgiErrors(log)), log=log.log,
            log_exception=log.exception, scoreboard=scoreboard, slot_index=slot_index,
            idle_timeout=pool.idle_timeout, header_timeout=pool.request_header_timeout,
            body_timeout=pool.request_body_timeout, read_timeout=pool.read_timeout,
            first_byte_grace=first_byte_grace(pool),
            max_params_size=pool.max_params_size, mount=pool.mount or "",
            keep_http_proxy=pool.security_keep_http_proxy, max_body_size=pool.client_max_body_size,
            script_paths=pool.app == SCRIPT_APP,
            max_conns=pool.pm_max_children, max_requests=max_requests(pool),
            max_memory=pool.pm_max_memory,
            client_filter=AllowedClients.parse(pool.listen_allowed_clients).client_filter(
                lambda peer: log.error(REFUSED_MESSAGE.format(peer=peer))),
            parent_pid=master_pid, access_log=accesslog.for_worker(pool, access_log_fd),
            # pm.status_path and ping.path: answered by the worker itself, from the scoreboard.
            routes=status_routes(pool, scoreboard, slot_index),
            protocol_log=Throttle(log.log, "connections closed on malformed FastCGI input"),
        )
        # listen.reuseport: a graceful stop (a hand-over) waits for the kept connections' next
        # requests before it closes them (fastfpm.handover.linger_seconds).
        worker.linger_ms = int(handover.linger_seconds(pool) * 1000)
        # After the Worker exists, so a SIGQUIT during the hook ends the loop before it starts
        # and on_worker_exit still runs; before serve(), so the slot stays Starting till it ends.
        if not hooks.run_start(log):
            os._exit(EXIT_BOOT_ERROR)
        if worker.serve() == "max_memory":
            log.notice(over_memory_message(worker.peak_memory, worker.max_memory))
        worker.mark_ending()
        hooks.run_exit(log)
        status = 0
    except BaseException:
        log.exception("the worker failed")
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def prepare_or_exit(pool: Any, identity: Any, log: ErrorLog) -> None:
    """rlimits, chdir, priority, then the switch to the pool's user, then env[]/clear_env: all
    before the application's code runs, as php-fpm orders it; a failure exits with EXIT_BOOT_ERROR."""
    try:
        for level, message in prepare_worker(pool, identity):
            log.log(level, message)
    except SetupError as exc:
        log.alert(str(exc))
        os._exit(EXIT_BOOT_ERROR)


def load_or_exit(pool: Any, log: ErrorLog) -> tuple[Any, WorkerHooks]:
    """The pool's app and hooks, imported with the working directory on sys.path (as with gunicorn
    and `python -m`); a failure is logged and the worker exits with EXIT_BOOT_ERROR."""
    python_path = [*pool.python_path, os.getcwd()]
    what = f"the application {pool.app!r}"
    try:
        if pool.app == SCRIPT_APP:  # script mode: SCRIPT_FILENAME picks the app (fastfpm.script)
            app = script_dispatcher(pool, log, python_path)
        else:
            app = load_app(pool.app, python_path)
        what = "the worker hooks"
        return app, WorkerHooks.load(pool, python_path)
    except AppLoadError as exc:
        log.error(str(exc))
    except BaseException:
        log.exception(f"importing {what} failed")
    os._exit(EXIT_BOOT_ERROR)


# How long a worker's accept() waits before it looks at its stop flag again (a signal that lands
# just before accept() does not interrupt it).
ACCEPT_TIMEOUT_SECONDS = 0.1


def set_accept_timeout(listen_fd: int) -> None:
    """Bound accept() with SO_RCVTIMEO, which Linux applies to accept on a blocking socket.

    The worker loop blocks in accept() (one waiter woken per connection, no thundering herd),
    but must not sleep there forever: after losing a race for a connection its kept-alive
    connections would wait, and a stop signal that lands just before accept() would go unseen.
    """
    sock = socket.socket(fileno=os.dup(listen_fd))
    try:
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", 0, int(ACCEPT_TIMEOUT_SECONDS * 1_000_000)))
    finally:
        sock.close()


# How long a worker waits for a new connection's first bytes before the connection joins the
# others it waits on (fastfpm._core's ConnectionLoop). A web server writes right after connecting,
# but the worker may accept in between; a connection left waiting in the set could be stranded
# behind the next request the worker takes (a long one, while other workers idle). 50 ms covers a
# client descheduled for a few scheduler ticks or GIL switch intervals, and costs a silent client's
# victim a hundredth of idle_timeout.
FIRST_BYTE_GRACE_SECONDS = 0.05


def first_byte_grace(pool: Any) -> float:
    """FIRST_BYTE_GRACE_SECONDS on a unix socket; 0 on TCP, where the master set TCP_DEFER_ACCEPT
    (fastfpm.address.defer_accept): accept() returns a connection with data, or one silent for
    seconds already."""
    return FIRST_BYTE_GRACE_SECONDS if parse_address(pool.listen).is_unix else 0.0


def install_slowlog(pool: Any, scoreboard: Any, slot_index: int, log: ErrorLog) -> None:
    """Start the thread that appends this worker's traceback to the slowlog when the master asks
    (the master decides a request is slow from the scoreboard; see fastfpm.slowlog)."""
    from fastfpm.scoreboard import read_slot
    from fastfpm.slowlog import install

    def describe_request() -> tuple[str, str]:
        slot = read_slot(scoreboard, slot_index)
        return slot.script_filename or slot.request_uri or pool.app, slot.method

    install(pool.name, pool.slowlog, pool.request_slowlog_trace_depth, describe_request,
            on_error=log.error)


def over_memory_message(peak: int, limit: int) -> str:
    """The line a worker leaves when pm.max_memory ends it; the master's exit line follows, at the
    same notice level as php-fpm's for a pm.max_requests recycling."""
    return (f"peak memory {peak / 1024 ** 2:.1f}M ({peak} bytes) is over pm.max_memory "
            f"{Size().format(limit)}: exiting to be replaced")


def max_requests(pool: Any) -> int:
    """pm.max_requests plus a random share of pm.max_requests_jitter, so workers started together
    do not all restart together (0: never)."""
    if not pool.pm_max_requests:
        return 0
    jitter = pool.pm_max_requests_jitter
    return pool.pm_max_requests + (random.randint(0, jitter) if jitter else 0)
