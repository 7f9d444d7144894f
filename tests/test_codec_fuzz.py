"""The C codec on its own, compiled with AddressSanitizer and UBSan and fed pseudo-random input.

csrc/fuzz/fuzz_fcgi.c is also a libFuzzer target; here it runs as a standalone driver so the test
needs only the C compiler the build already needs.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def test_codec_survives_random_and_mutated_input_under_sanitizers(tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("no C compiler: building fastfpm needs one, so this machine could not have built it")
    binary = tmp_path / "fuzz_fcgi"
    subprocess.run([compiler, "-g", "-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-DFUZZ_STANDALONE", f"-I{CSRC}", str(CSRC / "fuzz" / "fuzz_fcgi.c"),
                    str(CSRC / "fcgi.c"), "-o", str(binary)], check=True, capture_output=True)
    result = subprocess.run([str(binary), "200000"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok 200000"
