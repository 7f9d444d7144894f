"""Instructions a worker spends per request, counted by callgrind: the steady figure to compare builds.

One in-process Worker (a scoreboard slot, benchmarks.apps:hello) serves N requests of nginx's params
(benchmarks/micro/nginx_request.py) on a unix socket to a client in another, untraced process; the
worker's user-space instructions are counted for N = 1200 and N = 200, and the difference over
1000 requests is the per-request figure (start-up and import cancel out). System calls are counted
as the instructions that enter them: what the kernel spends inside is not in the figure (time
those apart, as benchmarks/cpu_clocks.c does for getrusage).

    python benchmarks/callgrind_request.py                    # this tree's build
    PYTHONPATH=/path/to/other/tree python benchmarks/callgrind_request.py --label other
    python benchmarks/callgrind_request.py --keep-conn         # one kept connection for all
    python benchmarks/callgrind_request.py --stages            # only the scoreboard writes

The whole request's count moves by about 3% between runs of the same build (how often accept() or
recv() finds nothing yet depends on timing); --stages counts SlotWriter.bench's loop instead (a
request's slot writes, no I/O), which is exact to the instruction.

Needs valgrind. Takes about a minute per run on a small machine.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL, LARGE = 200, 1200


def serve(path: str, requests: int) -> None:
    """The traced side: a worker serving `requests` requests on a unix socket at path, then exit."""
    from benchmarks.apps import hello
    from fastfpm import _core
    from fastfpm._core import Worker
    from fastfpm.log import ErrorLog
    from fastfpm.scoreboard import Scoreboard
    from fastfpm.worker import environ_template

    class Pool:
        name = "bench"

    Path(path + ".build").write_text(_core.__file__)  # which build this run measures
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(64)
    board = Scoreboard(1, "bench")
    board.claim(0, os.getpid())
    log = ErrorLog(None, "alert")
    Worker(listener.fileno(), hello, environ_template=environ_template(Pool), log=log.log,
           log_exception=log.exception, scoreboard=board.mapping, slot_index=0,
           max_requests=requests).serve()


def client(path: str, requests: int, keep_conn: bool) -> None:
    """The untraced side: `requests` GETs as nginx sends them, each read to its END_REQUEST."""
    from benchmarks.micro.nginx_request import request_bytes

    end = bytes([1, 3])  # version 1, FCGI_END_REQUEST: a record header's first two bytes
    sock = None
    for i in range(requests):
        if sock is None:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect(path)
        sock.sendall(request_bytes(1, keep_conn=keep_conn))
        answer = b""
        while end not in answer:  # the hello answer is one small send: END_REQUEST ends it
            data = sock.recv(65536)
            if not data:
                raise SystemExit(f"the worker closed the connection at request {i}")
            answer += data
        if not keep_conn:
            sock.close()
            sock = None
    if sock is not None:
        sock.close()


def environment() -> dict[str, str]:
    """PYTHONPATH first (the tree to measure), then this one (for benchmarks.apps); a fixed hash
    seed, or start-up's instruction count moves by some 100,000 from run to run."""
    return dict(os.environ, PYTHONHASHSEED="0",
                PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)])))


def count(requests: int, keep_conn: bool, workdir: Path) -> tuple[int, str]:
    """Instructions of one traced worker serving `requests` requests, and the _core it imported."""
    path = str(workdir / f"w{requests}.sock")
    out = workdir / f"callgrind.{requests}"
    env = environment()
    worker = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                               sys.executable, __file__, "--serve", path, str(requests)],
                              env=env, stderr=subprocess.DEVNULL)
    while not os.path.exists(path):
        if worker.poll() is not None:
            raise SystemExit("the traced worker exited before listening")
        os.sched_yield()
    subprocess.run([sys.executable, __file__, "--client", path, str(requests)]
                   + (["--keep-conn"] if keep_conn else []), env=env, check=True)
    if worker.wait() != 0:
        raise SystemExit(f"the traced worker exited with {worker.returncode}")
    match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
    assert match, "no total in the callgrind output"
    return int(match.group(1)), Path(path + ".build").read_text()


def stages(rounds: int) -> None:
    """The traced side of --stages: a request's scoreboard writes, rounds times."""
    from fastfpm import _core

    Path(os.environ["FFPM_BUILD_FILE"]).write_text(_core.__file__)
    _core.SlotWriter().bench(rounds)


def count_stages(rounds: int, workdir: Path) -> tuple[int, str]:
    """Instructions of one traced process writing rounds requests' stages."""
    out = workdir / f"callgrind.stages.{rounds}"
    build = workdir / "stages.build"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__,
                    "--stages-run", str(rounds)], env=dict(environment(), FFPM_BUILD_FILE=str(build)),
                   stderr=subprocess.DEVNULL, check=True)
    match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
    assert match, "no total in the callgrind output"
    return int(match.group(1)), build.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep-conn", action="store_true", help="one FCGI_KEEP_CONN connection")
    parser.add_argument("--stages", action="store_true", help="count only the scoreboard writes")
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--stages-run", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--client", nargs=2, metavar=("PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve[0], int(args.serve[1]))
        return
    if args.client:
        client(args.client[0], int(args.client[1]), args.keep_conn)
        return
    if args.stages_run:
        stages(args.stages_run)
        return
    if args.stages:
        with tempfile.TemporaryDirectory() as tmp:
            (small, measured), (large, _) = count_stages(1000, Path(tmp)), count_stages(101000, Path(tmp))
        print(f"{args.label} ({measured}): {(large - small) / 100000:,.1f} instructions per request's "
              f"scoreboard writes (Ir(101000) - Ir(1000)) / 100000")
        return
    with tempfile.TemporaryDirectory() as tmp:
        (small, measured), (large, _) = count(SMALL, args.keep_conn, Path(tmp)), count(LARGE, args.keep_conn,
                                                                                         Path(tmp))
    per_request = (large - small) / (LARGE - SMALL)
    print(f"{args.label} ({measured}), keep_conn {'on' if args.keep_conn else 'off'}: "
          f"{per_request:,.0f} instructions per request (Ir({LARGE}) - Ir({SMALL})) / {LARGE - SMALL}")


if __name__ == "__main__":
    main()
