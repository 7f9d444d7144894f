"""`python -m fastfpm`: serve a WSGI app over FastCGI, send a test request, check a config."""

from __future__ import annotations

import argparse
import os
import sys
from types import SimpleNamespace

from fastfpm import __version__
from fastfpm.app import DEMO_APP


def default_max_children() -> int:
    """Workers when --max-children is not given: two per CPU, at least 2 and at most 32.

    Workers serve one request at a time, so a pool with about twice as many workers as CPUs keeps
    the CPUs busy while some workers wait on I/O (gunicorn recommends 2 x cores + 1 for the same
    reason); the cap keeps a big machine from forking hundreds of copies of an app by default.
    """
    return min(32, max(2, 2 * (os.cpu_count() or 1)))


def parse_octal(text: str) -> int:
    """A file mode as php-fpm's listen.mode writes it: 0660."""
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal mode such as 0660") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fastfpm",
        description="A FastCGI process manager for Python WSGI applications, built the way php-fpm is.",
        epilog="Run `python -m fastfpm serve` for a demo, then point nginx's fastcgi_pass at 127.0.0.1:9000.",
    )
    parser.add_argument("--version", action="version", version=f"fastfpm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = commands.add_parser(
        "serve", help="run a pool of workers serving a WSGI application",
        description="Serve a WSGI application over FastCGI with a pool of pre-forked workers. "
                    "Without MODULE:CALLABLE it serves a built-in demo page.")
    serve.add_argument("app", nargs="?", metavar="MODULE:CALLABLE",
                       help="the WSGI application, e.g. myapp:application (default: the built-in demo)")
    serve.add_argument("--listen", default="127.0.0.1:9000", metavar="ADDR",
                       help="127.0.0.1:9000, [::1]:9000, 9000 (all addresses) or /path/to.sock "
                            "(default: %(default)s, as php-fpm)")
    serve.add_argument("--listen-mode", type=parse_octal, default=0o660, metavar="MODE",
                       help="permissions of a unix socket (default: 0660, as php-fpm)")
    serve.add_argument("--listen-backlog", type=int, default=511, metavar="N",
                       help="listen queue length (default: %(default)s, as php-fpm)")
    serve.add_argument("--pm", choices=["static"], default="static",
                       help="process manager (default: static, a fixed number of workers)")
    serve.add_argument("--max-children", type=int, default=None, metavar="N",
                       help=f"number of workers (default: two per CPU, here {default_max_children()})")
    serve.add_argument("--max-requests", type=int, default=0, metavar="N",
                       help="recycle a worker after N requests (default: 0, never)")
    serve.add_argument("--chdir", metavar="DIR",
                       help="change to DIR before loading the app; DIR is on sys.path")
    serve.add_argument("--mount", default="", metavar="PREFIX",
                       help="serve the app under PREFIX: SCRIPT_NAME=PREFIX, PATH_INFO=the rest")
    serve.add_argument("--idle-timeout", type=float, default=5.0, metavar="SECONDS",
                       help="close a connection that sends no request for this long (default: %(default)s)")
    serve.add_argument("--max-params-size", type=int, default=65536, metavar="BYTES",
                       help="largest total size of a request's FastCGI params (default: %(default)s)")
    serve.add_argument("--log-level", default="notice",
                       choices=["alert", "error", "warning", "notice", "debug"],
                       help="least severe level written to the error log (default: %(default)s)")
    serve.add_argument("--error-log", metavar="FILE", help="append the log to FILE (default: stderr)")
    serve.add_argument("-R", "--allow-to-run-as-root", action="store_true", dest="allow_root",
                       help="allow workers to run as root (as php-fpm's -R)")

    request = commands.add_parser(
        "request", help="send one FastCGI request and print the response (like cgi-fcgi)",
        description="Send one request to a FastCGI server and print the response; the exit status is 0 "
                    "for a 2xx or 3xx response, 1 otherwise.")
    request.add_argument("address", metavar="ADDR", help="127.0.0.1:9000, [::1]:9000 or /path/to.sock")
    request.add_argument("path", nargs="?", default="/",
                         help="request path with an optional ?query (default: /)")
    request.add_argument("-X", "--method", default=None,
                         help="request method (default: GET, or POST with -d)")
    request.add_argument("-d", "--data", help="request body, or @FILE to send a file's contents")
    request.add_argument("-H", "--header", action="append", default=[], metavar="'Name: value'",
                         help="a request header (repeatable)")
    request.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                         help="an extra FastCGI param (repeatable), e.g. SCRIPT_FILENAME=/srv/app.py")
    request.add_argument("-i", "--include", action="store_true", help="print the response headers too")
    request.add_argument("--timeout", type=float, default=30.0, help="seconds to wait (default: %(default)s)")
    return parser


