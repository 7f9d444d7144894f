"""All the test applications behind one callable, picked by the first segment of PATH_INFO.

The environ is passed on untouched, so every application sees exactly what the server built.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from tests.apps import download, environ_echo, errors, headers, slow, upload, validated

ROUTES: dict[str, Callable[..., Iterable[bytes]]] = {
    "env": environ_echo.app,
    "upload": upload.app,
    "download": download.app,
    "raise-before": errors.raise_before,
    "raise-after": errors.raise_after,
    "raise-after-start": errors.raise_after_start,
    "bad-iterable": errors.bad_iterable,
    "headers": headers.headers_app,
    "status": headers.status_app,
    "write": headers.write_app,
    "slow": slow.app,
    "validate": validated.app,
}


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Dispatch on the first path segment; anything else goes to the environ echo."""
    segment = environ.get("PATH_INFO", "").lstrip("/").split("/", 1)[0]
    return ROUTES.get(segment, environ_echo.app)(environ, start_response)
