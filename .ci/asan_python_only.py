"""pytest plugin for .ci/asan-suite: the preloaded ASan runtime goes to Python processes only.

Every process a test starts inherits LD_PRELOAD, and some foreign programs do not survive gcc's
libasan preloaded into them: procps' ps, pgrep and top hang on a futex at start-up, and php-fpm
refuses its opcache (dlopen with RTLD_DEEPBIND). fastfpm's compiled code only ever runs in Python
processes, so the preload is kept for commands that run sys.executable and dropped for the rest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

_PYTHONS = {sys.executable, os.path.realpath(sys.executable)}


def _runs_python(args: Any, executable: Any) -> bool:
    """Whether this Popen call starts the suite's interpreter: directly, or through a launcher that
    execs it (`env -C DIR python ...`, `sh -c "... exec python ..."`), as some tests do."""
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    words = [os.fsdecode(word) for word in (executable, *argv) if word is not None]
    found = shutil.which(words[0]) if words else None
    if found is not None and os.path.realpath(found) in _PYTHONS:
        return True
    return any(python in word for word in words for python in _PYTHONS)


class PythonOnlyPreload(subprocess.Popen):
    """subprocess.Popen that leaves LD_PRELOAD out of a foreign program's environment."""

    def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
        # env is Popen's tenth positional parameter; the suite always passes it by name.
        assert len(rest) < 9, "asan_python_only: pass env to Popen by keyword"
        if not _runs_python(args, kwargs.get("executable")):
            env = dict(os.environ if kwargs.get("env") is None else kwargs["env"])
            env.pop("LD_PRELOAD", None)
            kwargs["env"] = env
        super().__init__(args, *rest, **kwargs)


subprocess.Popen = PythonOnlyPreload  # subprocess.run and check_output look Popen up here
