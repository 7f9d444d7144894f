#!/usr/bin/env python3
"""fastfpm's benchmark suite: wrk -> nginx (one worker) -> a FastCGI backend, side by side.

    python benchmarks/run.py                 # the full suite (tens of minutes)
    python benchmarks/run.py --quick         # a smoke run: two seconds per case
    python benchmarks/run.py --servers fastfpm,php-fpm,libfcgi,raw-c,nginx --scenarios hello \\
        --transport unix --keepalive off --repeat 3
    python benchmarks/run.py --baseline ../baseline --servers fastfpm,raw-c,libfcgi --scenarios hello \
        --transport unix --repeat 12   # this tree's fastfpm against another checkout's, in the same run

Backends (all with the same number of workers, default 4): fastfpm, php-fpm with opcache, uWSGI
``--fastcgi-socket``, flup ``fcgi_fork``, a C responder on libfcgi, a raw C responder (the floor: accept,
read until the empty STDIN record, write a prebuilt response, close) and nginx answering by itself (the
ceiling). Scenarios: hello, hello-accesslog (hello with php-fpm's default access log line written per
request; fastfpm and php-fpm only), hello-scrape (hello while a Prometheus-style scraper fetches the
pool's status page, ``?openmetrics&full`` over FastCGI, once a second; fastfpm and php-fpm only), json4k,
upload1m, io10ms, keepalive (an upstream keep-alive pool larger than the workers, many client
connections) and reload (the server's reload signal while under load).

The script installs nothing. It checks for what it needs and prints the command that gets what is
missing; optional backends that are missing are skipped. It writes every config into a temp dir, starts
and stops every process itself (each in its own process group) and kills them all on exit, also on
Ctrl-C and SIGTERM. Runs are interleaved (A B C A B C ...) and medians are reported; the results land in
``--out`` as results.json, results.md and PNG charts (when matplotlib is importable).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import datetime as dt
import http.client
import importlib.util
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
IS_ROOT = os.geteuid() == 0
PHP_FPM = "php-fpm8.2"
# How to install a Debian package, as this user would type it.
APT_INSTALL = "apt-get install -y" if IS_ROOT else "sudo apt-get install -y"
# Debian installs nginx and php-fpm8.2 in /usr/sbin, which a non-root user's PATH leaves out: an
# installed server must not be reported missing (nor started by a name the shell cannot find).
for _sbin in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
    if _sbin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + _sbin
READY_LINE = "ready to handle connections"
STATUS_PATH = "/status"  # pm.status_path of the pools in hello-scrape

SERVER_ORDER = ["fastfpm", "php-fpm", "uwsgi", "flup", "libfcgi", "raw-c", "nginx"]
# With --baseline PATH: fastfpm as built in another checkout, measured next to the current tree.
BASELINE = "fastfpm@baseline"
SCENARIO_ORDER = [
    "hello", "hello-accesslog", "hello-scrape", "json4k", "upload1m", "io10ms", "keepalive", "reload",
]


# ---------------------------------------------------------------------------------------------------
# Output helpers


def log(message: str = "") -> None:
    """Print a progress line to stderr at once."""
    print(message, file=sys.stderr, flush=True)


def fmt_duration(seconds: float) -> str:
    """Format seconds as m:ss."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------------
# Statistics (numpy when available, as the [bench] extra provides; the stdlib otherwise)

try:
    import numpy as _np
except ImportError:  # pragma: no cover - depends on the machine
    _np = None


