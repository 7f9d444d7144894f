#!/usr/bin/env python3
"""Idle worker memory and worker start time, with and without preload = yes (issue 12).

    python benchmarks/preload.py                 # PSS of every case, then start times
    python benchmarks/preload.py --starts 50     # more start-time samples

Memory: each server runs 4 static workers on a unix socket; requests go straight to the pool over
FastCGI until every worker has served at least one (the status page, ?json&full, says who served
what); then each worker's Pss (and Private_*, its USS) is read from /proc/PID/smaps_rollup. Cases:
a bare WSGI hello (benchmarks.apps:hello) and a Flask hello (benchmarks.flask_hello:app), each
without and with preload, the Flask hello warmed at import with preload (benchmarks.flask_warm),
and php-fpm 8.2 with opcache serving benchmarks/php/hello.php, all in the same run. The template's
own PSS is printed beside the workers' (it holds a share of the pages they share with it).

Start time: this script acts as the master. It builds the pool as the master does (fastfpm.pool),
asks the spawner (fastfpm.template.PreloadSpawner) for a worker in a free slot, and times from the
request to the slot leaving Starting (the worker is in its accept loop, after on_worker_start),
polling the scoreboard every 50 µs; then the worker is stopped and reaped. The first spawn with
preload starts the template (the app's import), printed apart; without preload every start
imports the app in the new worker.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
from fastfpm.client import FastCGIClient, build_params  # noqa: E402

WORKERS = 4
READY = "ready to handle connections"
PHP_FPM = "php-fpm8.2"
for _sbin in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
    if _sbin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + _sbin

POOL = """[global]
error_log = {dir}/error.log
[bench]
listen = {dir}/fpm.sock
app = {app}
python_path = {repo}
preload = {preload}
pm = static
pm.max_children = {workers}
pm.status_path = /status
"""

PHP_POOL = """[global]
pid = {dir}/php-fpm.pid
error_log = {dir}/error.log
daemonize = no
[bench]
{user}listen = {dir}/fpm.sock
pm = static
pm.max_children = {workers}
pm.status_path = /status
php_admin_value[opcache.enable] = 1
"""


def smaps(pid: int) -> dict[str, int]:
    """The kB figures of /proc/PID/smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


def children(pid: int) -> list[int]:
    """Live children of pid."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != b"Z":
                found.append(int(entry))
    return sorted(found)


def title(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def start(argv: list[str], work: Path, ready: Callable[[], bool]) -> subprocess.Popen[bytes]:
    """Start a server; return once ready() says so."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    with open(work / "out.log", "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 30
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{argv[0]} did not start:\n{(work / 'out.log').read_text(errors='replace')}")
        time.sleep(0.05)
    return proc


