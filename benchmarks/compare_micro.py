#!/usr/bin/env python3
"""Run the micro-benchmarks (benchmarks/micro, pytest-benchmark) in a baseline checkout and in this one,
alternately, and print the median of each benchmark in both and their ratio.

    python benchmarks/compare_micro.py --baseline /path/to/baseline
    python benchmarks/compare_micro.py --baseline /path/to/baseline --rounds 4 -- -k "not request"
    python benchmarks/compare_micro.py --baseline . --rounds 2      # A/A: this tree against itself (noise)

Each tree runs its own benchmarks/micro with its own fastfpm build (built in place there: `python setup.py
build_ext --inplace`): pytest starts with that tree as working directory and first on PYTHONPATH, and a
small plugin records the fastfpm each run really imported, which must be that tree's. Benchmarks are
matched by their pytest name; one that exists in one tree only is listed as such. Rounds alternate the
order (baseline first, then this tree first, ...), so a machine that drifts favours neither; the ratio is
the median over rounds of this tree's median / the baseline's median in the same round, with the range
over rounds next to it. Arguments after `--` go to both pytest runs (for example `-k`, or
`--benchmark-max-time=0.1` for a quick look). The pytest-benchmark JSON files are kept with --out DIR;
`pytest-benchmark compare DIR/*.json` reads them too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # run as a script: benchmarks/ is on sys.path, the repository is not
    sys.path.insert(0, str(REPO))

from benchmarks.run import git_commit, stale_build  # noqa: E402 - the same checks as run.py's

# Loaded into both pytest runs (from a temp dir on PYTHONPATH: the baseline need not have it): puts the
# fastfpm that the run imported into the JSON's machine_info.
PLUGIN = '''
import os


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import fastfpm
        import fastfpm._core as core
    except ImportError as exc:
        machine_info["fastfpm_import_error"] = str(exc)
        return
    machine_info["fastfpm_package"] = os.path.realpath(os.path.dirname(fastfpm.__file__))
    machine_info["fastfpm_core"] = os.path.realpath(core.__file__)
'''
PLUGIN_NAME = "_fastfpm_micro_origin"


def log(message: str = "") -> None:
    """Progress on stderr, at once."""
    print(message, file=sys.stderr, flush=True)


def run_pytest(tree: Path, json_path: Path, plugin_dir: Path, extra: list[str]) -> float:
    """benchmarks/micro of tree, with tree's fastfpm; returns the seconds it took."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(plugin_dir)])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks/micro",
        "-q",
        "-p",
        "no:cacheprovider",
        "-p",
        PLUGIN_NAME,
        "--benchmark-enable",
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        *extra,
    ]
    start = time.monotonic()
    result = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    took = time.monotonic() - start
    if result.returncode != 0 or not json_path.exists():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-25:])
        raise SystemExit(f"error: pytest failed in {tree} (exit {result.returncode}):\n{tail}")
    return took


def load(json_path: Path, tree: Path) -> dict[str, dict]:
    """The benchmarks of one run by name, after checking the run imported tree's fastfpm."""
    data = json.loads(json_path.read_text())
    info = data.get("machine_info", {})
    want = os.path.realpath(tree / "fastfpm")
    core = info.get("fastfpm_core", "")
    if "fastfpm_import_error" in info:
        raise SystemExit(
            f"error: the run in {tree} could not import fastfpm ({info['fastfpm_import_error']}); "
            f"build it: cd {tree} && python setup.py build_ext --inplace -q"
        )
    if info.get("fastfpm_package") != want or not core.startswith(want + os.sep):
        raise SystemExit(
            f"error: the run in {tree} imported fastfpm from {info.get('fastfpm_package')} ({core}), "
            f"not from {want}"
        )
    found = {}
    for bench in data["benchmarks"]:
        name = bench["fullname"].removeprefix("benchmarks/micro/")
        found[name] = {"median": bench["stats"]["median"], "iqr": bench["stats"]["iqr"]}
    return found