def median(values: Sequence[float]) -> float | None:
    """The median of the values, or None when there are none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    if _np is not None:
        return float(_np.median(_np.asarray(values, dtype=float)))
    import statistics

    return float(statistics.median(values))


def spread(values: Sequence[float]) -> float | None:
    """Half the range relative to the median (0.03 means +-3 %), or None for fewer than two values."""
    values = [v for v in values if v is not None]
    mid = median(values)
    if len(values) < 2 or not mid:
        return None
    return (max(values) - min(values)) / 2 / mid


# ---------------------------------------------------------------------------------------------------
# Processes: every process we start gets its own process group and is killed on the way out.


class ProcessRegistry:
    """Start processes in their own process group and make sure none of them outlives the script."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.group_stop: dict[int, int] = {}  # roots whose whole group gets the first signal: which one

    def spawn(
        self,
        argv: Sequence[str],
        logfile: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        capture: bool = False,
        group_stop: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start argv in a new session (so its pid is its process group id).

        With group_stop (a signal number), stopping sends that signal to the whole group first
        rather than SIGTERM to the root.
        """
        out: Any
        if capture:
            out = subprocess.PIPE
        elif logfile is not None:
            out = open(logfile, "ab")  # noqa: SIM115 - closed after Popen duplicated it
        else:
            out = subprocess.DEVNULL
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if not capture else subprocess.PIPE,
                env=env,
                cwd=str(cwd) if cwd else None,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            if logfile is not None and not capture:
                out.close()
        self.procs.append(proc)
        if group_stop:
            self.group_stop[proc.pid] = group_stop
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 4.0) -> None:
        """SIGTERM the root, then the whole group, then SIGKILL the group and every descendant seen.

        The root goes first, as an init system would do it: a master stops its own workers, while
        signalling the whole group at once makes some masters respawn the workers they see dying.
        """
        family = _identities(descendants(proc.pid)) if proc.poll() is None else set()
        if proc.poll() is None or _group_alive(proc.pid):
            first = proc.pid in self.group_stop
            if first:
                _signal_group(proc.pid, self.group_stop[proc.pid])
            else:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGTERM)
            start = time.monotonic()
            while time.monotonic() - start < timeout:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)
                if proc.poll() is None:
                    family |= _identities(descendants(proc.pid))
                elif not _group_alive(proc.pid) and not _any_alive(family):
                    break
                if not first and time.monotonic() - start > timeout / 2:
                    first = True
                    _signal_group(proc.pid, signal.SIGTERM)
            _signal_group(proc.pid, signal.SIGKILL)
            for pid, start in family:
                # Only a process that is still the one we saw: on a shared machine a reaped
                # worker's pid may already belong to somebody else's process.
                info = read_proc(pid)
                if info is not None and info.start_ticks == start:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=timeout)
        if proc in self.procs:
            self.procs.remove(proc)
        self.group_stop.pop(proc.pid, None)

    def stop_many(self, procs: Sequence[subprocess.Popen[bytes]], timeout: float = 5.0) -> None:
        """SIGTERM every root at once, then stop each (so their shutdowns overlap)."""
        for proc in procs:
            if proc.poll() is None:
                if proc.pid in self.group_stop:
                    _signal_group(proc.pid, self.group_stop[proc.pid])
                else:
                    with contextlib.suppress(OSError):
                        os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            self.stop(proc, timeout=timeout)

    def stop_all(self) -> None:
        """Stop everything still registered, newest first, deaf to further signals meanwhile.

        A second Ctrl-C or SIGTERM during clean-up would otherwise raise in the middle of it
        (inside atexit, silently) and leave the remaining servers running.
        """
        if not self.procs:
            return
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        self.stop_many(list(reversed(self.procs)), timeout=3.0)


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls into it
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this script dies, however it dies.

    Every server runs in a session of its own, so a SIGKILLed script would otherwise leave them
    all running. SIGTERM rather than SIGKILL: a master that gets it stops its own workers. (The
    death signal follows the thread that forked; this script forks from its main thread only.)
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except OSError:
        return False
    # A group whose only members are zombies still answers; count only live members.
    for info in process_table().values():
        if info.pgid == pgid and info.state != "Z":
            return True
    return False


def _identities(pids: Iterable[int]) -> set[tuple[int, int]]:
    """(pid, start time) of each live pid: what stop() may still kill later."""
    found = set()
    for pid in pids:
        info = read_proc(pid)
        if info is not None:
            found.add((pid, info.start_ticks))
    return found


def _any_alive(family: Iterable[tuple[int, int]]) -> bool:
    for pid, start in family:
        info = read_proc(pid)
        if info is not None and info.start_ticks == start and info.state != "Z":
            return True
    return False


REGISTRY = ProcessRegistry()


def _on_fatal_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------------------
# /proc: CPU time of a process tree, memory of its workers, caught signals


@dataclass(frozen=True)
class ProcInfo:
    """The fields of /proc/PID/stat we use."""

    ppid: int
    pgid: int
    state: str
    ticks: int  # utime + stime
    child_ticks: int  # cutime + cstime: reaped children
    start_ticks: int  # starttime: with the pid, names one process even after the pid is reused


def read_proc(pid: int) -> ProcInfo | None:
    """Read /proc/PID/stat, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[1].split()
    # fields[0] is field 3 (state) of proc(5); field n is fields[n - 3].
    return ProcInfo(
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        state=fields[0].decode(),
        ticks=int(fields[11]) + int(fields[12]),
        child_ticks=int(fields[13]) + int(fields[14]),
        start_ticks=int(fields[19]),
    )


def process_table() -> dict[int, ProcInfo]:
    """Every process on the machine, by pid."""
    table: dict[int, ProcInfo] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            info = read_proc(int(entry.name))
            if info is not None:
                table[int(entry.name)] = info
    return table


def descendants(root: int, table: dict[int, ProcInfo] | None = None) -> list[int]:
    """All descendants of root (children, grandchildren, ...), not root itself."""
    table = table if table is not None else process_table()
    children: dict[int, list[int]] = {}
    for pid, info in table.items():
        children.setdefault(info.ppid, []).append(pid)
    found: list[int] = []
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


HAVE_SCHEDSTAT = os.path.exists(f"/proc/self/task/{os.getpid()}/schedstat")


def task_cpu_ns(pid: int) -> int | None:
    """On-CPU nanoseconds of a live process (sum over its threads' schedstat), or None."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def tree_cpu_seconds(root: int) -> float:
    """user+sys CPU seconds of root's whole tree: every live process plus the reaped ones.

    A process's own time is in utime+stime while it lives (zombies included) and moves into its
    parent's cutime+cstime when it is reaped, so summing both over the live tree counts every
    process exactly once. /proc/PID/stat counts in clock ticks (10 ms), too coarse for short runs,
    so a live process's own time is read in nanoseconds from its threads' schedstat (the same
    total the kernel splits into utime and stime) when the kernel provides it.
    """
    table = process_table()
    total = 0.0
    for pid in [root, *descendants(root, table)]:
        info = table.get(pid)
        if info is None:
            continue
        own = task_cpu_ns(pid) if HAVE_SCHEDSTAT and info.state != "Z" else None
        total += own / 1e9 if own is not None else info.ticks / CLK_TCK
        total += info.child_ticks / CLK_TCK
    return total


def memory_kib(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) of a process in KiB from /proc/PID/smaps_rollup, or None."""
    rss = pss = None
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        return None
    if rss is None or pss is None:
        return None
    return rss, pss


def catches_signal(pid: int, sig: int) -> bool:
    """Whether the process has a handler installed for sig (SigCgt in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (sig - 1)))
    except OSError:
        pass
    return False


def system_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, steal included), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def wait_for_quiet(limit_s: float, threshold_pct: float = 15.0) -> float:
    """Wait (up to limit_s) until the machine is nearly idle over one second; returns the seconds waited.

    Called between runs, when our own servers are idle, so what it sees is everybody else's load.
    """
    start = time.monotonic()
    while True:
        busy0, t0 = system_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        load = (system_busy_seconds() - busy0) / (time.monotonic() - t0) * 100
        if load < threshold_pct or time.monotonic() - start >= limit_s:
            return time.monotonic() - start


def children_cpu_seconds() -> float:
    """user+sys of this script's reaped children (wrk, once waited for)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def self_cpu_seconds() -> float:
    """user+sys of this script."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------------------------------------------
# Scenarios

JSON4K_BODY: str = ""  # filled lazily from benchmarks/apps.py


def json4k_body() -> str:
    """The json4k document as the apps encode it (to check responses and for nginx's own answer)."""
    global JSON4K_BODY
    if not JSON4K_BODY:
        spec = importlib.util.spec_from_file_location("_bench_apps", BENCH_DIR / "apps.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        JSON4K_BODY = json.dumps(module.JSON_DATA, separators=(",", ":"))
    return JSON4K_BODY


@dataclass(frozen=True)
class Scenario:
    """What every backend serves in one scenario, and how wrk drives it."""

    name: str
    wsgi: str  # callable in benchmarks.apps
    php: str  # script in benchmarks/php
    c_mode: str  # mode argument of the C responders
    description: str
    method: str = "GET"
    lua: str | None = None  # script in benchmarks/wrk, prepended to report.lua
    nginx_alone: bool = True  # whether nginx answering by itself makes sense here
    force_keepalive: bool = False
    conn_factor: int = 4  # wrk connections = conn_factor * workers (unless --connections)
    pool_factor: int = 2  # upstream keepalive pool = pool_factor * workers
    reload: bool = False
    access_log: bool = False  # the server writes php-fpm's default access.format line per request
    scrape: bool = False  # a Scraper fetches the pool's status page once a second during each run

    def expected_body(self) -> bytes:
        """The body every backend must answer with."""
        if self.name == "json4k":
            return json4k_body().encode()
        if self.name == "upload1m":
            return b"1048576"
        return b"Hello, world!"

    def request_body(self) -> bytes | None:
        """The body the check request sends."""
        return b"x" * 1048576 if self.name == "upload1m" else None


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("hello", "hello", "hello.php", "hello", "GET, 13-byte `Hello, world!`"),
        Scenario(
            "hello-accesslog",
            "hello",
            "hello.php",
            "hello",
            "hello with `access.log` on (php-fpm's default format), one line written per request",
            nginx_alone=False,
            access_log=True,
        ),
        Scenario(
            "hello-scrape",
            "hello",
            "hello.php",
            "hello",
            f"hello while a Prometheus-style scraper fetches `{STATUS_PATH}?openmetrics&full` once a second"
            " (FastCGI, straight to the pool, as php-fpm exporters do)",
            nginx_alone=False,
            scrape=True,
        ),
        Scenario("json4k", "json4k", "json4k.php", "json4k", "GET, a 4 KB JSON document encoded per request"),
        Scenario(
            "upload1m",
            "upload",
            "upload.php",
            "upload1m",
            "POST of 1 MiB, read whole by the app, which answers its length",
            method="POST",
            lua="upload1m.lua",
            nginx_alone=False,  # nginx's `return` only discards the body: no ceiling for an upload
        ),
        Scenario(
            "io10ms",
            "sleep10ms",
            "sleep10ms.php",
            "io10ms",
            "GET, the handler sleeps 10 ms (I/O-bound)",
            nginx_alone=False,
        ),
        Scenario(
            "keepalive",
            "hello",
            "hello.php",
            "hello",
            "hello with `fastcgi_keep_conn on`, an upstream keep-alive pool of 8x the workers and 16x as many"
            " client connections",
            nginx_alone=False,
            force_keepalive=True,
            conn_factor=16,
            pool_factor=8,
        ),
        Scenario(
            "reload",
            "hello",
            "hello.php",
            "hello",
            "hello while the server is told to reload half-way through (failed requests counted)",
            nginx_alone=False,
            reload=True,
        ),
    ]
}


# ---------------------------------------------------------------------------------------------------
# Servers


@dataclass
class Context:
    """What the servers need to know about this run."""

    tmp: Path
    workers: int
    env: dict[str, str]  # environment for Python servers (PYTHONPATH includes the repo)
    uwsgi: str | None = None
    binaries: dict[str, Path] = field(default_factory=dict)  # compiled C responders


@dataclass
class Launch:
    """How to start one backend."""

    argv: list[str]
    env: dict[str, str] | None = None
    cwd: Path | None = None
    ready_line: str | None = None  # wait for this line in the log (besides the socket accepting)
    group_stop: int | None = None  # stop by sending this signal to the whole process group


class Server:
    """A backend under test. Subclasses say how to check, build and start it."""

    name = ""
    label = ""
    fastcgi = True  # False for nginx answering by itself
    reload_signal: int | None = None
    reload_note = ""

    def check(self) -> str | None:
        """None when usable, else what is missing and the exact command that gets it."""
        return None

    def prepare(self, ctx: Context) -> None:
        """One-off work before the first start (compiling, writing configs that do not change)."""

    writes_access_log = False  # whether it can write php-fpm's access log (hello-accesslog)
    serves_status = False  # whether its pool serves php-fpm's status page (hello-scrape)

    def supports(self, scenario: Scenario) -> bool:
        """Whether the server takes part in the scenario."""
        if scenario.access_log and not self.writes_access_log:
            return False
        if scenario.scrape and not self.serves_status:
            return False
        if scenario.reload:
            return self.reload_signal is not None
        return True

    def launch(self, ctx: Context, scenario: Scenario, address: str, workdir: Path) -> Launch:
        """The command line that serves scenario on address (a unix socket path or HOST:PORT)."""
        raise NotImplementedError

    def nginx_params(self, scenario: Scenario) -> list[str]:
        """Extra nginx fastcgi_param lines after the stock include."""
        return []

    def verify(self, pid: int) -> str | None:
        """After the check request, with the server running as pid: None, or why it must not be measured."""
        return None


def _which(name: str) -> str | None:
    return shutil.which(name)


def _python_has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _cc() -> str | None:
    return _which("cc") or _which("gcc")


class FastFPM(Server):
    """fastfpm itself: ``python -m fastfpm serve benchmarks.apps:CALLABLE``.

    root is the checkout whose fastfpm is imported: this repository, or with --baseline another one
    (its own build, in place). The app is always this repository's benchmarks.apps, so that only
    fastfpm differs between the two.
    """

    reload_signal = signal.SIGUSR2
    reload_note = "SIGUSR2"
    writes_access_log = True
    serves_status = True

    def __init__(self, root: Path = REPO, name: str = "fastfpm", label: str = "fastfpm") -> None:
        self.root = root
        self.name = name
        self.label = label
        self.shim: Path | None = None  # for another checkout: its fastfpm plus our benchmarks

    def import_dir(self, tmp: Path | None = None) -> Path:
        """The directory that goes first on sys.path (and is the servers' working directory).

        For this repository, the repository. For another checkout, a directory in tmp holding two
        symbolic links, fastfpm -> ROOT/fastfpm and benchmarks -> this repository's benchmarks:
        `python -m` and the worker both put the working directory first on sys.path, so neither
        this repository's fastfpm nor the other checkout's benchmarks can slip in.
        """
        if self.root == REPO:
            return REPO
        if self.shim is None:
            base = Path(tempfile.mkdtemp(prefix="fastfpm-baseline-")) if tmp is None else tmp
            shim = base / f"import-{self.name.replace('@', '-')}"
            shim.mkdir(exist_ok=True)
            for link, target in (("fastfpm", self.root / "fastfpm"), ("benchmarks", BENCH_DIR)):
                if not (shim / link).is_symlink():
                    (shim / link).symlink_to(target, target_is_directory=True)
            if tmp is None:  # only the check's probe: remove it with the script
                atexit.register(shutil.rmtree, base, True)
                return shim
            self.shim = shim
        return self.shim

    def env(self, tmp: Path | None = None) -> dict[str, str]:
        """The servers' environment: python_env() with import_dir() first on PYTHONPATH."""
        return python_env(self.import_dir(tmp))

    def probe(self, tmp: Path | None = None) -> tuple[str | None, str]:
        """Import fastfpm as the servers will: (None or why not, where fastfpm and the app come from)."""
        code = (
            "import os, fastfpm, fastfpm._core, fastfpm.cli, benchmarks.apps as a\n"
            "r = os.path.realpath\n"
            "print(fastfpm.__version__, r(os.path.dirname(fastfpm.__file__)), r(fastfpm._core.__file__),"
            " r(a.__file__))"
        )
        here = self.import_dir(tmp)
        probe = subprocess.run(
            [sys.executable, "-c", code], env=self.env(tmp), cwd=here, capture_output=True, text=True
        )
        if probe.returncode != 0:
            last = (probe.stderr.strip().splitlines() or ["?"])[-1]
            build = f"`cd {self.root} && python setup.py build_ext --inplace`"
            if self.root == REPO:
                build = f"`pip install -e '{REPO}[bench]'` (or {build})"
            return f"fastfpm is not importable from {self.root} ({last}); build it with {build}", ""
        version, package, core, apps = probe.stdout.split()
        want = os.path.realpath(self.root / "fastfpm")
        if package != want or not core.startswith(want + os.sep):
            return f"imports fastfpm from {package} ({core}), not from {want}", ""
        if apps != os.path.realpath(BENCH_DIR / "apps.py"):
            return f"imports benchmarks.apps from {apps}, not from {BENCH_DIR}", ""
        return None, f"{version} from {package}"

    def check(self) -> str | None:
        return self.probe()[0]

    def prepare(self, ctx: Context) -> None:
        # Once more with the import directory the servers will use.
        why, _ = self.probe(ctx.tmp)
        if why:
            raise RuntimeError(why)

    def verify(self, pid: int) -> str | None:
        """Every worker has mapped the compiled core of root, and none another one."""
        want = os.path.realpath(self.root / "fastfpm") + os.sep
        workers = descendants(pid)
        for worker in workers:
            try:
                maps = Path(f"/proc/{worker}/maps").read_text()
            except OSError:
                continue
            cores = {line.split(None, 5)[-1] for line in maps.splitlines() if "/_core." in line}
            wrong = [c for c in cores if not os.path.realpath(c).startswith(want)]
            if wrong or not cores:
                return f"worker {worker} runs {', '.join(wrong) or 'no compiled core'}, not the one in {want}"
        return None if workers else "no workers"

    def launch(self, ctx: Context, scenario: Scenario, address: str, workdir: Path) -> Launch:
        argv = [
            sys.executable,
            "-m",
            "fastfpm",
            "serve",
            f"benchmarks.apps:{scenario.wsgi}",
            "--listen",
            address,
            "--max-children",
            str(ctx.workers),
        ]
        if scenario.access_log or scenario.scrape:
            # access.log and pm.status_path are file directives: the same pool, from a file.
            conf = workdir / "fastfpm.conf"
            conf.write_text(f"[global]\n[bench]\napp = benchmarks.apps:{scenario.wsgi}\nlisten = {address}\n"
                            f"pm = static\npm.max_children = {ctx.workers}\nclear_env = no\n"
                            + (f"access.log = {workdir / 'access.log'}\n" if scenario.access_log else "")
                            + (f"pm.status_path = {STATUS_PATH}\n" if scenario.scrape else ""))
            argv = [*argv[:4], "-c", str(conf)]
        if IS_ROOT:
            argv.append("-R")
        if self.root == REPO:
            return Launch(argv, env=ctx.env, cwd=REPO, ready_line=READY_LINE)
        return Launch(argv, env=self.env(ctx.tmp), cwd=self.import_dir(ctx.tmp), ready_line=READY_LINE)


class PhpFpm(Server):
    """Debian's php8.2-fpm with opcache, pm static."""

    name = "php-fpm"
    label = "php-fpm 8.2 + opcache"
    reload_signal = signal.SIGUSR2
    reload_note = "SIGUSR2"
    writes_access_log = True
    serves_status = True

    def check(self) -> str | None:
        if not _which(PHP_FPM):
            return f"{PHP_FPM} not found; install it with `{APT_INSTALL} php8.2-fpm`"
        modules = subprocess.run([PHP_FPM, "-m"], capture_output=True, text=True).stdout
        if "Zend OPcache" not in modules:
            return f"{PHP_FPM} has no opcache; install it with `{APT_INSTALL} php8.2-opcache`"
        return None

    def launch(self, ctx: Context, scenario: Scenario, address: str, workdir: Path) -> Launch:
        conf = workdir / "php-fpm.conf"
        user = "user = root\ngroup = root\n" if IS_ROOT else ""
        conf.write_text(
            "[global]\n"
            f"pid = {workdir / 'php-fpm.pid'}\n"
            f"error_log = {workdir / 'php-fpm.log'}\n"
            "log_level = notice\n"
            "daemonize = no\n"
            "process_control_timeout = 10s\n"
            "\n[bench]\n"
            f"{user}"
            f"listen = {address}\n"
            "listen.mode = 0666\n"
            "listen.backlog = 1024\n"
            "pm = static\n"
            f"pm.max_children = {ctx.workers}\n"
            "pm.max_requests = 0\n"
            "php_admin_value[opcache.enable] = 1\n"
            + (f"access.log = {workdir / 'access.log'}\n" if scenario.access_log else "")
            + (f"pm.status_path = {STATUS_PATH}\n" if scenario.scrape else "")
        )
        argv = [PHP_FPM, "-F", "-y", str(conf), "-d", "opcache.enable=1"]
        if IS_ROOT:
            argv.append("-R")
        return Launch(argv)

    def nginx_params(self, scenario: Scenario) -> list[str]:
        return [f"fastcgi_param SCRIPT_FILENAME {BENCH_DIR / 'php' / scenario.php};"]


class UWSGI(Server):
    """uWSGI with ``--fastcgi-socket``, a master and N processes."""

    name = "uwsgi"
    label = "uWSGI --fastcgi-socket"
    reload_signal = signal.SIGHUP
    reload_note = "SIGHUP"

    def check(self) -> str | None:
        if not find_uwsgi():
            # uWSGI is source-only on PyPI: pip compiles it, against the Python headers.
            return ("uwsgi not found; install it with `pip install uwsgi` (or `pip install -e '.[bench]'`; "
                    f"pip builds it from source and needs `{APT_INSTALL} gcc libc6-dev python3-dev` "
                    "or your Python's own headers)")
        return None

    def launch(self, ctx: Context, scenario: Scenario, address: str, workdir: Path) -> Launch:
        uwsgi = find_uwsgi()
        assert uwsgi
        argv = [
            uwsgi,
            "--fastcgi-socket",
            address,
            "--chmod-socket=666",
            "--master",
            "--processes",
            str(ctx.workers),
            "--pythonpath",
            str(REPO),
            "--module",
            f"benchmarks.apps:{scenario.wsgi}",
            "--need-app",
            "--die-on-term",
            "--disable-logging",
            "--ignore-sigpipe",
            "--ignore-write-errors",
            "--disable-write-exception",
            "--listen",
            "1024",
            "--buffer-size",
            "32768",
        ]
        return Launch(argv, env=ctx.env, cwd=REPO)


class Flup(Server):
    """flup's pre-forking FastCGI server (``flup.server.fcgi_fork``)."""

    name = "flup"
    label = "flup fcgi_fork"
    reload_signal = signal.SIGHUP
    reload_note = "SIGHUP"

    def check(self) -> str | None:
        if not _python_has("flup"):
            return "flup not importable; install it with `pip install flup` (or `pip install -e '.[bench]'`)"
        return None

    def launch(self, ctx: Context, scenario: Scenario, address: str, workdir: Path) -> Launch:
        argv = [
            sys.executable,
            str(BENCH_DIR / "flup_server.py"),
            address,
            f"benchmarks.apps:{scenario.wsgi}",
            str(ctx.workers),
        ]
        # flup's processes answer SIGTERM and SIGINT by setting a flag that nobody reads while they
        # are blocked in accept() (Python retries the call after the handler), so an idle flup only
        # stops for SIGKILL.
        return Launch(argv, env=ctx.env, cwd=REPO, group_stop=signal.SIGKILL)


class CResponder(Server):
    """One of the C responders in benchmarks/responders, compiled into the temp dir."""

    source = ""
    libs: list[str] = []

    def check(self) -> str | None:
        if not _cc():
            return f"no C compiler; install one with `{APT_INSTALL} gcc libc6-dev`"
        return None

    def prepare(self, ctx: Context) -> None:
        out = ctx.tmp / Path(self.source).stem
        cmd = [_cc() or "cc", "-O2", "-o", str(out), str(BENCH_DIR / "responders" / self.source), *self.libs]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {self.source} failed (is `{APT_INSTALL} gcc libc6-dev` done?):"
                               f"\n{shlex.join(cmd)}\n{result.stderr}")
        ctx.binaries[self.name] = out

    def launch(self, ctx: Context, scenario: Scenario, address: str, workdir: Path) -> Launch:
        return Launch([str(ctx.binaries[self.name]), address, str(ctx.workers), scenario.c_mode])


