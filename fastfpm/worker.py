"""A worker process's life after fork: signals, the application, then the Cython request loop.

Everything here runs once per worker; the per-request path is fastfpm._core.Worker.serve().
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, NoReturn

from fastfpm import __version__
from fastfpm._core import FileWrapper, Worker
from fastfpm.app import AppLoadError, load_app
from fastfpm.log import ErrorLog

# Exit status of a worker whose application failed to import: the master stops rather than
# respawning it in a loop (gunicorn does the same with its WORKER_BOOT_ERROR).
EXIT_BOOT_ERROR = 3


def environ_template(pool: Any) -> dict[str, Any]:
    """The environ entries every request starts from, copied once per request.

    The CGI defaults cover servers that leave out variables PEP 3333 requires; the params a
    request carries overwrite them.
    """
    return {
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
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


def run_worker(pool: Any, listen_fd: int, scoreboard: Any, slot_index: int, log: ErrorLog,
               close_fds: tuple[int, ...] = ()) -> NoReturn:
    """Serve pool's application on listen_fd until told to stop, then exit the process."""
    worker: Worker | None = None

    def graceful_stop(signum: int, frame: Any) -> None:
        if worker is not None:
            worker.stopping = True
        else:
            os._exit(0)  # still importing the application: nothing in flight to finish

    reset_signals(graceful_stop)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    log.for_worker(pool.name)
    if log.path is not None:
        os.dup2(log.fileno(), 2)  # tracebacks and wsgi.errors go to the error log
    status = 1
    try:
        if pool.chdir:
            os.chdir(pool.chdir)
        # The working directory is importable, as with gunicorn and `python -m`.
        python_path = [*pool.python_path, os.getcwd()]
        try:
            app = load_app(pool.app, python_path)
        except AppLoadError as exc:
            log.error(str(exc))
            os._exit(EXIT_BOOT_ERROR)
        except BaseException:
            log.exception(f"importing the application {pool.app!r} failed")
            os._exit(EXIT_BOOT_ERROR)
        # Non-blocking, so the loop can wait on it and its kept-alive connections in one poll().
        os.set_blocking(listen_fd, False)
        worker = Worker(
            listen_fd, app, environ_template=environ_template(pool), log=log.log,
            log_exception=log.exception, scoreboard=scoreboard, slot_index=slot_index,
            idle_timeout=pool.idle_timeout, read_timeout=pool.read_timeout,
            max_params_size=pool.max_params_size, mount=pool.mount or "",
            max_conns=pool.pm_max_children, max_requests=pool.pm_max_requests,
        )
        worker.serve()
        worker.mark_ending()
        status = 0
    except BaseException:
        log.exception("the worker failed")
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)
