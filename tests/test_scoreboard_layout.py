"""csrc/scoreboard.h is the one definition of the scoreboard; everything that cannot derive from it
is held to it here.

The cffi cdef is cut out of the header at build time (fastfpm/_scoreboard_build.py). Cython cannot
read a header, so fastfpm/_core.pxd declares the constants and structs by hand, and fastfpm/stages.py
names the stages for the modules that must not need the compiled parts (fastfpm.pm): both are parsed
and compared with the header's layout section, field by field, and the checks themselves are shown to
fail on copies with one thing changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fastfpm import pm, stages
from fastfpm._scoreboard_build import cdef_from_header, function_prototypes, layout_section

ROOT = Path(__file__).resolve().parent.parent
HEADER = ROOT / "csrc" / "scoreboard.h"
PXD = ROOT / "fastfpm" / "_core.pxd"

# Spellings of _core.pxd for the header's types (the C compiler sees the header's own): int for
# int32_t in a struct, bint for an int a function returns as a truth value.
FIELD_ALIASES = {"int": "int32_t"}
RETURN_ALIASES = {"bint": "int"}


@dataclass
class Layout:
    """Constants, structs (fields as (type, name, array length or None)) and function signatures."""

    constants: dict[str, int | None] = field(default_factory=dict)  # None: the value is not declared
    stages: dict[str, int] = field(default_factory=dict)
    structs: dict[str, list[tuple[str, str, int | None]]] = field(default_factory=dict)
    functions: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)


def _value(expr: str, constants: dict[str, int | None]) -> int:
    """An integer constant expression of the header (names of earlier #defines allowed)."""
    expr = re.sub(r"\b(0x[0-9a-fA-F]+|\d+)[uUlL]*\b", r"\1", expr.strip())
    names = {k: v for k, v in constants.items() if v is not None}
    return int(eval(expr, {"__builtins__": {}}, names))  # noqa: S307 - our own header's arithmetic


def _type(text: str) -> str:
    """A C type with its spacing normalised: `const char *`, `uint64_t`."""
    return " ".join(text.replace("*", " * ").split()).replace("* *", "**")


def _declarator(text: str, constants: dict[str, int | None],
                aliases: dict[str, str] | None = None) -> tuple[str, str, int | None]:
    """`char method[FFPM_METHOD_LEN]` -> ("char", "method", 16)."""
    m = re.fullmatch(r"(.*?)(\w+)\s*(?:\[([^\]]*)\])?", text.strip())
    assert m, text
    size = _value(m.group(3), constants) if m.group(3) is not None else None
    ctype = _type(m.group(1))
    return (aliases or {}).get(ctype, ctype), m.group(2), size


def _signature(text: str, aliases: dict[str, str] | None = None) -> tuple[str, tuple[str, ...]]:
    """`int f(const T *h, int64_t x)` -> ("f", ("int", "const T *", "int64_t"))."""
    m = re.fullmatch(r"(.*?)(\w+)\s*\((.*)\)\s*;?", " ".join(text.split()))
    assert m, text
    params = tuple(_type(re.sub(r"\w+$", "", p.strip())) for p in m.group(3).split(",") if p.strip())
    returns = _type(m.group(1))
    return m.group(2), ((aliases or {}).get(returns, returns),) + params


def parse_header(text: str) -> Layout:
    """The layout section of scoreboard.h (and its function prototypes)."""
    layout = Layout()
    section = layout_section(text)
    declaration = (r"#define[ \t]+(\w+)[ \t]+([^\n]+)"
                   r"|enum\s*\{(.*?)\}\s*;"
                   r"|typedef\s+struct\s*\{(.*?)\}\s*(\w+)\s*;")
    for m in re.finditer(declaration, section, flags=re.S):
        if m.group(1):
            layout.constants[m.group(1)] = _value(m.group(2), layout.constants)
        elif m.group(3) is not None:
            for member in filter(None, (part.strip() for part in m.group(3).split(","))):
                name, value = (p.strip() for p in member.split("="))
                layout.constants[name] = layout.stages[name] = _value(value, layout.constants)
        else:
            layout.structs[m.group(5)] = [_declarator(f, layout.constants)
                                          for f in m.group(4).split(";") if f.strip()]
    for prototype in function_prototypes(text):
        name, sig = _signature(prototype)
        layout.functions[name] = sig
    return layout


def extern_block(pxd: str) -> list[str]:
    """The lines of _core.pxd's `cdef extern from "scoreboard.h"` block, comments removed."""
    lines = pxd.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('cdef extern from "scoreboard.h"'))
    block = []
    for line in lines[start + 1:]:
        if line and not line[0].isspace():
            break
        line = line.split("#", 1)[0].rstrip()
        if line.strip():
            block.append(line)
    return block


