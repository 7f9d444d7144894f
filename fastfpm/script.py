"""Script mode (`app = script:`): SCRIPT_FILENAME picks a .py file under script.root, whose
`application` serves the request, as php-fpm runs the .php file nginx names.

One ScriptDispatcher per worker is the Worker's app. Its cache maps each SCRIPT_FILENAME to the
script that serves it (with the path info cut off its end, php's cgi.fix_pathinfo) and each script
file to its imported `application`; both are looked at again at most every script.revalidate_freq
seconds (opcache.revalidate_freq), so the hit path is two dict lookups and a clock read. The
security rules (security.limit_extensions, no path out of the root) are checked whenever a path is
resolved; docs/operations.md ("Script mode") says what each refusal answers.
"""

from __future__ import annotations

import itertools
import os
import stat
import sys
import time
import types
from collections.abc import Callable, Iterable
from typing import Any

from fastfpm.app import prepend_sys_path

# The `app` value that turns script mode on.
SCRIPT_APP = "script:"

# Most SCRIPT_FILENAMEs remembered: each distinct path info is one entry, so a client sending
# random paths could grow the map; past this many it starts again empty.
MAX_ROUTES = 4096

NOT_FOUND = (b"404 Not Found", b"File not found.\n")      # php-fpm's body for "Primary script unknown"
DENIED = (b"403 Forbidden", b"Access denied.\n")           # php-fpm's, for security.limit_extensions
FAILED = (b"500 Internal Server Error", b"Internal Server Error\n")

_module_numbers = itertools.count(1)


def parse_extensions(text: str) -> tuple[str, ...]:
    """security.limit_extensions as php-fpm reads it: a space-separated list; each must start with
    '.' (fastfpm's check: php-fpm matches any suffix, so `py` would also allow `happy`)."""
    extensions = tuple(text.split())
    for extension in extensions:
        if not extension.startswith(".") or len(extension) < 2 or "/" in extension or "\0" in extension:
            raise ValueError(f"{extension!r} is not an extension: write each as .py, separated by spaces")
    return extensions


class Refused(Exception):
    """A request path that no script answers: the status line and body to send, and why (logged
    when the reason is worth an operator's attention)."""

    def __init__(self, answer: tuple[bytes, bytes], level: str = "", message: str = "") -> None:
        super().__init__(message)
        self.answer = answer
        self.level = level
        self.message = message


class Script:
    """One script file: its signature when imported (real path, inode, mtime_ns, size), its module
    and `application`, and when it must be looked at again."""

    __slots__ = ("path", "signature", "module", "app", "expires")

    def __init__(self, path: str) -> None:
        self.path = path
        self.signature: tuple[Any, ...] | None = None
        self.module: types.ModuleType | None = None
        self.app: Callable[..., Any] | None = None
        self.expires = 0.0


class Route:
    """What one SCRIPT_FILENAME resolved to: the script, the path info cut off its end, and until
    when that holds (never past the script's own revalidation time)."""

    __slots__ = ("script", "tail", "filename", "expires")

    def __init__(self, script: Script, tail: str, expires: float) -> None:
        self.script = script
        self.tail = tail
        self.filename = os.fsencode(script.path).decode("latin-1")  # as the environ holds it
        self.expires = expires


