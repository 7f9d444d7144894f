"""fastfpm: a FastCGI process manager for Python WSGI applications, built the way php-fpm is."""

import os

__version__ = "0.1.0"


class NotBuiltError(ImportError):
    """A compiled part (the Cython loop, the cffi scoreboard) is missing from this copy of fastfpm."""


def not_built(exc: ModuleNotFoundError) -> NotBuiltError:
    """The error for a missing compiled module, saying why and what to run.

    The usual cause: `pip install .` put a built copy in site-packages, but `python -m fastfpm`
    run from the source checkout imports the unbuilt package in the current directory first.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    return NotBuiltError(
        f"fastfpm's compiled module {exc.name} is missing from {here}. If this is a source "
        f"checkout, build it in place with `pip install -e .` (or run from another directory, "
        f"where the installed copy is imported instead)."
    )
