"""cffi build script for the master's view of the scoreboard (csrc/scoreboard.h).

The header is the one definition of the layout: the cdef is cut out of it (the section between its
"cffi cdef begin" and "cffi cdef end" markers, plus a prototype for each of its functions), never
written out again here. API mode, so the C compiler lays the structs out and cffi can never disagree
with the Cython writer about offsets: #define values and array lengths become "...", for the
compiler to fill in. setup.py runs this through `cffi_modules`; tests/test_scoreboard_layout.py
reads the same section to check fastfpm/_core.pxd and fastfpm/stages.py against it.
"""

import re
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent.parent / "csrc"
HEADER = CSRC / "scoreboard.h"
BEGIN = "/* ---- cffi cdef begin ---- */"
END = "/* ---- cffi cdef end ---- */"


def strip_comments(text: str) -> str:
    """C text without its /* */ and // comments."""
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def layout_section(header: str) -> str:
    """The declarations between the markers, comments removed."""
    start = header.index(BEGIN) + len(BEGIN)
    return strip_comments(header[start:header.index(END, start)])


def function_prototypes(header: str) -> list[str]:
    """`int f(int x);` for each `static inline int f(int x) {...}` of the header."""
    code = strip_comments(header)
    return [" ".join(m.group(1).split()) + ";"
            for m in re.finditer(r"static\s+inline\s+([^{};#]*?\))\s*\{", code)]


def cdef_from_header(header: str) -> str:
    """The cffi cdef for the header's text."""
    section = layout_section(header)
    section = re.sub(r"^(\s*#define\s+\w+)\s+.*$", r"\1 ...", section, flags=re.M)
    section = re.sub(r"\[[^\]]*\]", "[...]", section)
    return section + "\n" + "\n".join(function_prototypes(header)) + "\n"


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header(HEADER.read_text()))
ffibuilder.set_source(
    "fastfpm._scoreboard_cffi",
    '#include "scoreboard.h"',
    include_dirs=[str(CSRC)],
    depends=[str(HEADER)],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