class ScriptDispatcher:
    """The WSGI app of a script-mode pool: the per-worker code cache and the security checks."""

    def __init__(self, root: str, revalidate_freq: float, extensions: Iterable[str],
                 log: Callable[[str, str], None], log_exception: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = os.path.normpath(root)
        self.freq = revalidate_freq
        self.extensions = tuple(extensions)
        self.log = log
        self.log_exception = log_exception
        self.clock = clock
        self.routes: dict[str, Route] = {}
        self.scripts: dict[str, Script] = {}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        """Serve one request: the cached route when still fresh (the hit path), else resolve."""
        name = environ.get("SCRIPT_FILENAME")
        route = self.routes.get(name)  # type: ignore[arg-type]
        if route is None or route.expires <= self.clock():
            try:
                route = self.resolve(name)
            except Refused as refused:
                if refused.level:
                    self.log(refused.level, refused.message)
                return answer(start_response, refused.answer)
        tail = route.tail
        if tail:
            # The script's file for SCRIPT_FILENAME (php-fpm does the same, keeping the sent one as
            # ORIG_SCRIPT_FILENAME); the path info cut off it leaves SCRIPT_NAME for PATH_INFO when
            # the web server sent the whole path as SCRIPT_NAME (nginx without
            # fastcgi_split_path_info: php-fpm leaves PATH_INFO empty then, PEP 3333 wants it).
            environ["ORIG_SCRIPT_FILENAME"] = name
            environ["SCRIPT_FILENAME"] = route.filename
            if not environ.get("PATH_INFO"):
                script_name = environ.get("SCRIPT_NAME", "")
                if script_name.endswith(tail):
                    environ["SCRIPT_NAME"] = script_name[:-len(tail)]
                environ["PATH_INFO"] = tail
        return route.script.app(environ, start_response)  # type: ignore[misc]

    # ------------------------------------------------------------------ the slow path

    def resolve(self, name: Any) -> Route:
        """Find, check and (re)load the script SCRIPT_FILENAME names; remember the answer."""
        if not isinstance(name, str) or not name:
            raise Refused(NOT_FOUND, "warning", "script mode: the request has no SCRIPT_FILENAME "
                                                "(the web server must send it; see docs/operations.md)")
        self.routes.pop(name, None)
        path, tail = self.find_file(name)
        now = self.clock()
        script = self.scripts.get(path)
        if script is None:
            script = self.scripts[path] = Script(path)
        if script.expires <= now:
            self.refresh(script, now)
        if len(self.routes) >= MAX_ROUTES:
            self.routes.clear()
        route = self.routes[name] = Route(script, tail, min(now + self.freq, script.expires))
        return route

    def find_file(self, name: str) -> tuple[str, str]:
        """SCRIPT_FILENAME to (the script file's path, the path info after it); Refused otherwise.

        php-fpm's cgi.fix_pathinfo: when the name is not a file, components are cut off its end
        until one is (/srv/www/app.py/users/7 runs app.py with PATH_INFO /users/7).
        """
        if "\0" in name:
            raise Refused(NOT_FOUND, "warning", f"script mode: refused SCRIPT_FILENAME {name!r}: "
                                                "it holds a NUL byte")
        # The environ's str holds the bytes as latin-1 (PEP 3333); the file system's are UTF-8.
        path = os.path.normpath(os.fsdecode(name.encode("latin-1")))
        if not path.startswith(self.root + "/"):
            raise Refused(NOT_FOUND, "warning", f"script mode: refused SCRIPT_FILENAME {name!r}: "
                                                f"it is not under script.root {self.root}")
        tail = ""
        candidate = path
        while True:
            try:
                mode: int | None = os.stat(candidate).st_mode
            except (FileNotFoundError, NotADirectoryError):
                mode = None
            except OSError as exc:
                raise Refused(NOT_FOUND, "warning", f"script mode: cannot stat {candidate}: {exc}") from None
            if mode is not None:
                if stat.S_ISREG(mode):
                    break
                raise Refused(NOT_FOUND)  # a directory (or a device, a socket ...) is no script
            head, cut = candidate.rsplit("/", 1)
            if len(head) <= len(self.root):
                raise Refused(NOT_FOUND)
            candidate, tail = head, "/" + cut + tail
        if tail and name.endswith("/"):
            tail += "/"  # normpath dropped it; the path info keeps what the client sent
        self.check_allowed(candidate)
        return candidate, os.fsencode(tail).decode("latin-1")

    def check_allowed(self, path: str) -> None:
        """security.limit_extensions on the name and on the file it resolves to, and the file must
        be inside script.root once symlinks are followed (the root's own, too, as deployed now)."""
        real = os.path.realpath(path)
        real_root = os.path.realpath(self.root)
        if not real.startswith(real_root.rstrip("/") + "/"):
            raise Refused(NOT_FOUND, "warning", f"script mode: refused {path}: it resolves to {real}, "
                                                f"outside script.root {self.root} ({real_root})")
        if self.extensions:
            for checked in (path, real):
                if not checked.endswith(self.extensions):
                    # php-fpm's line, at its level (fpm_php_limit_extensions)
                    raise Refused(DENIED, "notice", f"Access to the script '{checked}' has been denied "
                                                    f"(see security.limit_extensions)")

    def refresh(self, script: Script, now: float) -> None:
        """Import the script again if its file changed since it was imported (or never was)."""
        real = os.path.realpath(script.path)
        try:
            with open(real, "rb") as f:
                info = os.fstat(f.fileno())
                signature = (real, info.st_ino, info.st_mtime_ns, info.st_size)
                if signature != script.signature or script.app is None:
                    self.load(script, signature, f.read())
        except FileNotFoundError:
            self.forget(script)
            raise Refused(NOT_FOUND) from None
        except OSError as exc:
            self.forget(script)
            raise Refused(FAILED, "error", f"script mode: cannot read {script.path}: {exc}") from None
        script.expires = now + self.freq

    def load(self, script: Script, signature: tuple[Any, ...], source: bytes) -> None:
        """Compile and run the file as a module of its own; keep its `application`.

        A file that fails to import is a 500 with its traceback in the log, and the version
        imported before is dropped, not served on: the file on disk is what runs (as opcache
        recompiles a changed file). It is tried again on the next request.
        """
        self.forget(script)
        name = f"_fastfpm_script_{next(_module_numbers)}"  # unique: never shadows a real module
        module = types.ModuleType(name)
        module.__file__ = script.path
        sys.modules[name] = module  # for dataclasses, pickle, inspect; removed when replaced
        try:
            exec(compile(source, script.path, "exec", dont_inherit=True), module.__dict__)
        except BaseException:
            del sys.modules[name]
            self.log_exception(f"script mode: importing {script.path} failed")
            raise Refused(FAILED) from None
        app = module.__dict__.get("application")
        if not callable(app):
            del sys.modules[name]
            what = "has no 'application'" if app is None else f"has an 'application' that is a " \
                                                                 f"{type(app).__name__}, not a WSGI callable"
            raise Refused(FAILED, "error", f"script mode: {script.path} {what}")
        script.signature, script.module, script.app = signature, module, app

    def forget(self, script: Script) -> None:
        """Drop a script's imported version (its module leaves sys.modules)."""
        if script.module is not None:
            sys.modules.pop(script.module.__name__, None)
        script.signature = script.module = script.app = None
        script.expires = 0.0


def answer(start_response: Callable[..., Any], response: tuple[bytes, bytes]) -> list[bytes]:
    """A short plain-text answer (404, 403, 500) of script mode's own."""
    status, body = response
    start_response(status.decode(), [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def for_pool(pool: Any, log: Any, python_path: Iterable[str] = ()) -> ScriptDispatcher:
    """A script-mode pool's dispatcher, in a worker; python_path goes in front of sys.path, as
    for a MODULE:CALLABLE app, so that scripts import the pool's packages."""
    prepend_sys_path(python_path)
    return ScriptDispatcher(pool.script_root, pool.script_revalidate_freq,
                            parse_extensions(pool.security_limit_extensions or ""), log.log, log.exception)
