"""`python -m fastfpm`: serve a WSGI app over FastCGI, send a test request, check a config, watch a pool."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from fastfpm import NotBuiltError, __version__
from fastfpm.config import DIRECTIVES, Bool, Choice, Directive

if TYPE_CHECKING:
    from fastfpm.config import Config


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
                    "Without MODULE:CALLABLE it serves a built-in demo page. With -c, pools come from a "
                    "php-fpm style configuration file, and the flags given override every pool's values.",
        epilog="Every directive of the configuration file is listed in docs/configuration.md.")
    serve.add_argument("app", nargs="?", metavar="MODULE:CALLABLE",
                       help="the WSGI application, e.g. myapp:application, or script: with --script-root "
                            "(script mode; default: the built-in demo)")
    serve.add_argument("-c", "--config", metavar="FILE", help="php-fpm style configuration file")
    serve.add_argument("-p", "--prefix", metavar="DIR", help="base for relative paths in the configuration")
    serve.add_argument("-t", "--test", action="count", default=0,
                       help="check the configuration and exit; -tt also prints the effective configuration")
    serve.add_argument("-R", "--allow-to-run-as-root", action="store_true", dest="allow_root",
                       help="allow workers to run as root (as php-fpm's -R)")
    add_directive_flags(serve)

    check = commands.add_parser("check", help="check a configuration file (as serve -t)",
                                description="Check a configuration file; errors are printed as "
                                            "file:line: message and the exit status is 1.")
    check.add_argument("-c", "--config", metavar="FILE", required=True, help="configuration file")
    check.add_argument("-p", "--prefix", metavar="DIR", help="base for relative paths")
    check.add_argument("-R", "--allow-to-run-as-root", action="store_true", dest="allow_root",
                       help="check as serve -R would run: workers may run as root")

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
    add_status_commands(commands)
    return parser


def add_status_commands(commands: Any) -> None:
    """`status` and `top`: clients of a pool's status page (pm.status_path), fastfpm's or php-fpm's."""
    from fastfpm.statuscli import DEFAULT_PATH, FORMATS

    status = commands.add_parser(
        "status", help="print a pool's status page (pm.status_path)",
        description="Fetch a pool's status page over FastCGI and print it; the exit status is 1 when "
                    "nothing answers or the answer is not 200. Works against php-fpm too.")
    top = commands.add_parser(
        "top", help="a live view of a pool's workers, from its status page",
        description="Show a pool's counters and a row per worker, the longest request first, refreshed "
                    "every --interval seconds from the status page (pm.status_path). q or Ctrl-C quits.")
    for command in (status, top):
        command.add_argument("address", metavar="ADDR", help="127.0.0.1:9000, [::1]:9000 or /path/to.sock")
        command.add_argument("--path", default=DEFAULT_PATH,
                             help="the pool's pm.status_path (default: %(default)s)")
        command.add_argument("--timeout", type=float, default=10.0,
                             help="seconds to wait for the page (default: %(default)s)")
    status.add_argument("--full", action="store_true", help="a section per process too (?full)")
    status.add_argument("--format", choices=FORMATS, default="text", help="the page's format (default: text)")
    top.add_argument("--interval", type=float, default=1.0,
                     help="seconds between refreshes (default: %(default)s)")


# serve's flags that set directives: each comes from its Directive's cli= in fastfpm.config, so the
# flag, its default in --help and the directive cannot drift apart.
DIRECTIVE_FLAG_GROUPS = (("pool", "pool options (override the configuration file)"),
                         ("global", "global options"))


def add_directive_flags(serve: argparse.ArgumentParser) -> None:
    """Add a flag to serve for every directive declared with cli=, pool ones first, in the table's order.

    A flag's default is None (not given: the file's value or the directive's default applies); its
    help is the directive's doc and default.
    """
    for section, title in DIRECTIVE_FLAG_GROUPS:
        group = serve.add_argument_group(title)
        for directive in DIRECTIVES:
            if directive.cli and directive.section == section:
                group.add_argument(*directive.cli, **directive_flag_arguments(directive))


def directive_flag_arguments(directive: Directive) -> dict[str, Any]:
    """argparse's add_argument keywords for a directive's flag: a boolean is a switch meaning yes, a
    choice lists its words, anything else takes a value parsed as the file's text would be."""
    arguments: dict[str, Any] = {"help": directive.cli_help()}
    if isinstance(directive.type, Bool):
        arguments.update(action="store_const", const="yes")
    elif isinstance(directive.type, Choice):
        arguments["choices"] = list(directive.type.choices)
    else:
        arguments["metavar"] = directive.cli_metavar
    return arguments


# The names argparse gives the directive flags' values, as config.apply_options takes them.
OPTION_FLAGS = tuple(directive.cli_dest for directive in DIRECTIVES if directive.cli)


def load_config(args: argparse.Namespace) -> tuple[Config, dict[str, Any]]:
    """The configuration serve runs: the file (if any) with the command line's flags on top."""
    from fastfpm import config as config_module

    options = {name: getattr(args, name, None) for name in OPTION_FLAGS}
    options = {k: v for k, v in options.items() if v is not None}
    app = getattr(args, "app", None)
    if args.config is None:
        return config_module.from_cli(app, **options), options
    if app is not None:
        options["app"] = app
    loaded = config_module.load(args.config, prefix=args.prefix)
    return config_module.check(config_module.apply_options(loaded, options)), options


def identity_problems(config: Any, allow_root: bool) -> tuple[dict[str, Any], list[str]]:
    """Each pool's worker identity, and what stops the workers from starting (unknown users, root).

    Shared by serve and the configuration test, so a file that `serve` refuses fails `-t` too.
    Notices that do not stop anything (user ignored when not root) are printed here.
    """
    from fastfpm.process import resolve_identities

    identities, problems, notices = resolve_identities(config.pools, allow_root)
    for level, message in notices:
        print(f"fastfpm: {level}: {message}", file=sys.stderr)
    return identities, problems


