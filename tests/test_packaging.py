"""The source distribution holds everything the build needs (pip builds through it, so does PyPI)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_sdist_carries_the_cython_sources_and_c_headers(tmp_path: Path) -> None:
    # Without MANIFEST.in, setuptools left out _core.pyx, _core.pxd and the headers, and an
    # install from the sdist failed ("'fastfpm/_core.pyx' doesn't match any files").
    # From a copy without build leftovers: an existing *.egg-info/SOURCES.txt (pip install -e
    # writes one) would fill in whatever MANIFEST.in forgets.
    tree = tmp_path / "tree"
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(
        "*.egg-info", "build", "dist", ".git", ".venv*", "__pycache__", "*.so", "_core.c",
        "_scoreboard_cffi.c", ".pytest_cache", ".ruff_cache", ".benchmarks", "results"))
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=tree,
                            capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        pytest.fail(f"sdist failed:\n{result.stderr[-2000:]}")
    (archive,) = tmp_path.glob("fastfpm-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {"setup.py", "pyproject.toml", "fastfpm/_core.pyx", "fastfpm/_core.pxd",
              "fastfpm/_scoreboard_build.py", "csrc/fcgi.c", "csrc/fcgi.h", "csrc/scoreboard.h"}
    assert needed <= names, f"missing from the sdist: {sorted(needed - names)}"
    # Every header the C sources include is there too.
    for source in (REPO / "csrc").glob("*.[ch]"):
        for line in source.read_text().splitlines():
            if line.startswith('#include "'):
                header = line.split('"')[1]
                assert f"csrc/{header}" in names, (source.name, line)