class LibFCGI(CResponder):
    """A minimal responder on libfcgi: FCGX_Accept_r loops in forked processes."""

    name = "libfcgi"
    label = "C on libfcgi"
    source = "libfcgi_hello.c"
    libs = ["-lfcgi"]

    def check(self) -> str | None:
        missing = super().check()
        if missing:
            return missing
        if not Path("/usr/include/fcgiapp.h").exists():
            return (
                "libfcgi headers not found (/usr/include/fcgiapp.h); "
                f"install them with `{APT_INSTALL} libfcgi-dev`"
            )
        return None


class RawC(CResponder):
    """The floor: accept, read to the empty STDIN record, write a prebuilt answer, close."""

    name = "raw-c"
    label = "raw C (floor)"
    source = "raw_hello.c"


class NginxAlone(Server):
    """nginx answering by itself with ``return 200``: the ceiling."""

    name = "nginx"
    label = "nginx alone (ceiling)"
    fastcgi = False

    def supports(self, scenario: Scenario) -> bool:
        return scenario.nginx_alone and not scenario.reload


SERVERS: dict[str, Server] = {
    s.name: s for s in [FastFPM(), PhpFpm(), UWSGI(), Flup(), LibFCGI(), RawC(), NginxAlone()]
}


def find_uwsgi() -> str | None:
    """The uwsgi binary next to this Python (pip's), else the one on PATH."""
    candidate = Path(sysconfig.get_path("scripts")) / "uwsgi"
    if candidate.exists():
        return str(candidate)
    return _which("uwsgi")