def parse_pxd(text: str, header: Layout) -> Layout:
    """What _core.pxd declares of the header; array lengths by name are resolved with the header's."""
    layout = Layout()
    current: list | None = None
    in_enum = False
    for line in extern_block(text):
        indent = len(line) - len(line.lstrip())
        line = line.strip()
        if indent == 4:
            current, in_enum = None, False
            if line == "enum:":
                in_enum = True
            elif m := re.fullmatch(r"ctypedef struct (\w+):", line):
                current = layout.structs.setdefault(m.group(1), [])
            else:
                name, sig = _signature(line, RETURN_ALIASES)
                layout.functions[name] = sig
        elif in_enum:
            layout.constants[line] = None
            if line.startswith("FFPM_STAGE_"):
                layout.stages[line] = header.stages.get(line, -1)
        elif current is not None:
            current.append(_declarator(line, header.constants, FIELD_ALIASES))
    return layout


def differences(header_text: str, pxd_text: str, table=stages.STAGE_TABLE) -> list[str]:
    """Everything in which _core.pxd's block or the stage table disagree with the header."""
    header = parse_header(header_text)
    pxd = parse_pxd(pxd_text, header)
    found = []
    for name in sorted(header.constants.keys() - pxd.constants.keys()):
        found.append(f"constant {name} is not declared in _core.pxd")
    for name in sorted(pxd.constants.keys() - header.constants.keys()):
        found.append(f"constant {name} of _core.pxd is not in scoreboard.h")
    for struct in sorted(header.structs.keys() | pxd.structs.keys()):
        ours, theirs = header.structs.get(struct), pxd.structs.get(struct)
        if ours is None or theirs is None:
            found.append(f"struct {struct} is only in {'_core.pxd' if ours is None else 'scoreboard.h'}")
        elif ours != theirs:
            for i in range(max(len(ours), len(theirs))):
                a = ours[i] if i < len(ours) else None
                b = theirs[i] if i < len(theirs) else None
                if a != b:
                    found.append(f"{struct} field {i}: scoreboard.h has {a}, _core.pxd has {b}")
                    break
    for name, sig in sorted(pxd.functions.items()):
        if name not in header.functions:
            found.append(f"function {name} of _core.pxd is not in scoreboard.h")
        elif header.functions[name] != sig:
            found.append(f"function {name}: scoreboard.h has {header.functions[name]}, _core.pxd has {sig}")
    table_stages = {stage.constant: stage.number for stage in table}
    if table_stages != header.stages:
        found.append(f"fastfpm/stages.py has {table_stages}, scoreboard.h has {header.stages}")
    return found


def test_core_pxd_and_the_stage_table_match_the_header() -> None:
    assert differences(HEADER.read_text(), PXD.read_text()) == []