def serve_everyone(address: str, extra: dict[str, str], workers: set[int]) -> dict[int, int]:
    """Requests until every worker in workers has served one (from the status page); pid -> count."""
    def hello() -> None:
        FastCGIClient(address, timeout=10).request(build_params("GET", "/", extra=extra))

    served: dict[int, int] = {}
    for _ in range(50):
        threads = [threading.Thread(target=hello) for _ in range(2 * WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        status = FastCGIClient(address, timeout=10).request(
            build_params("GET", "/status", "json&full", extra={**extra, "SCRIPT_NAME": "/status"}))
        served = {p["pid"]: p["requests"] for p in json.loads(status.body)["processes"]}
        # The status request itself counts for the worker that answered it.
        if set(served) >= workers and all(served[p] >= 2 for p in workers):
            return served
    raise SystemExit(f"not every worker served a request: {served}")


def measure_fastfpm(app: str, preload: str, work: Path) -> dict[str, float]:
    """Idle worker PSS/USS of one fastfpm case (kB, averaged over the workers)."""
    conf = work / "fpm.conf"
    conf.write_text(POOL.format(dir=work, app=app, repo=REPO, preload=preload, workers=WORKERS))
    proc = start([sys.executable, "-m", "fastfpm", "serve", "-c", str(conf), "-R"], work,
                 lambda: (work / "error.log").exists() and READY in (work / "error.log").read_text())
    try:
        kids = children(proc.pid)
        template = [p for p in kids if "template" in title(p)]
        workers = set(kids) - set(template)
        serve_everyone(str(work / "fpm.sock"), {}, workers)
        time.sleep(0.5)
        return summarise(workers, template, proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def measure_php(work: Path) -> dict[str, float] | None:
    """Idle worker PSS/USS of php-fpm with opcache serving hello.php."""
    if not shutil.which(PHP_FPM):
        return None
    conf = work / "php-fpm.conf"
    user = "user = root\ngroup = root\n" if os.geteuid() == 0 else ""
    conf.write_text(PHP_POOL.format(dir=work, workers=WORKERS, user=user))
    argv = [PHP_FPM, "-F", "-y", str(conf), "-d", "opcache.enable=1", *(["-R"] if os.geteuid() == 0 else [])]
    proc = start(argv, work, lambda: (work / "fpm.sock").exists())
    try:
        time.sleep(0.3)
        workers = set(children(proc.pid))
        extra = {"SCRIPT_FILENAME": str(BENCH / "php" / "hello.php"), "SCRIPT_NAME": "/hello.php"}
        serve_everyone(str(work / "fpm.sock"), extra, workers)
        time.sleep(0.5)
        return summarise(workers, [], proc.pid)
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(10)


def summarise(workers: set[int], template: list[int], master: int) -> dict[str, float]:
    figures = [smaps(pid) for pid in workers]
    return {
        "pss": statistics.mean(f["Pss"] for f in figures),
        "uss": statistics.mean(f["Private_Clean"] + f["Private_Dirty"] for f in figures),
        "rss": statistics.mean(f["Rss"] for f in figures),
        "template": smaps(template[0])["Pss"] if template else 0,
        "master": smaps(master)["Pss"],
    }


def start_times(app: str, preload: bool, rounds: int, work: Path) -> tuple[float | None, list[float]]:
    """(the template's start, None without preload; each worker start) in ms, this script as master."""
    from fastfpm.config import load
    from fastfpm.log import ErrorLog
    from fastfpm.pool import Pool
    from fastfpm.scoreboard import STAGE_STARTING
    from fastfpm.stdio import WorkerOutput
    from fastfpm.template import PreloadSpawner
    from fastfpm.watcher import Watcher

    conf = work / "start.conf"
    conf.write_text(POOL.format(dir=work, app=app, repo=REPO, preload="yes" if preload else "no",
                                workers=1).replace("[bench]", "[start]"))
    config = load(conf)
    log = ErrorLog(str(work / "start.log"), "notice")
    pool = Pool(config.pools[0], log, 1)
    output = WorkerOutput(Watcher(), lambda: log)
    spawner = PreloadSpawner(lambda keep: None, output, lambda: [SimpleNamespace(pools=[pool])])
    template_ms = None
    samples = []
    try:
        for i in range(rounds + (1 if preload else 0)):
            slot = pool.scoreboard.free_index()
            pool.scoreboard.claim(slot, 0, 1)
            begun = time.perf_counter()
            if preload and i == 0:
                template = spawner.start_template(pool, log)
                template_ms = (time.perf_counter() - begun) * 1000
                assert template is not None, (work / "start.log").read_text()
                begun = time.perf_counter()
            pid, pipes = spawner.start(pool, slot, log)
            pool.scoreboard.set_pid(slot, pid)
            while pool.scoreboard.read(slot).stage == STAGE_STARTING:
                time.sleep(0.00005)
            samples.append((time.perf_counter() - begun) * 1000)
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
            for fd in pipes:
                os.close(fd)
            pool.scoreboard.release(slot)
    finally:
        spawner.close()
        pool.close()
    return template_ms, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--starts", type=int, default=30, help="worker starts timed per case")
    args = parser.parse_args()
    cases = [("bare hello", "benchmarks.apps:hello"), ("Flask hello", "benchmarks.flask_hello:app")]
    # The same Flask app serving itself a few requests at import (benchmarks/flask_warm.py): with
    # preload that happens once, in the template.
    memory_cases = [*((label, app, p) for label, app in cases for p in ("no", "yes")),
                    ("Flask hello warmed at import", "benchmarks.flask_warm:app", "yes")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, app, preload in memory_cases:
            work = Path(tempfile.mkdtemp(dir=tmp))
            rows.append((f"fastfpm, {label}, preload {preload}", measure_fastfpm(app, preload, work)))
        php = measure_php(Path(tempfile.mkdtemp(dir=tmp)))
        if php is not None:
            rows.append(("php-fpm 8.2 + opcache, hello.php", php))
        print(f"Idle worker memory, {WORKERS} workers, after serving a request each (kB, mean per worker)")
        print("| case | PSS | USS | RSS | template PSS | master PSS | PSS vs php-fpm |")
        print("|---|---|---|---|---|---|---|")
        for label, r in rows:
            ratio = f"{r['pss'] / php['pss']:.2f}x" if php else "-"
            print(f"| {label} | {r['pss']:.0f} | {r['uss']:.0f} | {r['rss']:.0f} | {r['template'] or '-'} | "
                  f"{r['master']} | {ratio} |")
        print()
        print(f"Worker start, from the spawn request to the slot leaving Starting ({args.starts} starts, ms)")
        print("| case | template start | min | median | p90 | max |")
        print("|---|---|---|---|---|---|")
        for label, app in cases:
            for preload in (False, True):
                work = Path(tempfile.mkdtemp(dir=tmp))
                template_ms, s = start_times(app, preload, args.starts, work)
                s.sort()
                shown = f"{template_ms:.1f}" if template_ms is not None else "-"
                print(f"| {label}, preload {'yes' if preload else 'no'} | {shown} | {s[0]:.2f} | "
                      f"{statistics.median(s):.2f} | {s[int(0.9 * (len(s) - 1))]:.2f} | {s[-1]:.2f} |")


if __name__ == "__main__":
    main()