def fmt_time(seconds: float) -> str:
    """Seconds as ns, µs or ms with three significant digits."""
    for unit, scale in (("ns", 1e9), ("µs", 1e6), ("ms", 1e3)):
        value = seconds * scale
        if value < 1000 or unit == "ms":
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{seconds:.3g} s"


def main(argv: list[str] | None = None) -> int:
    """Run both trees' micro-benchmarks alternately and print the comparison."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(
        prog="python benchmarks/compare_micro.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after -- go to pytest in both trees.",
    )
    p.add_argument(
        "--baseline", type=Path, required=True, metavar="PATH", help="the checkout to compare with"
    )
    p.add_argument(
        "--current", type=Path, default=REPO, metavar="PATH", help=f"the checkout under test (default {REPO})"
    )
    p.add_argument("--rounds", type=int, default=2, help="runs per tree, alternating the order (default 2)")
    p.add_argument("--out", type=Path, default=None, help="keep the pytest-benchmark JSON files in DIR")
    a = p.parse_args(argv)
    trees = {"baseline": a.baseline.expanduser().resolve(), "current": a.current.expanduser().resolve()}
    for role, tree in trees.items():
        if not (tree / "benchmarks" / "micro").is_dir() or not (tree / "fastfpm").is_dir():
            p.error(f"{role} {tree}: not a fastfpm checkout with benchmarks/micro")
        stale = stale_build(tree)
        if stale:
            log(f"warning: the build in {tree} looks stale: {stale}")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="fastfpm-micro-"))
    out = a.out or work
    out.mkdir(parents=True, exist_ok=True)
    (work / f"{PLUGIN_NAME}.py").write_text(PLUGIN)
    labels = {role: f"{role} {git_commit(tree)} ({tree})" for role, tree in trees.items()}
    runs: dict[str, list[dict[str, dict]]] = {"baseline": [], "current": []}
    try:
        for rnd in range(a.rounds):
            order = ["baseline", "current"] if rnd % 2 == 0 else ["current", "baseline"]
            for role in order:
                json_path = out / f"micro-{role}-{rnd + 1}.json"
                log(f"round {rnd + 1}/{a.rounds}: {labels[role]} ...")
                took = run_pytest(trees[role], json_path, work, extra)
                runs[role].append(load(json_path, trees[role]))
                log(f"   {len(runs[role][-1])} benchmarks in {took:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the plugin, and the JSON files unless --out

    names = sorted(set().union(*runs["baseline"], *runs["current"]))
    print(f"micro-benchmarks, {a.rounds} round(s) per tree, medians; ratio: this tree / baseline, by round")
    print(f"  baseline: {labels['baseline']}")
    print(f"  current:  {labels['current']}")
    if extra:
        print(f"  pytest arguments: {' '.join(extra)}")
    print()
    width = max([len(n) for n in names] + [9])
    print(f"{'benchmark':{width}}  {'baseline':>10}  {'current':>10}  {'ratio':>7}  rounds (min-max)")
    ratios_all = []
    for name in names:
        base = [r[name]["median"] for r in runs["baseline"] if name in r]
        cur = [r[name]["median"] for r in runs["current"] if name in r]
        cells = [fmt_time(statistics.median(v)) if v else "-" for v in (base, cur)]
        line = f"{name:{width}}  {cells[0]:>10}  {cells[1]:>10}  "
        if not base or not cur:
            print(line + f"{'':>7}  only in {'baseline' if base else 'current'}")
            continue
        paired = [
            c[name]["median"] / b[name]["median"]
            for b, c in zip(runs["baseline"], runs["current"], strict=True)
            if name in b and name in c
        ]
        ratio = statistics.median(paired)
        ratios_all.append(ratio)
        print(line + f"{ratio:6.3f}x  " + (f"{min(paired):.3f}-{max(paired):.3f}" if len(paired) > 1 else ""))
    if ratios_all:
        geomean = math.exp(sum(math.log(r) for r in ratios_all) / len(ratios_all))
        print()
        print(
            f"geometric mean of the ratios over {len(ratios_all)} benchmarks: {geomean:.3f}x "
            "(below 1: this tree is faster)"
        )
    if a.out:
        print(f"JSON files: {out} (pytest-benchmark compare {out}/micro-*.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