def pool_from_args(args: argparse.Namespace) -> SimpleNamespace:
    """The pool settings the command-line flags describe."""
    max_children = args.max_children if args.max_children is not None else default_max_children()
    return SimpleNamespace(
        name="www", app=args.app or DEMO_APP, listen=args.listen, listen_mode=args.listen_mode,
        listen_backlog=args.listen_backlog, pm="static", pm_max_children=max_children,
        pm_max_requests=args.max_requests, chdir=args.chdir, python_path=[], mount=args.mount,
        idle_timeout=args.idle_timeout, read_timeout=60.0, max_params_size=args.max_params_size,
    )


def serve(args: argparse.Namespace) -> int:
    """The `serve` command."""
    from fastfpm.address import parse_address
    from fastfpm.demo import nginx_snippet
    from fastfpm.log import ErrorLog
    from fastfpm.master import Master

    if args.max_children is not None and args.max_children < 1:
        print("fastfpm: --max-children must be at least 1", file=sys.stderr)
        return 2
    if os.geteuid() == 0 and not args.allow_root:
        if args.app is not None:
            print("fastfpm: refusing to run workers as root; start fastfpm as another user, "
                  "or pass --allow-to-run-as-root (-R) if you really mean it", file=sys.stderr)
            return 2
        # The built-in demo only shows a page, so a first try as root is allowed, with a word.
        print("fastfpm: warning: the demo's workers run as root; an application would need "
              "--allow-to-run-as-root (-R)", file=sys.stderr)
    pool = pool_from_args(args)
    try:
        address = parse_address(pool.listen)
    except ValueError as exc:
        print(f"fastfpm: --listen: {exc}", file=sys.stderr)
        return 2
    log = ErrorLog(args.error_log, args.log_level)
    if args.app is None:
        print(f"Serving the built-in demo on {address}. To see it through nginx:\n", file=sys.stderr)
        print(nginx_snippet(address), file=sys.stderr)
    try:
        master = Master([pool], log)
    except OSError as exc:
        log.alert(f"[pool {pool.name}] cannot listen on {address}: {exc.strerror or exc}")
        return 1
    return master.run()


def request(args: argparse.Namespace) -> int:
    """The `request` command: one FastCGI request, the response on stdout."""
    from fastfpm.address import parse_address
    from fastfpm.client import FastCGIClient, FastCGIError, build_params

    body = b""
    if args.data is not None:
        if args.data.startswith("@"):
            with open(args.data[1:], "rb") as f:
                body = f.read()
        else:
            body = args.data.encode()
    method = args.method or ("POST" if args.data is not None else "GET")
    path, _, query = args.path.partition("?")
    headers = {}
    for line in args.header:
        name, sep, value = line.partition(":")
        if not sep:
            print(f"fastfpm: -H {line!r}: expected 'Name: value'", file=sys.stderr)
            return 2
        headers[name.strip()] = value.strip()
    extra = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"fastfpm: --param {item!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        extra[name] = value
    try:
        address = parse_address(args.address)
        # No body: an empty CONTENT_LENGTH, as nginx sends for a GET.
        params = build_params(method, path, query, headers, len(body) if body else None, extra)
        with FastCGIClient(address, timeout=args.timeout) as client:
            response = client.request(params, body)
    except (OSError, FastCGIError, ValueError) as exc:
        print(f"fastfpm: request to {args.address} failed: {exc}", file=sys.stderr)
        return 1
    if response.stderr:
        sys.stderr.buffer.write(response.stderr)
    if args.include:
        sys.stdout.write(f"Status: {response.status} {response.reason}\r\n")
        for name, value in response.headers:
            sys.stdout.write(f"{name}: {value}\r\n")
        sys.stdout.write("\r\n")
        sys.stdout.flush()
    sys.stdout.buffer.write(response.body)
    sys.stdout.flush()
    return 0 if 200 <= response.status < 400 else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m fastfpm` and the `fastfpm` script."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "request":
        return request(args)
    return 2