def check(args: argparse.Namespace) -> int:
    """The `check` command (and serve -t): report every error as file:line: message."""
    from fastfpm.config import run_check

    demo = args.config is None and getattr(args, "app", None) is None
    allow_root = getattr(args, "allow_root", False) or demo

    def refusals(config: Config) -> list[str]:
        return identity_problems(config, allow_root)[1]

    return run_check(lambda: load_config(args)[0], args.config, show=getattr(args, "test", 0) >= 2,
                     refusals=refusals)


def serve(args: argparse.Namespace) -> int:
    """The `serve` command."""
    from fastfpm.config import ConfigError
    from fastfpm.demo import nginx_snippet
    from fastfpm.log import ErrorLog
    from fastfpm.master import Master

    if args.test:
        return check(args)
    try:
        config, options = load_config(args)
    except ConfigError as exc:
        for problem in exc.errors:
            print(problem, file=sys.stderr)
        return 1
    from fastfpm.process import SetupError, prepare_master

    demo = args.config is None and args.app is None
    # The built-in demo only shows a page, so a first try as root is allowed, with a word.
    allow_root = args.allow_root or demo
    identities, problems = identity_problems(config, allow_root)
    if problems:
        for problem in problems:
            print(f"fastfpm: {problem}", file=sys.stderr)
        return 2
    if demo and os.geteuid() == 0 and not args.allow_root:
        print("fastfpm: warning: the demo's workers run as root; an application would need "
              "--allow-to-run-as-root (-R)", file=sys.stderr)
    g = config.global_
    try:
        log = ErrorLog.from_global(g)
    except OSError as exc:
        # php-fpm's words (fpm_stdio_open_error_log); nothing has started yet.
        print(f"fastfpm: failed to open error_log ({g.error_log}): {exc.strerror or exc}", file=sys.stderr)
        return 1
    for warning in config.warnings:
        log.warning(warning)
    try:
        for level, message in prepare_master(g):
            log.log(level, message)
    except SetupError as exc:
        log.alert(str(exc))
        return 1
    if demo:
        from fastfpm.address import parse_address

        print(f"Serving the built-in demo on {config.pools[0].listen}. To see it through nginx:\n",
              file=sys.stderr)
        print(nginx_snippet(parse_address(config.pools[0].listen)), file=sys.stderr)
    from fastfpm.systemd import listen_fds_with_names

    try:
        inherited = listen_fds_with_names()  # socket activation: LISTEN_FDS from systemd
        # allow_root and prefix go along: a reload reads the file again and applies the same rules.
        master = Master(config, log, config_path=args.config, cli_options=options, identities=identities,
                        inherited_sockets=inherited, allow_root=allow_root, prefix=args.prefix)
    except ValueError as exc:  # LISTEN_FDS that make no sense
        log.alert(f"socket activation: {exc}")
        return 1
    except OSError as exc:
        log.alert(f"cannot listen: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return 1
    if g.daemonize:
        if g.error_log is None:
            log.warning("daemonize is on but error_log is unset: the log goes to /dev/null")
        return daemonize(master)
    return master.run()


def daemonize(master: Any) -> int:
    """php-fpm's daemonize: detach, and let the starting process exit 0 only once the master in the
    background is ready (1 if it failed), so init scripts see a start that really worked."""
    ready_r, ready_w = os.pipe()
    if os.fork():
        os.close(ready_w)
        started = os.read(ready_r, 1) == b"1"
        return 0 if started else 1
    os.close(ready_r)
    os.setsid()
    if os.fork():
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)

    def tell_ready() -> None:
        os.write(ready_w, b"1")
        os.close(ready_w)

    master.on_ready = tell_ready
    os._exit(master.run())


def split_items(items: list[str], separator: str, flag: str, form: str) -> dict[str, str]:
    """`Name: value` or `NAME=VALUE` command-line items as a dict; ValueError names the bad one."""
    parsed = {}
    for item in items:
        name, sep, value = item.partition(separator)
        if not sep:
            raise ValueError(f"{flag} {item!r}: expected {form}")
        parsed[name.strip()] = value.strip()
    return parsed


def request(args: argparse.Namespace) -> int:
    """The `request` command: one FastCGI request, the response on stdout."""
    from fastfpm.address import parse_address
    from fastfpm.client import FastCGIClient, FastCGIError, build_params

    body = b""
    if args.data is not None:
        if args.data.startswith("@"):
            try:
                with open(args.data[1:], "rb") as f:
                    body = f.read()
            except OSError as exc:
                print(f"fastfpm: cannot read the request body from {args.data[1:]}: {exc.strerror}",
                      file=sys.stderr)
                return 2
        else:
            body = args.data.encode()
    method = args.method or ("POST" if args.data is not None else "GET")
    path, _, query = args.path.partition("?")
    try:
        headers = split_items(args.header, ":", "-H", "'Name: value'")
        extra = split_items(args.param, "=", "--param", "NAME=VALUE")
    except ValueError as exc:
        print(f"fastfpm: {exc}", file=sys.stderr)
        return 2
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
    try:
        if args.command == "serve":
            return serve(args)
        if args.command == "request":
            return request(args)
        if args.command == "check":
            return check(args)
        if args.command == "status":
            from fastfpm.statuscli import run_status

            return run_status(args.address, args.path, args.format, args.full, args.timeout)
        if args.command == "top":
            from fastfpm.top import run_top

            return run_top(args.address, args.path, args.interval, args.timeout)
    except NotBuiltError as exc:
        print(f"fastfpm: {exc}", file=sys.stderr)
        return 2
    return 2
