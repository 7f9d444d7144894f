"""Finding the WSGI application a pool serves: `MODULE:CALLABLE`, as gunicorn spells it.

The worker hooks (on_worker_start, on_worker_exit) are found the same way, by load_callable.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable

DEMO_APP = "fastfpm.demo:application"


class AppLoadError(Exception):
    """The application (or a hook) could not be imported; the message says what to fix."""


def load_app(spec: str, python_path: Iterable[str] = ()) -> Callable:
    """Import `module:callable` (`module` alone means `module:application`), with python_path first."""
    return load_callable(spec, python_path, what="app", default_attr="application")


def prepend_sys_path(python_path: Iterable[str]) -> None:
    """Put python_path's directories in front of sys.path, in their order (those already on it stay
    where they are)."""
    for directory in reversed(list(python_path)):
        if directory not in sys.path:
            sys.path.insert(0, directory)


def load_callable(spec: str, python_path: Iterable[str] = (), *, what: str = "app",
                  default_attr: str = "") -> Callable:
    """Import `module:callable` with python_path first; `what` names the directive in messages.

    An empty default_attr makes the `:callable` part required (a hook has no conventional name).
    """
    prepend_sys_path(python_path)
    module_name, _, attr = spec.partition(":")
    attr = attr or default_attr
    if not module_name or not attr:
        raise AppLoadError(f"{what} {spec!r}: expected MODULE:CALLABLE, for example myapp:application")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppLoadError(f"{what} {spec!r}: no module named {exc.name!r} "
                               f"(sys.path starts with {sys.path[:3]})") from exc
        raise
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        kind = "a WSGI callable" if what == "app" else "a callable"
        raise AppLoadError(f"{what} {spec!r}: {attr!r} is a {type(obj).__name__}, not {kind}")
    return obj
