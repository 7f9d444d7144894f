"""pytest plugin for .ci/asan-suite: the preloaded ASan runtime goes to Python processes only.

Every process a test starts inherits LD_PRELOAD, and some foreign programs do not survive gcc's
libasan preloaded into them: procps' ps, pgrep and top hang on a futex at start-up, and php-fpm
refuses its opcache (dlopen with RTLD_DEEPBIND). fastfpm's compiled code only ever runs in Python
processes, so the preload is kept for sys.executable and dropped for everything else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import Any

_PYTHON = os.path.realpath(sys.executable)


def _runs_python(args: Any, executable: Any, shell: bool) -> bool:
    """Whether this Popen call starts the interpreter the suite runs under (not through a shell)."""
    if shell:
        return False
    program = executable if executable is not None else (
        args if isinstance(args, (str, bytes, os.PathLike)) else args[0])
    found = shutil.which(os.fsdecode(program))
    return found is not None and os.path.realpath(found) == _PYTHON


class PythonOnlyPreload(subprocess.Popen):
    """subprocess.Popen that leaves LD_PRELOAD out of a foreign program's environment."""

    def __init__(self, args: Any, *rest: Any, **kwargs: Any) -> None:
        # env is Popen's tenth positional parameter; the suite always passes it by name.
        assert len(rest) < 9, "asan_python_only: pass env to Popen by keyword"
        if not _runs_python(args, kwargs.get("executable"), kwargs.get("shell", False)):
            env = dict(os.environ if kwargs.get("env") is None else kwargs["env"])
            env.pop("LD_PRELOAD", None)
            kwargs["env"] = env
        super().__init__(args, *rest, **kwargs)


subprocess.Popen = PythonOnlyPreload  # subprocess.run and check_output look Popen up here
