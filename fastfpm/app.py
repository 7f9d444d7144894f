"""Finding the WSGI application a pool serves: `MODULE:CALLABLE`, as gunicorn spells it."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable

DEMO_APP = "fastfpm.demo:application"


class AppLoadError(Exception):
    """The application could not be imported; the message says what to fix."""


def load_app(spec: str, python_path: Iterable[str] = ()) -> Callable:
    """Import `module:callable` (`module` alone means `module:application`), with python_path first."""
    for directory in reversed(list(python_path)):
        if directory not in sys.path:
            sys.path.insert(0, directory)
    module_name, _, attr = spec.partition(":")
    attr = attr or "application"
    if not module_name:
        raise AppLoadError(f"app {spec!r}: expected MODULE:CALLABLE, for example myapp:application")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppLoadError(f"app {spec!r}: no module named {exc.name!r} "
                               f"(sys.path starts with {sys.path[:3]})") from exc
        raise
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppLoadError(f"app {spec!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise AppLoadError(f"app {spec!r}: {attr!r} is a {type(obj).__name__}, not a WSGI callable")
    return obj