def python_env(first: Path = REPO) -> dict[str, str]:
    """The environment for Python servers: first (the repo) first on PYTHONPATH (fastfpm, benchmarks.apps)."""
    env = dict(os.environ)
    parts = [str(first)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def git_commit(root: Path) -> str:
    """The short commit of a checkout, with -dirty when tracked files differ from it ('?' outside git)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    if head.returncode != 0:
        return "?"
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def stale_build(root: Path) -> str | None:
    """Why root's compiled modules look older than their sources (None when they do not).

    A Cython module _x (from fastfpm/_x.pyx) is compared with _x.pyx, the .pxd files and csrc/*.c,
    *.h; a cffi module _x_cffi with fastfpm/_x_build.py and csrc/*.h. A forgotten rebuild after a
    change would otherwise measure the old code under the new name.
    """
    pkg, csrc = root / "fastfpm", root / "csrc"
    headers = sorted(csrc.glob("*.h"))
    problems = []
    for pyx in sorted(pkg.glob("*.pyx")):
        if not list(pkg.glob(f"{pyx.stem}.*.so")):
            problems.append(f"{pyx.name} is not built")
    for so in sorted(pkg.glob("*.so")):
        stem = so.name.split(".", 1)[0]
        if stem.endswith("_cffi"):
            sources = [pkg / f"{stem[: -len('_cffi')]}_build.py", *headers]
        else:
            sources = [pkg / f"{stem}.pyx", *pkg.glob("*.pxd"), *csrc.glob("*.c"), *headers]
        newer = [src for src in sources if src.exists() and src.stat().st_mtime > so.stat().st_mtime]
        if newer:
            problems.append(f"{', '.join(src.name for src in newer)} newer than {so.name}")
    if not problems:
        return None
    return f"{'; '.join(problems)} (rebuild: cd {root} && python setup.py build_ext --inplace -q)"


# ---------------------------------------------------------------------------------------------------
# nginx


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def upstream_name(server: str) -> str:
    """An nginx upstream name for a server name ('raw-c' -> 'raw_c', 'fastfpm@baseline' -> ...)."""
    return "".join(c if c.isalnum() else "_" for c in server)


def nginx_conf(
    tmp: Path,
    scenario: Scenario,
    backends: dict[str, tuple[str, int]],
    keepalive: bool,
    pool: int,
) -> str:
    """nginx.conf with one server block (own port) per backend; backends maps name -> (address, port)."""
    user = "user root root;\n" if IS_ROOT else ""
    lines = [
        f"{user}daemon off;",
        "master_process on;",
        "worker_processes 1;",
        f"pid {tmp / 'nginx.pid'};",
        f"error_log {tmp / 'nginx-error.log'} warn;",
        "events { worker_connections 8192; }",
        "http {",
        "    access_log off;",
        f"    client_body_temp_path {tmp / 'nginx-body'};",
        f"    fastcgi_temp_path {tmp / 'nginx-fastcgi'};",
        f"    proxy_temp_path {tmp / 'nginx-proxy'};",
        f"    uwsgi_temp_path {tmp / 'nginx-uwsgi'};",
        f"    scgi_temp_path {tmp / 'nginx-scgi'};",
        "    client_max_body_size 16m;",
        "    client_body_buffer_size 2m;",
        "    keepalive_requests 1000000;",
        "    keepalive_timeout 75s;",
    ]
    for name, (address, port) in backends.items():
        server = SERVERS[name]
        if not server.fastcgi:
            body = scenario.expected_body().decode()
            ctype = "application/json" if scenario.name == "json4k" else "text/plain"
            # nginx refuses tokens over 4 KB: longer bodies are split over variables set per request.
            chunks = [body[i : i + 2048] for i in range(0, len(body), 2048)] or [""]
            sets = " ".join(f"set $body{i} '{chunk}';" for i, chunk in enumerate(chunks[1:], 1))
            tail_vars = "".join(f"${{body{i}}}" for i in range(1, len(chunks)))
            lines += [
                f"    server {{ listen 127.0.0.1:{port}; {sets} location / {{ default_type {ctype}; "
                f"return 200 '{chunks[0]}{tail_vars}'; }} }}",
            ]
            continue
        upstream = f"unix:{address}" if address.startswith("/") else address
        lines += [f"    upstream b_{upstream_name(name)} {{", f"        server {upstream};"]
        if keepalive:
            lines.append(f"        keepalive {pool};")
        lines.append("    }")
        params = ["include /etc/nginx/fastcgi_params;", *server.nginx_params(scenario)]
        keep = ["fastcgi_keep_conn on;"] if keepalive else []
        location = " ".join([*params, f"fastcgi_pass b_{upstream_name(name)};", *keep])
        lines.append(f"    server {{ listen 127.0.0.1:{port}; location / {{ {location} }}")
        if name == "php-fpm":
            opcache = " ".join(
                [
                    "include /etc/nginx/fastcgi_params;",
                    f"fastcgi_param SCRIPT_FILENAME {BENCH_DIR / 'php' / 'opcache.php'};",
                    f"fastcgi_pass b_{upstream_name(name)};",
                ]
            )
            lines.append(f"        location = /__opcache {{ {opcache} }}")
        lines.append("    }")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Waiting and checking


def wait_accepting(address: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until address (unix path or HOST:PORT) accepts connections; raise if proc dies first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before listening")
        try:
            if address.startswith("/"):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(1)
                    s.connect(address)
            else:
                host, _, port = address.rpartition(":")
                with socket.create_connection((host, int(port)), timeout=1):
                    pass
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not accepting on {address} after {timeout:.0f} s") from None
            time.sleep(0.05)


def wait_log_line(path: Path, needle: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until needle appears in the log file; raise if proc dies first or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            if needle in path.read_text(errors="replace"):
                return
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before printing {needle!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {needle!r} in its log after {timeout:.0f} s")
        time.sleep(0.05)


def http_request(
    port: int, method: str, path: str, body: bytes | None, timeout: float = 10
) -> tuple[int, bytes]:
    """One HTTP request to nginx on 127.0.0.1:port: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_response(port: int, scenario: Scenario, timeout: float = 15) -> None:
    """Send the scenario's request once through nginx; raise unless the answer is 200 and right."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            status, body = http_request(port, scenario.method, "/", scenario.request_body())
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
            continue
        expected = scenario.expected_body()
        if status == 200 and body == expected:
            return
        last = f"HTTP {status}, body {body[:120]!r}" + (" (expected another body)" if status == 200 else "")
        if status not in (502, 503, 504):
            break
        time.sleep(0.2)
    raise RuntimeError(f"check request failed: {last}")


def tail(path: Path, lines: int = 8) -> str:
    """The last lines of a log file, indented, for error messages."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join("      | " + line for line in text[-lines:])


# ---------------------------------------------------------------------------------------------------
# One wrk run


@dataclass
class Sample:
    """The figures of one wrk run against one backend."""

    requests: int
    seconds: float
    rps: float
    cpu_us: float | None  # backend CPU per request (user+sys of its process tree)
    nginx_cpu_us: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    errors: int  # connect + read + write + timeout
    non2xx: int  # wrk's "Non-2xx or 3xx responses" (status > 399)
    wrk_cpu_us: float  # wrk's own CPU per request
    other_cpu_pct: float  # CPU used by everything else on the machine during the run, % of one core
    round: int = 0  # which interleaved round (ratios pair runs of the same round)
    reload: str | None = None
    scrapes: int | None = None  # hello-scrape: status pages fetched whole during the run
    scrape_failures: int = 0  # ... and fetches that failed or were not the OpenMetrics page


def wrk_script(tmp: Path, scenario: Scenario) -> Path:
    """The scenario's lua (if any) followed by report.lua, written into the temp dir."""
    path = tmp / f"wrk-{scenario.name}.lua"
    if not path.exists():
        parts = []
        if scenario.lua:
            parts.append((BENCH_DIR / "wrk" / scenario.lua).read_text())
        parts.append((BENCH_DIR / "wrk" / "report.lua").read_text())
        path.write_text("\n".join(parts))
    return path


class Scraper:
    """A Prometheus-style scraper for the length of a with block: GET STATUS_PATH?openmetrics&full
    over FastCGI, straight to the pool as php-fpm exporters do, once at the start and then every
    `interval` seconds, in a thread. Its own CPU is this script's, not the backend's."""

    def __init__(self, address: str, interval: float = 1.0) -> None:
        self.address = address
        self.interval = interval
        self.ok = 0
        self.failed = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        if str(REPO) not in sys.path:  # the project's client, whichever fastfpm is measured
            sys.path.append(str(REPO))
        from fastfpm.client import FastCGIClient, build_params

        params = build_params("GET", STATUS_PATH, "openmetrics&full")
        while not self._stop.is_set():
            try:
                with FastCGIClient(self.address, timeout=5) as client:
                    page = client.request(params)
                if page.status != 200 or not (page.header("Content-Type") or "").startswith(
                        "application/openmetrics-text"):
                    raise RuntimeError(f"answered {page.status} {page.header('Content-Type')!r}")
                self.ok += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                self.failed += 1
                self.last_error = str(exc)
            self._stop.wait(self.interval)


def run_wrk(
    port: int,
    script: Path,
    duration: int,
    connections: int,
    threads: int,
    server_pid: int | None,
    nginx_pid: int,
    reload_signal: int | None = None,
    scrape: str | None = None,
) -> tuple[Sample, list[int], list[int]]:
    """Run wrk against nginx's port; returns the sample and the backend's workers before/after.

    With scrape (the backend's FastCGI address), a Scraper fetches its status page during the run.
    """
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}/",
    ]
    workers_before = descendants(server_pid) if server_pid else []
    busy0, kids0, self0 = system_busy_seconds(), children_cpu_seconds(), self_cpu_seconds()
    cpu0 = tree_cpu_seconds(server_pid) if server_pid else 0.0
    ncpu0 = tree_cpu_seconds(nginx_pid)
    scraper = Scraper(scrape) if scrape else None
    with scraper or contextlib.nullcontext():
        proc = REGISTRY.spawn(argv, capture=True)
        try:
            if reload_signal is not None and server_pid:
                time.sleep(duration / 2)
                with contextlib.suppress(OSError):
                    os.kill(server_pid, reload_signal)
            out, err = proc.communicate(timeout=duration + 60)
        finally:
            REGISTRY.stop(proc)
    cpu1 = tree_cpu_seconds(server_pid) if server_pid else 0.0
    ncpu1 = tree_cpu_seconds(nginx_pid)
    busy1, kids1, self1 = system_busy_seconds(), children_cpu_seconds(), self_cpu_seconds()
    report = None
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("FASTFPM_BENCH "):
            report = json.loads(line.split(" ", 1)[1])
    if report is None:
        said = (err + out).decode(errors="replace").strip()[-300:]
        raise RuntimeError(f"wrk printed no report (exit {proc.returncode}): {said}")
    requests = int(report["requests"])
    seconds = report["duration_us"] / 1e6
    wrk_cpu = kids1 - kids0
    ours = (cpu1 - cpu0) + (ncpu1 - ncpu0) + wrk_cpu + (self1 - self0)
    other = max(0.0, (busy1 - busy0) - ours)
    workers_after = descendants(server_pid) if server_pid else []
    sample = Sample(
        requests=requests,
        seconds=seconds,
        rps=requests / seconds if seconds else 0.0,
        cpu_us=(cpu1 - cpu0) / requests * 1e6 if server_pid and requests else None,
        nginx_cpu_us=(ncpu1 - ncpu0) / requests * 1e6 if requests else 0.0,
        p50_ms=report["p50"] / 1000,
        p90_ms=report["p90"] / 1000,
        p99_ms=report["p99"] / 1000,
        p999_ms=report["p999"] / 1000,
        errors=int(report["connect"] + report["read"] + report["write"] + report["timeout"]),
        non2xx=int(report["status"]),
        wrk_cpu_us=wrk_cpu / requests * 1e6 if requests else 0.0,
        other_cpu_pct=other / seconds * 100 if seconds else 0.0,
        scrapes=scraper.ok if scraper else None,
        scrape_failures=scraper.failed if scraper else 0,
    )
    if scraper and (scraper.failed or not scraper.ok):
        # Figures of a run whose pool was not scraped would be hello's under another name.
        raise RuntimeError(f"{scraper.failed} of {scraper.ok + scraper.failed} status page fetches failed: "
                           f"{scraper.last_error or 'none was made'}")
    return sample, workers_before, workers_after


# ---------------------------------------------------------------------------------------------------
# A group: one scenario x transport x keep-alive setting, every server started once, runs interleaved


@dataclass
class Case:
    """One scenario with one transport and one keep-alive setting."""

    scenario: Scenario
    transport: str
    keepalive: bool

    @property
    def key(self) -> str:
        """A short name used for files and headings."""
        return f"{self.scenario.name}-{self.transport}-keepconn-{'on' if self.keepalive else 'off'}"


@dataclass
class ServerResult:
    """Everything measured for one server in one case."""

    status: str = "ok"  # "ok", or why it did not run
    samples: list[Sample] = field(default_factory=list)
    rss_kib: float | None = None  # per worker, mean over workers
    pss_kib: float | None = None
    master_rss_kib: float | None = None
    workers: int = 0
    reload: str | None = None

    def summary(self) -> dict[str, Any]:
        """Medians over the runs (sums for errors)."""
        s = self.samples
        return {
            "runs": len(s),
            "rps": median([x.rps for x in s]),
            "rps_spread": spread([x.rps for x in s]),
            "cpu_us": median([x.cpu_us for x in s if x.cpu_us is not None]),
            "cpu_spread": spread([x.cpu_us for x in s if x.cpu_us is not None]),
            "nginx_cpu_us": median([x.nginx_cpu_us for x in s]),
            "p50_ms": median([x.p50_ms for x in s]),
            "p90_ms": median([x.p90_ms for x in s]),
            "p99_ms": median([x.p99_ms for x in s]),
            "p999_ms": median([x.p999_ms for x in s]),
            "errors": sum(x.errors for x in s),
            "non2xx": sum(x.non2xx for x in s),
            "requests": sum(x.requests for x in s),
            "wrk_cpu_us": median([x.wrk_cpu_us for x in s]),
            "other_cpu_pct": median([x.other_cpu_pct for x in s]),
            "other_cpu_pct_max": max((x.other_cpu_pct for x in s), default=None),
            "rss_kib": self.rss_kib,
            "pss_kib": self.pss_kib,
            "master_rss_kib": self.master_rss_kib,
            "workers": self.workers,
            "reload": self.reload,
            "scrapes": sum(x.scrapes for x in s) if s and s[0].scrapes is not None else None,
        }


@dataclass
class Options:
    """The resolved command-line options."""

    servers: list[str]
    scenarios: list[str]
    transports: list[str]
    keepalive: list[bool]
    workers: int
    repeat: int
    duration: int  # wrk takes whole seconds
    warmup: int
    connections: int | None
    threads: int
    wait_quiet: float
    out: Path
    keep_temp: bool
    quick: bool
    baseline: Path | None = None  # another checkout's fastfpm, measured as BASELINE


class Progress:
    """Counts finished runs and prints an ETA."""

    def __init__(self, total: int, per_run: float) -> None:
        self.total = total
        self.done = 0
        self.per_run = per_run
        self.start = time.monotonic()

    def prefix(self) -> str:
        """``[ 3/42 0:12 elapsed, ~1:40 left]``."""
        elapsed = time.monotonic() - self.start
        left = (self.total - self.done) * self.per_run
        if self.done:
            left = elapsed / self.done * (self.total - self.done)
        width = len(str(self.total))
        return (
            f"[{self.done:>{width}}/{self.total} {fmt_duration(elapsed)} elapsed, ~{fmt_duration(left)} left]"
        )


def run_case(
    ctx: Context, opts: Options, case: Case, names: list[str], progress: Progress
) -> dict[str, ServerResult]:
    """Start every server for the case, check them, run the interleaved rounds, stop them."""
    scenario = case.scenario
    workdir = ctx.tmp / case.key
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict[str, ServerResult] = {name: ServerResult() for name in names}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    addresses: dict[str, str] = {}
    ports: dict[str, int] = {}
    pool = scenario.pool_factor * opts.workers
    connections = opts.connections or scenario.conn_factor * opts.workers
    log(f"\n== {case.key}: {scenario.description}")
    log(
        f"   {len(names)} servers, {opts.workers} workers each, wrk -t{opts.threads} -c{connections}"
        + (f", upstream keepalive {pool}" if case.keepalive else "")
    )
    nginx_proc = None
    try:
        # Start the backends all at once, then wait for each.
        launches: dict[str, Launch] = {}
        for name in names:
            server = SERVERS[name]
            ports[name] = free_port()
            if not server.fastcgi:
                continue
            sdir = workdir / name
            sdir.mkdir(exist_ok=True)
            if case.transport == "unix":
                addresses[name] = str(sdir / "fcgi.sock")
            else:
                addresses[name] = f"127.0.0.1:{free_port()}"
            try:
                launch = server.launch(ctx, scenario, addresses[name], sdir)
            except Exception as exc:  # noqa: BLE001 - report and go on with the others
                results[name].status = f"failed to configure: {exc}"
                continue
            launches[name] = launch
            procs[name] = REGISTRY.spawn(
                launch.argv, sdir / "server.log", env=launch.env, cwd=launch.cwd, group_stop=launch.group_stop
            )
        for name, launch in launches.items():
            sdir = workdir / name
            try:
                if launch.ready_line:
                    wait_log_line(sdir / "server.log", launch.ready_line, procs[name], timeout=30)
                wait_accepting(addresses[name], procs[name], timeout=30)
            except RuntimeError as exc:
                results[name].status = f"failed to start: {exc}"
                log(f"   ! {name}: {exc}\n{tail(sdir / 'server.log')}")
                REGISTRY.stop(procs.pop(name))

        # nginx in front of all of them, one port each.
        live = {n: (addresses.get(n, ""), ports[n]) for n in names if results[n].status == "ok"}
        conf = workdir / "nginx.conf"
        conf.write_text(nginx_conf(workdir, scenario, live, case.keepalive, pool))
        nginx_proc = REGISTRY.spawn(
            ["nginx", "-p", str(workdir), "-e", str(workdir / "nginx-error.log"), "-c", str(conf)],
            workdir / "nginx.log",
        )
        for name in live:
            try:
                wait_accepting(f"127.0.0.1:{ports[name]}", nginx_proc, timeout=15)
            except RuntimeError as exc:
                raise RuntimeError(
                    f"nginx did not start: {exc}\n{tail(workdir / 'nginx-error.log')}\n"
                    f"{tail(workdir / 'nginx.log')}"
                ) from None

        # One real request each, so a broken backend is reported rather than measured.
        for name in live:
            try:
                check_response(ports[name], scenario)
                if name == "php-fpm":
                    status, body = http_request(ports[name], "GET", "/__opcache", None)
                    if body != b"opcache on":
                        # Without opcache php-fpm recompiles the script per request: measuring it
                        # under the "+ opcache" label would flatter fastfpm.
                        raise RuntimeError(f"opcache is not on ({status} {body[:60]!r})")
                if name in procs and (wrong := SERVERS[name].verify(procs[name].pid)):
                    raise RuntimeError(wrong)
            except RuntimeError as exc:
                results[name].status = f"failed: {exc}"
                log(f"   ! {name}: {exc}\n{tail(workdir / name / 'server.log')}")
                log(tail(workdir / "nginx-error.log", 3))
        active = [n for n in names if results[n].status == "ok"]
        progress.total -= (len(names) - len(active)) * opts.repeat

        if scenario.reload:
            for name in list(active):
                sig = SERVERS[name].reload_signal
                pid = procs[name].pid
                if sig is None or not catches_signal(pid, sig):
                    results[name].status = "not supported"
                    results[name].reload = f"not supported (no {SERVERS[name].reload_note} handler)"
                    log(
                        f"   - {name}: reload not supported (the master does not handle "
                        f"{SERVERS[name].reload_note}), skipped"
                    )
                    active.remove(name)
                    progress.total -= opts.repeat

        script = wrk_script(ctx.tmp, scenario)
        if opts.warmup > 0:
            for name in active:
                log(f"   warming up {name} ({opts.warmup:g} s)")
                try:
                    run_wrk(
                        ports[name],
                        script,
                        opts.warmup,
                        connections,
                        opts.threads,
                        procs[name].pid if name in procs else None,
                        nginx_proc.pid,
                    )
                except RuntimeError as exc:
                    log(f"   ! {name}: warm-up failed: {exc}")

        width = max((len(n) for n in active), default=8)
        for rnd in range(opts.repeat):
            # With a baseline, every other round runs backwards (A B, B A, A B ...): each of the two
            # fastfpms goes first as often as the other, so a drifting machine favours neither.
            order = list(reversed(active)) if opts.baseline and rnd % 2 else active
            for name in order:
                server = SERVERS[name]
                pid = procs[name].pid if name in procs else None
                if opts.wait_quiet > 0:
                    waited = wait_for_quiet(opts.wait_quiet)
                    if waited >= opts.wait_quiet:
                        log(f"   (the machine stayed busy for {waited:.0f} s; measuring anyway)")
                try:
                    sample, before, after = run_wrk(
                        ports[name],
                        script,
                        opts.duration,
                        connections,
                        opts.threads,
                        pid,
                        nginx_proc.pid,
                        reload_signal=server.reload_signal if scenario.reload else None,
                        scrape=addresses.get(name) if scenario.scrape else None,
                    )
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    log(f"   ! {name}: run failed: {exc}")
                    progress.done += 1
                    continue
                if scenario.reload and pid:
                    sample.reload = describe_reload(pid, before, opts.workers)
                    results[name].reload = sample.reload
                sample.round = rnd
                results[name].samples.append(sample)
                progress.done += 1
                cpu = f"{sample.cpu_us:7.1f} µs/req" if sample.cpu_us is not None else "      - µs/req"
                bad = sample.errors + sample.non2xx
                extra = f", {bad} failed" if bad else ""
                if sample.other_cpu_pct >= 20:
                    extra += f", other load {sample.other_cpu_pct:.0f}% of a core"
                if sample.reload:
                    extra += f", {sample.reload}"
                if sample.scrapes is not None:
                    extra += f", {sample.scrapes} scrapes" + (
                        f" ({sample.scrape_failures} failed)" if sample.scrape_failures else "")
                log(
                    f"{progress.prefix()} {case.key} round {rnd + 1}/{opts.repeat} {name:{width}s} "
                    f"{sample.rps:9,.0f} req/s {cpu}  p99 {sample.p99_ms:6.2f} ms{extra}"
                )

        # Memory per worker, after the runs (workers have touched what they touch).
        table = process_table()
        for name in active:
            if name in procs:
                root = procs[name].pid
            else:  # nginx answering by itself: its worker
                root = nginx_proc.pid
            workers = [p for p in descendants(root, table) if table.get(p) and table[p].state != "Z"]
            mems = [m for m in (memory_kib(p) for p in workers) if m]
            results[name].workers = len(workers)
            if mems:
                results[name].rss_kib = sum(m[0] for m in mems) / len(mems)
                results[name].pss_kib = sum(m[1] for m in mems) / len(mems)
            master = memory_kib(root)
            if master and name in procs:
                results[name].master_rss_kib = master[0]
    finally:
        REGISTRY.stop_many([*([nginx_proc] if nginx_proc else []), *procs.values()])
    return results


def describe_reload(pid: int, before: list[int], workers: int) -> str:
    """After a reload signal: wait (up to 10 s) for a full set of workers and say whether they are new."""
    deadline = time.monotonic() + 10
    after: list[int] = []
    while time.monotonic() < deadline:
        table = process_table()
        if pid not in table:
            return "master exited"
        after = [p for p in descendants(pid, table) if table[p].state != "Z"]
        if len(after) >= workers and not set(after) & set(before):
            return "workers replaced"
        time.sleep(0.1)
    if set(after) & set(before):
        return "workers NOT replaced"
    return f"only {len(after)} workers after reload"


# ---------------------------------------------------------------------------------------------------
# Reports


def fmt_num(value: float | None, digits: int = 1, thousands: bool = False) -> str:
    """A number for the tables, '-' when missing."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if thousands else f"{value:.{digits}f}"


def fmt_spread(value: float | None) -> str:
    """' ±3%' or ''."""
    return f" ±{value * 100:.0f}%" if value is not None else ""


def round_ratios(a: ServerResult | None, b: ServerResult | None, attr: str) -> list[float]:
    """a's figure divided by b's, one ratio per round both have a figure for."""
    if a is None or b is None or a.status != "ok" or b.status != "ok":
        return []
    theirs = {x.round: getattr(x, attr) for x in b.samples}
    return [
        getattr(x, attr) / theirs[x.round]
        for x in a.samples
        if getattr(x, attr) is not None and theirs.get(x.round)
    ]


def paired_ratio(a: ServerResult | None, b: ServerResult | None, attr: str) -> float | None:
    """Median over rounds of a's figure divided by b's in the same round (runs next to each other in
    time share the machine's mood, so their ratio is steadier than the ratio of two medians)."""
    return median(round_ratios(a, b, attr))


def fmt_x(value: float | None) -> str:
    """A ratio as '0.84x', '-' when missing."""
    return f"{value:.2f}x" if value is not None else "-"


def case_table(case: Case, results: dict[str, ServerResult]) -> list[str]:
    """The markdown table of one case."""
    sums = {n: r.summary() for n, r in results.items()}
    ok = {n for n, s in sums.items() if results[n].status == "ok" and s["runs"]}
    php, lib, raw, base = (
        results.get(n) if n in ok else None for n in ("php-fpm", "libfcgi", "raw-c", BASELINE)
    )
    vs_base = BASELINE in results  # the columns only when a baseline was asked for
    with_base = ["baseline"] if vs_base else []
    columns = [
        "server", "req/s", *(f"req/s vs {ref}" for ref in ["php-fpm", "raw C", *with_base]),
        "CPU µs/req", *(f"CPU vs {ref}" for ref in ["libfcgi", "php-fpm", "raw C", *with_base]),
        "p50 ms", "p99 ms", "p99.9 ms", "errors", "non-2xx", "RSS/worker MiB", "PSS/worker MiB",
        "nginx µs/req",
    ]  # fmt: skip
    head = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    rows = []
    for name, res in results.items():
        label = SERVERS[name].label
        if name not in ok:
            status = res.status if res.status != "ok" else "no runs"
            rows.append(f"| {label} | {status} |" + " |" * (len(columns) - 2))
            continue
        s = sums[name]
        rows.append(
            "| "
            + " | ".join(
                [
                    label + (f" ({s['reload']})" if s["reload"] else ""),
                    fmt_num(s["rps"], thousands=True) + fmt_spread(s["rps_spread"]),
                    fmt_x(paired_ratio(res, php, "rps")),
                    fmt_x(paired_ratio(res, raw, "rps")),
                    *([fmt_x(paired_ratio(res, base, "rps"))] if vs_base else []),
                    fmt_num(s["cpu_us"]) + fmt_spread(s["cpu_spread"]),
                    fmt_x(paired_ratio(res, lib, "cpu_us")),
                    fmt_x(paired_ratio(res, php, "cpu_us")),
                    fmt_x(paired_ratio(res, raw, "cpu_us")),
                    *([fmt_x(paired_ratio(res, base, "cpu_us"))] if vs_base else []),
                    fmt_num(s["p50_ms"], 2),
                    fmt_num(s["p99_ms"], 2),
                    fmt_num(s["p999_ms"], 2),
                    str(s["errors"]),
                    str(s["non2xx"]),
                    fmt_num(s["rss_kib"] / 1024 if s["rss_kib"] else None),
                    fmt_num(s["pss_kib"] / 1024 if s["pss_kib"] else None),
                    fmt_num(s["nginx_cpu_us"]),
                ]
            )
            + " |"
        )
    if case.scenario.scrape:
        fetched = ", ".join(f"{SERVERS[n].label} {sums[n]['scrapes']}" for n in results if n in ok)
        rows += ["", f"Status pages scraped during these runs (one a second, "
                     f"`{STATUS_PATH}?openmetrics&full`): {fetched or 'none'}. Compare with hello's table "
                     "for the cost."]
    samples = [x for n in ok for x in results[n].samples]
    if samples:
        others = [x.other_cpu_pct for x in samples]
        rows += [
            "",
            f"Other processes on the machine used a median {median(others):.0f}% of one core during these "
            f"runs (at most {max(others):.0f}%).",
        ]
    return head + rows


# What the baseline comparison reports: (attribute, name, whether lower is better)
BASELINE_FIGURES = [("cpu_us", "CPU µs/req", True), ("rps", "req/s", False), ("p99_ms", "p99", True)]


def baseline_comparison(results: dict[str, ServerResult]) -> dict[str, dict[str, Any]]:
    """The current fastfpm against the baseline, per figure: the per-round ratios and their summary."""
    me, base = results.get("fastfpm"), results.get(BASELINE)
    found: dict[str, dict[str, Any]] = {}
    for attr, _, lower_better in BASELINE_FIGURES:
        ratios = round_ratios(me, base, attr)
        if ratios:
            better = sum(1 for r in ratios if (r < 1 if lower_better else r > 1))
            found[attr] = {
                "median": median(ratios),
                "min": min(ratios),
                "max": max(ratios),
                "rounds": ratios,
                "better_rounds": better,
            }
    return found


def baseline_lines(results: dict[str, ServerResult]) -> list[str]:
    """The comparison with the baseline as markdown lines (none without a baseline)."""
    found = baseline_comparison(results)
    if not found:
        return []
    lines = [
        f"fastfpm (this tree) against {SERVERS[BASELINE].label}, this tree / baseline, paired by round:"
    ]
    for attr, what, lower_better in BASELINE_FIGURES:
        if attr in found:
            c = found[attr]
            lines.append(
                f"- {what}: {c['median']:.3f}x (rounds {c['min']:.3f}x to {c['max']:.3f}x; this tree "
                f"{'lower' if lower_better else 'higher'}, i.e. better, in {c['better_rounds']} of "
                f"{len(c['rounds'])}): " + " ".join(f"{r:.3f}" for r in c["rounds"])
            )
    return lines


def baseline_summary(done: list[tuple[Case, dict[str, ServerResult]]]) -> list[str]:
    """One table over every case: the current tree against the baseline."""
    rows = []
    for case, results in done:
        found = baseline_comparison(results)
        if not found:
            continue
        cells = [case.key]
        for attr, _, _ in BASELINE_FIGURES:
            c = found.get(attr)
            if c is None:
                cells.append("-")
                continue
            cells.append(
                f"{c['median']:.3f}x ({c['min']:.2f}–{c['max']:.2f}, better in {c['better_rounds']}/"
                f"{len(c['rounds'])})"
            )
        rows.append("| " + " | ".join(cells) + " |")
    if not rows:
        return []
    return [
        f"## This tree against the baseline ({SERVERS[BASELINE].label})",
        "",
        "Median of the per-round ratios this tree / baseline (range over the rounds, and in how many "
        "rounds this tree was better). CPU and p99: below 1 is better; req/s: above 1 is better.",
        "",
        "| case | " + " | ".join(what for _, what, _ in BASELINE_FIGURES) + " |",
        "|---|" + "---:|" * len(BASELINE_FIGURES),
        *rows,
        "",
    ]


def target_lines(case: Case, results: dict[str, ServerResult]) -> list[str]:
    """fastfpm against the goals of issues 2 and 3, for the cases they are stated for."""
    me = results.get("fastfpm")
    if me is None or me.status != "ok" or not me.samples:
        return []
    lines: list[str] = []

    def check(label: str, ref: str, attr: str, limit: float, below: bool) -> None:
        ratio = paired_ratio(me, results.get(ref), attr)
        if ratio is None:
            return
        ok = ratio <= limit if below else ratio >= limit
        sign = "<=" if below else ">="
        lines.append(f"- {label}: {ratio:.2f}x (goal {sign} {limit}x) {'**met**' if ok else '**not met**'}")

    if case.scenario.name in ("hello", "json4k", "upload1m"):
        check("CPU/request vs C on libfcgi (issue 3)", "libfcgi", "cpu_us", 0.7, True)
        check("CPU/request vs C on libfcgi (issue 2)", "libfcgi", "cpu_us", 0.8, True)
        check("CPU/request vs php-fpm", "php-fpm", "cpu_us", 0.25, True)
        check("req/s vs raw C", "raw-c", "rps", 0.9, False)
        check("req/s vs php-fpm", "php-fpm", "rps", 1.4, False)
    p99 = me.summary()["p99_ms"]
    if case.scenario.name == "keepalive" and p99 is not None:
        ok = p99 <= 5
        lines.append(f"- keep-alive p99: {p99:.2f} ms (goal <= 5 ms) {'**met**' if ok else '**not met**'}")
    return lines


def make_chart(path: Path, case: Case, results: dict[str, ServerResult]) -> bool:
    """Throughput, CPU per request and latency percentiles of one case as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sums = {n: r.summary() for n, r in results.items() if r.status == "ok" and r.samples}
    if not sums:
        return False
    names = list(sums)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    x = list(range(len(names)))
    colors = [
        "#d62728" if n == "fastfpm" else "#ff7f0e" if n == BASELINE else "#7f7f7f" if n in ("raw-c", "nginx")
        else "#1f77b4"
        for n in names
    ]
    axes[0].bar(x, [sums[n]["rps"] or 0 for n in names], color=colors)
    axes[0].set_title("throughput (req/s, median)")
    axes[1].bar(x, [sums[n]["cpu_us"] or 0 for n in names], color=colors)
    axes[1].set_title("backend CPU per request (µs, median)")
    width = 0.27
    for i, (key, label) in enumerate([("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")]):
        axes[2].bar([v + (i - 1) * width for v in x], [sums[n][key] or 0 for n in names], width, label=label)
    axes[2].set_yscale("log")
    axes[2].set_title("latency (ms, log scale)")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(case.key)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def machine_info() -> dict[str, str]:
    """The machine and the versions of everything measured."""

    def first_line(argv: list[str]) -> str:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=20, env=python_env(), cwd=REPO)
        except (OSError, subprocess.TimeoutExpired):
            return "not found"
        text = (r.stdout + r.stderr).strip().splitlines()
        return text[0].strip() if text else "?"

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        mem = f"{kib / 1024 / 1024:.1f} GiB"

    def pkg_version(name: str) -> str:
        try:
            from importlib.metadata import version

            return version(name)
        except Exception:  # noqa: BLE001 - any failure means "not installed"
            return "not installed"

    def fastfpm_build(server: FastFPM) -> str:
        why, where = server.probe()
        stale = stale_build(server.root)
        return (
            f"{where or why}, commit {git_commit(server.root)}"
            + (f"; STALE BUILD: {stale}" if stale else "")
        )

    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "os": first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        **{name: fastfpm_build(server) for name, server in SERVERS.items() if isinstance(server, FastFPM)},
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "php-fpm": first_line([PHP_FPM, "-v"]),
        "uwsgi": first_line([find_uwsgi() or "uwsgi", "--version"]),
        "flup": pkg_version("flup"),
        "libfcgi": first_line(["dpkg-query", "-W", "-f", "${Version}", "libfcgi-dev"]),
        "cc": first_line([_cc() or "cc", "--version"]),
        "numpy": pkg_version("numpy"),
        "load average at the end": Path("/proc/loadavg").read_text().strip(),
    }


def write_reports(
    opts: Options,
    machine: dict[str, str],
    command: str,
    skipped: dict[str, str],
    done: list[tuple[Case, dict[str, ServerResult]]],
    started: str,
) -> Path:
    """results.json, results.md and the charts in opts.out; returns the markdown path."""
    opts.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "started": started,
        "command": command,
        "machine": machine,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "skipped": skipped,
        "cases": [
            {
                "key": case.key,
                "scenario": case.scenario.name,
                "transport": case.transport,
                "keepalive": case.keepalive,
                "servers": {
                    name: {
                        "status": res.status,
                        "summary": res.summary(),
                        "samples": [vars(s) for s in res.samples],
                    }
                    for name, res in results.items()
                },
                "vs_baseline": baseline_comparison(results),
            }
            for case, results in done
        ],
    }
    (opts.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")

    md = [
        "# fastfpm benchmark results",
        "",
        f"Started {started}. Command: `{command}`",
        "",
        "Machine and versions:",
        "",
        *[f"- {k}: {v}" for k, v in machine.items()],
        "",
        f"{opts.workers} workers per backend, nginx with 1 worker, wrk -t{opts.threads} on loopback, "
        f"{opts.duration:g} s per run, {opts.repeat} interleaved round(s); medians (± half the range).",
        "CPU µs/req is user+sys of the backend's whole process tree (from /proc, reaped children included) "
        "divided by the requests wrk completed; nginx µs/req is the same for nginx.",
        "",
    ]
    if opts.baseline:
        md += [
            f"{SERVERS[BASELINE].label}: fastfpm imported from {opts.baseline} (its own in-place build), "
            "serving this tree's benchmarks/apps.py; every other round runs the servers in reverse order.",
            "",
        ]
    if skipped:
        md.append("Skipped servers:")
        md += [f"- {name}: {why}" for name, why in skipped.items()]
        md.append("")
    md += baseline_summary(done)
    for case, results in done:
        md += [f"## {case.key}", "", case.scenario.description, ""]
        md += case_table(case, results)
        vs_base = baseline_lines(results)
        if vs_base:
            md += ["", *vs_base]
        targets = target_lines(case, results)
        if targets:
            md += ["", "fastfpm against the goals:", *targets]
        png = opts.out / f"{case.key}.png"
        if make_chart(png, case, results):
            md += ["", f"![{case.key}]({png.name})"]
        md.append("")
    path = opts.out / "results.md"
    path.write_text("\n".join(md))
    return path


# ---------------------------------------------------------------------------------------------------
# Command line


def split_list(value: str, allowed: Sequence[str], what: str) -> list[str]:
    """Parse 'a,b,c' and check every item is allowed."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})"
        )
    return items


def parse_args(argv: Sequence[str] | None) -> Options:
    """Parse the command line into Options (with --quick's defaults)."""
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Needs: nginx, wrk (apt-get install -y nginx wrk); optional: php8.2-fpm, libfcgi-dev + gcc, "
        "and pip install -e '.[bench]' (numpy, matplotlib, flup, uwsgi).",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 s per case, one round, unix, keep-conn off (and hello over TCP, keep-conn on)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="directory for results (default benchmarks/results/DATE)"
    )
    p.add_argument("--servers", default=",".join(SERVER_ORDER), help=f"default {','.join(SERVER_ORDER)}")
    p.add_argument(
        "--scenarios", default=",".join(SCENARIO_ORDER), help=f"default {','.join(SCENARIO_ORDER)}"
    )
    p.add_argument("--transport", default=None, help="unix,tcp (default both; --quick: unix)")
    p.add_argument("--keepalive", default=None, help="fastcgi_keep_conn off,on (default both; --quick: off)")
    p.add_argument("--workers", type=int, default=4, help="workers per backend (default 4)")
    p.add_argument("--repeat", type=int, default=None, help="interleaved rounds (default 3; --quick: 1)")
    p.add_argument("--duration", type=int, default=None, help="whole seconds per run (default 5; --quick: 2)")
    p.add_argument(
        "--warmup", type=int, default=None, help="seconds of warm-up per server (default 1; --quick: 0)"
    )
    p.add_argument(
        "--connections", type=int, default=None, help="wrk connections (default 4x workers; keepalive 16x)"
    )
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="before each run, wait up to S seconds for the machine to be idle (shared machines)",
    )
    p.add_argument("--keep-temp", action="store_true", help="keep the temp dir with configs and logs")
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="PATH",
        help=f"also measure the fastfpm of the checkout at PATH (built in place there) as {BASELINE}, "
        "next to this tree's, with the same app and scenarios; rounds alternate in order (ABBA)",
    )
    a = p.parse_args(argv)
    baseline = None
    if a.baseline is not None:
        baseline = a.baseline.expanduser().resolve()
        if not (baseline / "fastfpm" / "__init__.py").is_file():
            p.error(f"--baseline {a.baseline}: no fastfpm/__init__.py there (expected a fastfpm checkout)")
    try:
        servers = split_list(a.servers, SERVER_ORDER + ([BASELINE] if baseline else []), "server")
        scenarios = split_list(a.scenarios, SCENARIO_ORDER, "scenario")
        transports = split_list(
            a.transport or ("unix" if a.quick else "unix,tcp"), ["unix", "tcp"], "transport"
        )
        keep = split_list(
            a.keepalive or ("off" if a.quick else "off,on"), ["off", "on"], "keep-alive setting"
        )
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc) + (f"; {BASELINE} needs --baseline PATH" if BASELINE in a.servers else ""))
    if a.workers < 1:
        p.error("--workers must be at least 1")
    if baseline and BASELINE not in servers:
        # Right after the current tree's fastfpm: the two are measured back to back in every round.
        at = servers.index("fastfpm") + 1 if "fastfpm" in servers else 0
        servers.insert(at, BASELINE)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Options(
        servers=servers,
        scenarios=scenarios,
        transports=transports,
        keepalive=[k == "on" for k in keep],
        workers=a.workers,
        repeat=a.repeat if a.repeat is not None else (1 if a.quick else 3),
        duration=max(1, a.duration) if a.duration is not None else (2 if a.quick else 5),
        warmup=max(0, a.warmup) if a.warmup is not None else (0 if a.quick else 1),
        connections=a.connections,
        threads=a.threads,
        wait_quiet=a.wait_quiet,
        out=a.out or BENCH_DIR / "results" / (("quick-" if a.quick else "") + stamp),
        keep_temp=a.keep_temp,
        quick=a.quick,
        baseline=baseline,
    )


def plan_cases(opts: Options) -> list[Case]:
    """Every scenario x transport x keep-alive setting to run (keepalive forces keep-conn on)."""
    cases: list[Case] = []
    for name in opts.scenarios:
        scenario = SCENARIOS[name]
        for transport in opts.transports:
            settings = [True] if scenario.force_keepalive else opts.keepalive
            for keepalive in settings:
                cases.append(Case(scenario, transport, keepalive))
    if opts.quick and "hello" in opts.scenarios and "tcp" not in opts.transports:
        # The smoke run also crosses the TCP and fastcgi_keep_conn paths once, so that neither
        # can break unnoticed between full runs.
        cases.append(Case(SCENARIOS["hello"], "tcp", True))
    return cases


def check_requirements(opts: Options) -> tuple[list[str], dict[str, str]]:
    """Exit when nginx or wrk is missing; return the usable servers and why the others were skipped."""
    fatal = []
    if not _which("nginx"):
        fatal.append(f"nginx not found: {APT_INSTALL} nginx")
    if not _which("wrk"):
        fatal.append(f"wrk not found: {APT_INSTALL} wrk")
    if fatal:
        for line in fatal:
            log(f"error: {line}")
        sys.exit(2)
    if _np is None:
        log("note: numpy not importable, using the statistics module (pip install numpy, or '.[bench]')")
    if importlib.util.find_spec("matplotlib") is None:
        log("note: matplotlib not importable, no charts (pip install matplotlib, or '.[bench]')")
    usable, skipped = [], {}
    for name in opts.servers:
        server = SERVERS[name]
        why = server.check()
        if why:
            skipped[name] = why
            log(f"skip {name}: {why}")
        else:
            usable.append(name)
            if isinstance(server, FastFPM) and (stale := stale_build(server.root)):
                log(f"warning: {name}: the build in {server.root} looks stale: {stale}")
    return usable, skipped


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; 0 when every planned run produced figures, 1 when some failed."""
    opts = parse_args(argv)
    command = "python benchmarks/run.py " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
    atexit.register(REGISTRY.stop_all)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_fatal_signal)
    # Ctrl-C raises KeyboardInterrupt even when started in the background (where SIGINT is ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    if opts.baseline:
        commit = git_commit(opts.baseline)
        label = f"fastfpm@{commit} (baseline)" if commit != "?" else "fastfpm@baseline"
        SERVERS[BASELINE] = FastFPM(opts.baseline, BASELINE, label)
    usable, skipped = check_requirements(opts)
    if not usable:
        log("error: none of the requested servers can run here")
        return 2
    if BASELINE in skipped:
        # Asked for by name: a comparison without it is no comparison.
        log(f"error: the baseline cannot run: {skipped[BASELINE]}")
        return 2
    cases = plan_cases(opts)
    plan = [(case, [n for n in usable if SERVERS[n].supports(case.scenario)]) for case in cases]
    plan = [(case, names) for case, names in plan if names]
    total_runs = sum(len(names) for _, names in plan) * opts.repeat
    per_run = opts.duration + 0.3
    estimate = total_runs * per_run + len(plan) * (2 + opts.warmup * 4)
    log(
        f"{len(plan)} cases, {total_runs} runs of {opts.duration:g} s "
        f"(about {fmt_duration(estimate)}); results go to {opts.out}"
    )
    started = dt.datetime.now().isoformat(timespec="seconds")
    load_at_start = Path("/proc/loadavg").read_text().strip()
    tmp = Path(tempfile.mkdtemp(prefix="fastfpm-bench-"))
    ctx = Context(tmp=tmp, workers=opts.workers, env=python_env())
    done: list[tuple[Case, dict[str, ServerResult]]] = []
    progress = Progress(total_runs, per_run)
    failures = 0
    if os.environ.get("CI") and skipped:
        # .ci/run installs every backend: one that is skipped there is a broken install step,
        # which a green smoke run must not hide.
        log(f"error: CI is set and {', '.join(sorted(skipped))} could not run")
        failures += len(skipped)
    try:
        for name in usable:
            try:
                SERVERS[name].prepare(ctx)
            except RuntimeError as exc:
                log(f"skip {name}: {exc}")
                skipped[name] = str(exc)
                failures += 1 if os.environ.get("CI") else 0
        for case, names in plan:
            names = [n for n in names if n not in skipped]
            if not names:
                continue
            try:
                results = run_case(ctx, opts, case, names, progress)
            except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:
                # One broken case (a wrk that hung, an unreadable report) is a failed case:
                # the others still run, and clean-up happens either way.
                log(f"   ! {case.key} failed: {exc!r}")
                failures += 1
                continue
            failures += sum(1 for r in results.values() if r.status not in ("ok", "not supported"))
            failures += sum(1 for r in results.values() if r.status == "ok" and len(r.samples) < opts.repeat)
            done.append((case, results))
    except KeyboardInterrupt:
        log("\ninterrupted; stopping every server")
        failures += 1
    finally:
        REGISTRY.stop_all()
        if done:
            machine = machine_info()
            machine["load average at the start"] = load_at_start
            path = write_reports(opts, machine, command, skipped, done, started)
            log(f"\nresults: {path} (and results.json, charts) in {opts.out}")
            print(path.read_text())
        if opts.keep_temp:
            log(f"configs and logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