def test_the_header_is_parsed_whole() -> None:
    # A parser that found nothing would agree with anything: hold it to what the header surely has.
    header = parse_header(HEADER.read_text())
    assert {"ffpm_slot", "ffpm_pool_header"} <= header.structs.keys()
    fields = {name: (ctype, size) for ctype, name, size in header.structs["ffpm_pool_header"]}
    assert fields["pool_name"] == ("char", header.constants["FFPM_POOL_NAME_LEN"])
    assert fields["max_children_reached"] == ("uint64_t", None)
    assert ("char", "method", 16) in header.structs["ffpm_slot"]
    buckets = header.constants["FFPM_DURATION_BUCKETS"]
    assert ("uint64_t", "duration_buckets", buckets) in header.structs["ffpm_slot"]
    assert ("uint64_t", "duration_buckets_retired", buckets) in header.structs["ffpm_pool_header"]
    assert ("int64_t", "last_request_utime_us", None) in header.structs["ffpm_slot"]
    assert fields["idle_workers"] == ("int32_t", None) and fields["wake_fd"] == ("int32_t", None)
    assert fields["reserved"] == ("uint8_t", header.constants["FFPM_POOL_HEADER_SIZE"] - 288)
    assert header.functions["ffpm_cpu_hundredths"] == ("int64_t", "int64_t", "int64_t")
    assert header.stages["FFPM_STAGE_RUNNING"] == 5 and len(header.stages) == len(stages.STAGE_TABLE)
    assert header.functions["ffpm_accept_lock"] == ("int", "ffpm_pool_header *", "int64_t", "int64_t")
    assert header.constants["FFPM_SB_MAGIC"] == 0x4D504646


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(("where", "old", "new", "expected"), [
    ("pxd", "        uint64_t accepted_conn\n", "", "ffpm_slot field 5"),
    ("pxd", "        uint64_t slow_requests\n", "        int64_t slow_requests\n",
     "ffpm_pool_header field 11"),
    ("pxd", "        FFPM_STAGE_ENDING\n", "", "constant FFPM_STAGE_ENDING is not declared"),
    ("pxd", "        uint8_t reserved[224]\n", "        uint8_t reserved[216]\n",
     "ffpm_pool_header field 22"),
    # the new fields of issue 10: a slot's CPU/memory figures and histogram, the retired histogram
    ("pxd", "        int64_t last_request_stime_us\n", "        uint64_t last_request_stime_us\n",
     "ffpm_slot field 19"),
    ("pxd", "        uint64_t duration_buckets[FFPM_DURATION_BUCKETS]\n        char remote_user",
     "        uint64_t duration_buckets[11]\n        char remote_user", "ffpm_slot field 22"),
    ("pxd", "        char remote_user[FFPM_USER_LEN]\n", "        char remote_user[FFPM_URI_LEN]\n",
     "ffpm_slot field 23"),
    ("header", "    uint64_t duration_sum_ns_retired;", "", "ffpm_pool_header field 16"),
    ("header", "    uint64_t requests;\n    uint64_t duration_sum_ns;", "    uint64_t requests;",
     "ffpm_totals field 2"),
    ("header", "#define FFPM_DURATION_BUCKETS 12", "#define FFPM_DURATION_BUCKETS 12\n#define FFPM_X 1",
     "constant FFPM_X is not declared"),
    ("pxd", "    int64_t ffpm_cpu_hundredths(int64_t cpu_us, int64_t duration_ns)\n",
     "    int64_t ffpm_cpu_hundredths(int64_t cpu_us, int duration_ns)\n", "function ffpm_cpu_hundredths"),
    ("pxd", "    void ffpm_accept_unlock(ffpm_pool_header *h)\n",
     "    void ffpm_accept_unlock(ffpm_slot *h)\n", "function ffpm_accept_unlock"),
    ("header", "    uint64_t requests_retired;", "    uint64_t requests_retired;\n    uint64_t extra;",
     "ffpm_pool_header field 14"),
    ("pxd", "        char method[FFPM_METHOD_LEN]\n", "        char method[32]\n", "ffpm_slot field 14"),
    ("header", "    int32_t pid; ", "    int64_t pid; ", "ffpm_slot field 2"),
    ("header", "    FFPM_STAGE_ENDING = 7", "    FFPM_STAGE_ENDING = 7,\n    FFPM_STAGE_PAUSED = 8",
     "fastfpm/stages.py has"),
    ("table", None, None, "fastfpm/stages.py has"),
])
def test_a_difference_is_caught(where: str, old: str | None, new: str | None, expected: str) -> None:
    header, pxd, table = HEADER.read_text(), PXD.read_text(), stages.STAGE_TABLE
    if where == "pxd":
        pxd = _replace(pxd, old, new)
    elif where == "header":
        header = _replace(header, old, new)
    else:  # two stages swapped in the table
        table = tuple(s._replace(number={4: 5, 5: 4}.get(s.number, s.number)) for s in table)
    found = differences(header, pxd, table)
    assert any(expected in line for line in found), found


def test_pm_takes_its_stages_from_the_table() -> None:
    assert pm.STAGES == tuple(stage.pm_name for stage in stages.STAGE_TABLE)
    assert pm.BUSY_STAGES - {"busy"} == {stage.pm_name for stage in stages.STAGE_TABLE if stage.busy}
    assert pm.IDLE == stages.BY_CONSTANT["FFPM_STAGE_IDLE"].pm_name


def test_the_built_cffi_module_is_the_header_of_this_tree() -> None:
    # A stale build (the header changed, build_ext not run again) fails here, not in a worker.
    cffi_module = pytest.importorskip("fastfpm._scoreboard_cffi")
    ffi, lib = cffi_module.ffi, cffi_module.lib
    header = parse_header(HEADER.read_text())
    for name, value in header.constants.items():
        assert getattr(lib, name) == value, name
    for struct, fields in header.structs.items():
        assert [name for name, _ in ffi.typeof(struct).fields] == [name for _, name, _ in fields], struct
    assert ffi.sizeof("ffpm_pool_header") == lib.FFPM_POOL_HEADER_SIZE == 512
    assert ffi.sizeof("ffpm_slot") % 8 == 0  # every slot's 64-bit counters stay aligned
    for name in header.functions:
        assert hasattr(lib, name), name
    from fastfpm import scoreboard

    assert scoreboard.STAGE_NAMES == {s.number: s.status_name for s in stages.STAGE_TABLE}
    assert scoreboard.BUSY_STAGES == stages.BUSY_NUMBERS


def test_the_cdef_lists_no_field_of_its_own() -> None:
    # Everything the cdef declares comes out of the header's marked section: a field added there
    # reaches the master without touching the build script.
    header = HEADER.read_text()
    changed = _replace(header, "    uint64_t requests_retired;",
                       "    uint64_t requests_retired;\n    uint64_t extra;")
    assert "uint64_t extra;" in cdef_from_header(changed)
    assert "uint64_t extra" not in cdef_from_header(header)
    source = (ROOT / "fastfpm" / "_scoreboard_build.py").read_text()
    assert "accepted_conn" not in source and "FFPM_STAGE" not in source
