"""fastfpm's configuration: php-fpm's INI format, one table of directives, and the typed result.

Every directive is declared once, in DIRECTIVES below (name, section, type, default, one-line doc,
a note where fastfpm is not php-fpm, and serve's command-line flag if it has one). Everything else
is derived from that table: the parser, the checks behind `python -m fastfpm check` / `serve -t`,
the `serve -tt` dump (`dump`), the GlobalConfig / PoolConfig classes, serve's directive flags with
their help (fastfpm.cli), and docs/configuration.md (`render_markdown`).

The public API:

    load(path, *, environ=os.environ, prefix=None) -> Config     read a file (and its includes)
    from_cli(app=None, /, **options) -> Config                    the same objects without a file
    apply_options(config, options, source=...)                    command-line flags over a Config
    check(config) -> Config                                       validate, derive, resolve paths
    dump(config) -> str                                           the effective config, as INI
    render_markdown() -> str                                      the reference page
    run_check(build, path, ...) -> exit status                    the test of check / serve -t

Errors are collected, never stopped at, and raised together as ConfigError(errors) where each error
reads `file:line: message`.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import grp
import ipaddress
import os
import pwd
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fastfpm.address import MAX_KEEPALIVE_COUNT, MAX_KEEPALIVE_SECONDS

__all__ = [
    "ConfigError", "Config", "GlobalConfig", "PoolConfig", "Directive", "DIRECTIVES",
    "load", "from_cli", "apply_options", "check", "dump", "render_markdown", "default_max_children",
    "PHP_SETTINGS_MESSAGE", "run_check", "CheckWording", "main",
]

# Where values set in code or by command-line flags say they came from.
CLI_SOURCE = "command line"

# php-fpm stops at 5 nested files (fpm_conf_load_ini_file); fastfpm reports cycles by name and allows
# a little more depth, since a cycle, not depth, is what usually goes wrong.
MAX_INCLUDE_DEPTH = 10

PHP_SETTINGS_MESSAGE = ("PHP settings have no meaning for a Python app; put the setting in your app's "
                        "config or env[...]")
_NO_ACL = "POSIX ACLs on the socket are not supported; use listen.owner, listen.group and listen.mode."
NOT_YET = "not supported yet (a later fastfpm release implements it); remove it for now"

# The connection timeouts are waits the worker hands to poll() in milliseconds, as a C int.
MAX_CONNECTION_TIMEOUT = 86400.0

DEMO_APP = "fastfpm.demo:application"  # the same string as fastfpm.app.DEMO_APP
SCRIPT_APP = "script:"                  # script mode; the same string as fastfpm.script.SCRIPT_APP


class ConfigError(Exception):
    """The configuration is unusable; .errors holds every problem found, each as `file:line: message`."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors: list[str] = list(errors)
        super().__init__("\n".join(self.errors))


def default_max_children() -> int:
    """pm.max_children when nothing sets it: two workers per CPU, at least 2, at most 32.

    Workers serve one request at a time, so about twice as many as CPUs keeps the CPUs busy while
    some wait on I/O; the cap stops a large machine from forking hundreds of app copies by default.
    """
    return min(32, max(2, 2 * (os.cpu_count() or 1)))


# ---------------------------------------------------------------------------------------------------
# Value types: each turns the text of an INI value into a typed value (parse), accepts a value set in
# code (check), and writes a value back as INI text (format). ValueError carries the reason.

class ValueType:
    """A directive's value type; the base class is a plain string."""

    label = "string"
    pytype: Any = str
    metavar: str | None = "VALUE"  # a command-line flag's placeholder in --help (None: choices or no value)

    def parse(self, text: str) -> Any:
        """The typed value of an INI value's text."""
        return text

    def check(self, value: Any) -> Any:
        """A value set in code: strings are parsed, other values checked and normalised."""
        if isinstance(value, str):
            return self.parse(value)
        return self.check_value(value)

    def check_value(self, value: Any) -> Any:
        raise ValueError(f"expected {self.label}, not {type(value).__name__}")

    def format(self, value: Any) -> str:
        """The value as INI text that parses back to the same value."""
        return str(value)


class Str(ValueType):
    """Any text."""


class Path(ValueType):
    """A file or directory; relative paths are resolved against the prefix (see check())."""

    label = "path"
    metavar = "FILE"

    def parse(self, text: str) -> str:
        if "\0" in text:
            raise ValueError("a path cannot contain a NUL byte")
        return text


class LogTarget(Path):
    """error_log: a file, or `syslog`."""

    label = "path or `syslog`"

    def parse(self, text: str) -> str:
        return "syslog" if text.lower() == "syslog" else super().parse(text)


class Int(ValueType):
    """An integer, optionally bounded."""

    pytype = int
    metavar = "N"

    def __init__(self, minimum: int | None = None, maximum: int | None = None) -> None:
        self.minimum, self.maximum = minimum, maximum

    @property
    def label(self) -> str:  # type: ignore[override]
        if self.minimum is not None and self.maximum is not None:
            return f"integer, {self.minimum} to {self.maximum}"
        if self.minimum is not None:
            return f"integer >= {self.minimum}"
        return "integer"

    def parse(self, text: str) -> int:
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise ValueError("expected a whole number")
        return self.check_value(int(text))

    def check_value(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, not {type(value).__name__}")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"must be at least {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"must be at most {self.maximum}")
        return value


class Time(ValueType):
    """Seconds, written as php-fpm writes them: 30, 30s, 5m, 1h, 1d (a plain number is seconds).

    php-fpm takes whole numbers only; fastfpm also takes fractions (0.5s), stored as float seconds.
    """

    label = "time (s, m, h, d; plain number = seconds)"
    pytype = float
    metavar = "TIME"
    _UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

    def parse(self, text: str) -> float:
        match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([smhdSMHD]?)", text)
        if not match:
            raise ValueError("expected a time such as 30, 30s, 5m, 1h or 1d")
        return float(match.group(1)) * self._UNITS[match.group(2).lower()]

    def check_value(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected seconds, not {type(value).__name__}")
        if value < 0:
            raise ValueError("a time cannot be negative")
        return float(value)

    def format(self, value: float) -> str:
        if value == 0:
            return "0"
        return f"{int(value)}s" if value == int(value) else f"{value:g}s"


class Seconds(Time):
    """A time in whole seconds within bounds (Time's syntax: 75, 75s, 2m), for kernel options that
    take integer seconds (TCP_KEEPIDLE, TCP_KEEPINTVL): a fraction would be cut silently, so refuse it."""

    def __init__(self, minimum: int, maximum: int) -> None:
        self.minimum, self.maximum = minimum, maximum

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"whole seconds, {self.minimum}s to {self.maximum}s (s, m, h; plain number = seconds)"

    def parse(self, text: str) -> float:
        return self.check_value(super().parse(text))

    def check_value(self, value: Any) -> float:
        seconds = super().check_value(value)
        if seconds != int(seconds):
            raise ValueError(f"must be whole seconds, not {seconds:g}s")
        if not self.minimum <= seconds <= self.maximum:
            raise ValueError(f"must be from {self.minimum}s to {self.maximum}s")
        return seconds


class Bool(ValueType):
    """yes/no, on/off, true/false, 1/0 (case-insensitive); an empty value is no, as in php's INI."""

    label = "boolean"
    pytype = bool
    metavar = None  # a flag that takes no value: giving it means yes
    _TRUE = {"1", "yes", "on", "true"}
    _FALSE = {"", "0", "no", "off", "false", "none"}

    def parse(self, text: str) -> bool:
        word = text.strip().lower()
        if word in self._TRUE:
            return True
        if word in self._FALSE:
            return False
        raise ValueError("expected yes/no, on/off, true/false or 1/0")

    def check_value(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(f"expected a boolean, not {type(value).__name__}")

    def format(self, value: bool) -> str:
        return "yes" if value else "no"


class Size(ValueType):
    """Bytes, with php's shorthand suffixes K, M, G (powers of 1024)."""

    label = "size (bytes; K, M, G suffixes)"
    pytype = int
    metavar = "BYTES"
    _UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}

    def __init__(self, minimum: int = 0) -> None:
        self.minimum = minimum

    def parse(self, text: str) -> int:
        match = re.fullmatch(r"([0-9]+)\s*([kKmMgG]?)(?:i?[bB])?", text)
        if not match:
            raise ValueError("expected a size such as 65536, 64K or 1M")
        return self.check_value(int(match.group(1)) * self._UNITS[match.group(2).lower()])

    def check_value(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a number of bytes, not {type(value).__name__}")
        if value < self.minimum:
            raise ValueError(f"must be at least {self.format(self.minimum)}")
        return value

    def format(self, value: int) -> str:
        for suffix, unit in (("G", 1024 ** 3), ("M", 1024 ** 2), ("K", 1024)):
            if value and value % unit == 0:
                return f"{value // unit}{suffix}"
        return str(value)


class Choice(ValueType):
    """One word out of a fixed list (case-insensitive), with optional aliases."""

    metavar = None  # --help shows the choices

    def __init__(self, *choices: str, aliases: Mapping[str, str] | None = None) -> None:
        self.choices = choices
        self.aliases = dict(aliases or {})

    @property
    def label(self) -> str:  # type: ignore[override]
        return " | ".join(self.choices)

    def parse(self, text: str) -> str:
        word = text.strip().lower()
        word = self.aliases.get(word, word)
        if word not in self.choices:
            raise ValueError(f"expected one of {', '.join(self.choices)}")
        return word


class Mode(ValueType):
    """A file mode in octal, as chmod writes it: 0660."""

    label = "octal mode"
    pytype = int
    metavar = "MODE"

    def parse(self, text: str) -> int:
        if not re.fullmatch(r"0?[0-7]{1,4}", text):
            raise ValueError("expected an octal file mode such as 0660")
        return int(text, 8)

    def check_value(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o7777:
            raise ValueError("expected a file mode between 0 and 07777")
        return value

    def format(self, value: int) -> str:
        return f"0{value:o}" if value else "0"


class Rlimit(ValueType):
    """A resource limit: a number >= 0, or `unlimited` (stored as -1, RLIM_INFINITY)."""

    label = "integer >= 0 or `unlimited`"
    pytype = int

    def parse(self, text: str) -> int:
        if text.strip().lower() == "unlimited":
            return -1
        if not re.fullmatch(r"[0-9]+", text):
            raise ValueError("expected a number >= 0 or 'unlimited'")
        return int(text)

    def check_value(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < -1:
            raise ValueError("expected a number >= 0, or -1 for unlimited")
        return value

    def format(self, value: int) -> str:
        return "unlimited" if value == -1 else str(value)


class Listen(ValueType):
    """A listen address as php-fpm writes it: 127.0.0.1:9000, [::1]:9000, 9000, /run/app.sock."""

    label = "address"
    metavar = "ADDR"

    def parse(self, text: str) -> str:
        from fastfpm.address import parse_address

        address = parse_address(text)  # ValueError explains what is wrong
        return str(address)


class AppSpec(ValueType):
    """A WSGI application: MODULE:CALLABLE (MODULE alone means MODULE:application), or `script:`."""

    label = "MODULE:CALLABLE or script:"
    _DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"

    def parse(self, text: str) -> str:
        if text == SCRIPT_APP and type(self) is AppSpec:
            return text
        if not re.fullmatch(rf"{self._DOTTED}(?::{self._DOTTED})?", text):
            raise ValueError("expected MODULE:CALLABLE, for example myapp.wsgi:application")
        return text


class HookSpec(AppSpec):
    """A worker hook: MODULE:CALLABLE, both parts required (a hook has no conventional name)."""

    label = "MODULE:CALLABLE"

    def parse(self, text: str) -> str:
        if not re.fullmatch(rf"{self._DOTTED}:{self._DOTTED}", text):
            raise ValueError("expected MODULE:CALLABLE, for example myapp.hooks:open_pools")
        return text


class PathList(ValueType):
    """Directories separated by ':' (as PYTHONPATH)."""

    label = "DIR[:DIR...]"
    pytype = list

    def parse(self, text: str) -> list[str]:
        return [part for part in text.split(":") if part]

    def check_value(self, value: Any) -> list[str]:
        if isinstance(value, list | tuple) and all(isinstance(part, str) for part in value):
            return [part for part in value if part]
        raise ValueError("expected a list of directories")

    def format(self, value: list[str]) -> str:
        return ":".join(value)


class AccessFormat(ValueType):
    """access.format: php-fpm's % codes, compiled (and so checked) as the value is read."""

    label = "access log format"

    def parse(self, text: str) -> str:
        from fastfpm.accesslog import compile_format

        compile_format(text)  # FormatError (a ValueError) with php-fpm's message
        return text


class Extensions(ValueType):
    """security.limit_extensions: extensions separated by spaces (.py .wsgi); empty allows all."""

    label = "extensions, space-separated"

    def parse(self, text: str) -> str:
        from fastfpm.script import parse_extensions

        return " ".join(parse_extensions(text))  # ValueError says which one is wrong


class Clients(ValueType):
    """Comma-separated IPv4/IPv6 addresses (fastfpm also takes networks such as 10.0.0.0/8)."""

    label = "addresses, comma-separated"
    pytype = list

    def parse(self, text: str) -> list[str]:
        return self.check_value([part.strip() for part in text.split(",") if part.strip()])

    def check_value(self, value: Any) -> list[str]:
        if not isinstance(value, list | tuple):
            raise ValueError("expected a list of addresses")
        result = []
        for item in value:
            try:
                if "/" in str(item):
                    result.append(str(ipaddress.ip_network(str(item), strict=False)))
                else:
                    result.append(str(ipaddress.ip_address(str(item))))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network") from None
        return result

    def format(self, value: list[str]) -> str:
        return ",".join(value)


class Mount(ValueType):
    """A URL prefix the app is served under: /prefix (empty: the root)."""

    label = "/prefix"
    metavar = "PREFIX"

    def parse(self, text: str) -> str:
        if text and not text.startswith("/"):
            raise ValueError("a mount prefix starts with '/', as in /app")
        return text.rstrip("/")


class UrlPath(ValueType):
    """A request path a worker answers itself (pm.status_path, ping.path), checked as php-fpm checks
    them (fpm_conf.c): starts with '/', at least 2 characters, only letters, digits and /_-.~"""

    label = "/path"
    metavar = "PATH"
    _ALLOWED = re.compile(r"[A-Za-z0-9/_.~-]*")

    def parse(self, text: str) -> str:
        if not text.startswith("/"):
            raise ValueError("must start with a '/'")
        if len(text) < 2:
            raise ValueError("is not long enough")
        if not self._ALLOWED.fullmatch(text):
            raise ValueError("must contain only the following characters '[alphanum]/_-.~'")
        return text


class PingResponse(ValueType):
    """ping.response: the body of a ping answer, at least one character."""

    label = "text"

    def parse(self, text: str) -> str:
        if not text:
            raise ValueError("is not long enough")
        return text


# ---------------------------------------------------------------------------------------------------
# The directive table.

@dataclass(frozen=True)
class Directive:
    """One configuration directive, declared once; everything else is derived from these."""

    name: str                   # as written in a file, e.g. "pm.max_children" or "env" for env[...]
    section: str                # "global", "pool", or "any" (include)
    type: ValueType | None      # None for directives fastfpm refuses (no value is ever stored)
    default: Any = None         # the typed default; None means "not set"; a callable computes it
    doc: str = ""               # one line: what it does
    note: str = ""              # where fastfpm differs from php-fpm, or why a directive is refused
    origin: str = "php-fpm"     # "php-fpm" or "fastfpm" (fastfpm's own directives)
    status: str = "supported"   # supported | ignored (accepted, warns) | unsupported | php (errors)
    required: bool = False      # a pool section in a file must set it
    array: bool = False         # written name[KEY] = value
    default_doc: str = ""       # how the docs show a computed default
    cli: tuple[str, ...] = ()   # serve's flag for it, then any short aliases: "--max-children" (a str
                                # is taken as the one flag); none: the directive is set in a file only
    metavar: str = ""           # the flag's value placeholder in --help; empty: the type's (N, TIME...)

    def __post_init__(self) -> None:
        if isinstance(self.cli, str):
            object.__setattr__(self, "cli", (self.cli,))

    @property
    def attr(self) -> str:
        """The attribute name on GlobalConfig / PoolConfig: dots become underscores."""
        return self.name.replace(".", "_")

    @property
    def stored(self) -> bool:
        """Whether the value lands on a config attribute (supported and not an array)."""
        return self.status == "supported" and not self.array and self.section != "any"

    def default_value(self) -> Any:
        """The default, computed when it is a callable."""
        return self.default() if callable(self.default) else self.default

    @property
    def cli_dest(self) -> str:
        """The name its flag's value gets from argparse (the first long flag, '-' as '_'); "" if none.

        apply_options takes that name: it is the attribute, or the pm.* name without "pm." (_ALIASES).
        """
        flag = next((flag for flag in self.cli if flag.startswith("--")), "")
        return flag[2:].replace("-", "_")

    @property
    def cli_metavar(self) -> str | None:
        """The flag's value placeholder in --help: the directive's own, else its type's."""
        assert self.type is not None
        return self.metavar or self.type.metavar

    def cli_help(self) -> str:
        """The flag's --help text: the one-line doc and the default, ready for argparse (% escaped)."""
        text = self.doc.replace("`", "")
        default = self.cli_default_text()
        if default:
            text += f" (default: {default})"
        return text.replace("%", "%%")

    def cli_default_text(self) -> str:
        """The default as --help shows it; a computed one also with its value here; "" when unset."""
        if self.default is None:
            return self.default_doc
        assert self.type is not None
        shown = self.type.format(self.default_value())
        if not self.default_doc:
            return shown or "empty"
        if callable(self.default) and shown:
            return f"{self.default_doc}, here {shown}"
        return self.default_doc


def _d(name: str, section: str, vtype: ValueType | None, default: Any = None, doc: str = "",
       **more: Any) -> Directive:
    return Directive(name, section, vtype, default, doc, **more)


def _unsupported(name: str, section: str, why: str, **more: Any) -> Directive:
    return Directive(name, section, None, None, "", note=why, status="unsupported", **more)


def _php(name: str, array: bool = True, why: str = PHP_SETTINGS_MESSAGE) -> Directive:
    return Directive(name, "pool", None, None, "", note=why, status="php", array=array)


G, P = "global", "pool"
DIRECTIVES: tuple[Directive, ...] = (
    # ---- [global]: php-fpm's order (php-fpm.conf.in)
    _d("pid", G, Path(), None, "File the master writes its pid to; not written when unset.", cli="--pid"),
    _d("error_log", G, LogTarget(), None,
       "Where the master and pools log: a file, or `syslog`. Unset: standard error.", cli="--error-log",
       note="php-fpm defaults to log/php-fpm.log; fastfpm logs to standard error, which journald and "
            "container runtimes collect."),
    _d("syslog.facility", G, Choice("auth", "authpriv", "cron", "daemon", "ftp", "kern", "lpr", "mail",
                                    "news", "syslog", "user", "uucp", "local0", "local1", "local2",
                                    "local3", "local4", "local5", "local6", "local7"),
       "daemon", "syslog(3) facility used when error_log = syslog."),
    _d("syslog.ident", G, Str(), "fastfpm", "Tag prepended to every syslog message.",
       note="php-fpm's default is php-fpm."),
    _d("log_level", G, Choice("alert", "error", "warning", "notice", "debug", aliases={"warn": "warning"}),
       "notice", "Least severe level written to the error log.", cli="--log-level"),
    _d("log_limit", G, Int(512), 1024,
       "Longest error log line (characters, newline included): as php-fpm, a longer message line is cut "
       "and ends in `...`, a longer line of worker output is split over several lines, each decorated again.",
       note="php-fpm counts bytes; fastfpm counts characters, so a UTF-8 character is never cut in two. "
            "php-fpm only cuts its own messages past 2048 bytes; fastfpm holds every line to log_limit."),
    Directive("log_buffering", G, Bool(), True, "", status="ignored",
              note="fastfpm always writes a log line with a single write(); the directive is accepted "
                   "and has no effect."),
    _d("emergency_restart_threshold", G, Int(0), 0,
       "Reload when this many workers die of SIGSEGV or SIGBUS within emergency_restart_interval; 0: off."),
    _d("emergency_restart_interval", G, Time(), 0.0,
       "The window emergency_restart_threshold counts in; 0: off."),
    _d("process_control_timeout", G, Time(), 10.0,
       "How long workers get to finish their requests on a graceful stop or reload before SIGTERM.",
       note="php-fpm's default 0 sends SIGTERM right after SIGQUIT, so its graceful stop is not graceful; "
            "fastfpm waits up to 10s. Set 0 for php-fpm's behaviour."),
    _d("process.max", G, Int(0), 0, "Most workers all pools together may have; 0: no limit."),
    _d("process.priority", G, Int(-19, 20), None,
       "nice(2) value for the master (root only); workers inherit it unless their pool sets one."),
    _d("daemonize", G, Bool(), False, "Detach from the terminal and run in the background.",
       note="php-fpm defaults to yes; fastfpm stays in the foreground, which is what systemd "
            "(Type=notify) and containers want."),
    _d("rlimit_files", G, Int(1), None, "Open file descriptor limit (RLIMIT_NOFILE) of the master."),
    _d("rlimit_core", G, Rlimit(), None, "Core file size limit (RLIMIT_CORE) of the master."),
    Directive("events.mechanism", G, Str(), None, "", status="ignored",
              note="fastfpm uses the best mechanism Python's selectors module offers (epoll on Linux); "
                   "the directive is accepted and has no effect."),
    _d("systemd_interval", G, Time(), 10.0,
       "Interval of the STATUS= reports sent to systemd (when NOTIFY_SOCKET is set); 0: off."),
    _d("include", "any", Path(), None,
       "Read more files here; a glob pattern reads every match in order. Allowed in any section.",
       note="A relative pattern is taken from the including file's directory (php-fpm: from the "
            "prefix, /usr by default), or from the prefix when one is given (-p)."),

    # ---- pool sections: php-fpm's order (www.conf.in)
    _d("prefix", P, Path(), None,
       "Directory the pool's relative paths (listen, slowlog, chdir, python_path) are taken from."),
    _d("user", P, Str(), None,
       "Unix user (name or id) the workers run as; only when the master runs as root. Unset: the master's.",
       cli="--user", metavar="USER"),
    _d("group", P, Str(), None, "Unix group (name or id) of the workers. Unset: the user's group.",
       cli="--group", metavar="GROUP"),
    _d("listen", P, Listen(), "127.0.0.1:9000",
       "Address to accept FastCGI connections on: 127.0.0.1:9000, [::1]:9000, 9000 (every address) "
       "or /path/to.sock.", required=True, cli="--listen",
       note="Required in a pool section, as in php-fpm; 127.0.0.1:9000 is the default only for a pool "
            "built from the command line."),
    _d("listen.backlog", P, Int(-1), 511, "listen(2) backlog; -1 means the system's maximum (somaxconn).",
       cli="--listen-backlog"),
    _d("listen.owner", P, Str(), None, "Owner (name or id) of a unix socket. Unset: the master's user.",
       cli="--listen-owner", metavar="USER"),
    _d("listen.group", P, Str(), None, "Group (name or id) of a unix socket. Unset: the owner's group.",
       cli="--listen-group", metavar="GROUP"),
    _d("listen.mode", P, Mode(), 0o660, "Permissions of a unix socket.", cli="--listen-mode"),
    _d("listen.allowed_clients", P, Clients(), list,
       "Client addresses a TCP socket accepts, comma-separated; others are closed and logged. Empty: any.",
       note="fastfpm also takes networks (10.0.0.0/8). php-fpm ignores it on unix sockets; fastfpm warns.",
       default_doc="any"),
    _d("listen.keepalive", P, Bool(), True,
       "TCP keepalive on accepted connections, so one whose web server vanished without a FIN (a host "
       "powered off, a network cut) is found and closed instead of held forever. Ignored on unix sockets.",
       origin="fastfpm",
       note="php-fpm sets no keepalive (the kernel's default is off). nginx's `listen ... so_keepalive=` "
            "is the same switch; the three values below are its idle:intvl:cnt, default 60s:10s:6."),
    _d("listen.keepalive_idle", P, Seconds(1, MAX_KEEPALIVE_SECONDS), 60.0,
       "Silence on a connection before the first keepalive probe (TCP_KEEPIDLE).", origin="fastfpm",
       note="Linux's default is 2 hours. 60s stays under the idle cut-off of NAT gateways and load "
            "balancers (4 to 6 minutes in common clouds), so the probes also keep such a path open."),
    _d("listen.keepalive_interval", P, Seconds(1, MAX_KEEPALIVE_SECONDS), 10.0,
       "Time between unanswered keepalive probes (TCP_KEEPINTVL).", origin="fastfpm",
       note="Linux's default is 75s."),
    _d("listen.keepalive_count", P, Int(1, MAX_KEEPALIVE_COUNT), 6,
       "Unanswered probes after which the connection is dropped (TCP_KEEPCNT): a silent peer is given "
       "up after idle + count * interval, 2 minutes with the defaults.", origin="fastfpm",
       note="Linux's default is 9. Six probes ride out a lost packet or a short network hiccup."),
    _d("listen.reuseport", P, Bool(), False,
       "Let a second master listen on this pool's address beside this one, to replace the master "
       "without dropping a request (docs/operations.md, Replacing the master): TCP sockets get "
       "SO_REUSEPORT; on a unix socket a new master binds beside the live one and renames its socket "
       "over it once ready.", origin="fastfpm", cli="--listen-reuseport",
       note="php-fpm has no such option (its sockets pass only to its own children across a reload). "
            "Both masters must set it, as the kernel joins only SO_REUSEPORT sockets of one user."),
    _unsupported("listen.acl_users", P, _NO_ACL),
    _unsupported("listen.acl_groups", P, _NO_ACL),
    _unsupported("listen.setfib", P, "A FreeBSD routing-table option; fastfpm runs on Linux. Remove it."),
    _d("process.priority", P, Int(-19, 20), None,
       "nice(2) value for the pool's workers (root only). Unset: the master's."),
    _unsupported("process.dumpable", P, NOT_YET),
    _d("pm", P, Choice("static", "dynamic", "ondemand"), "static",
       "How the number of workers is managed: static, dynamic or ondemand.",
       note="php-fpm requires it; fastfpm defaults to static.", cli="--pm"),
    _d("pm.max_children", P, Int(1), default_max_children,
       "Workers alive at once: the number for static, the ceiling for dynamic and ondemand.",
       note="php-fpm requires it; fastfpm defaults to min(32, max(2, 2 x CPUs)).",
       default_doc="min(32, max(2, 2 x CPUs))", cli="--max-children"),
    _d("pm.start_servers", P, Int(0), None,
       "Workers started with a dynamic pool; 0 or unset: min_spare + (max_spare - min_spare) / 2.",
       default_doc="min_spare + (max_spare - min_spare) / 2", cli="--start-servers"),
    _d("pm.min_spare_servers", P, Int(0), None,
       "dynamic: fewest idle workers; below it, workers are spawned.",
       note="php-fpm requires it with pm = dynamic; unset, fastfpm uses max(1, max_children / 4).",
       default_doc="max(1, max_children / 4)", cli="--min-spare-servers"),
    _d("pm.max_spare_servers", P, Int(0), None,
       "dynamic: most idle workers; above it, one idle worker is stopped per second.",
       note="php-fpm requires it with pm = dynamic; unset, fastfpm uses max(min_spare, max_children / 2).",
       default_doc="max(min_spare, max_children / 2)", cli="--max-spare-servers"),
    _d("pm.max_spawn_rate", P, Int(1), 32,
       "dynamic: most workers spawned in one second; the rate doubles each second up to it.",
       note="php-fpm can overshoot a limit that is not a power of two (1, 2, 4, 8 with 5); fastfpm stops "
            "at the limit."),
    _d("pm.process_idle_timeout", P, Time(), 10.0, "ondemand: an idle worker is stopped after this long.",
       cli="--process-idle-timeout"),
    _d("pm.max_requests", P, Int(0), 0,
       "A worker exits after serving this many requests and is replaced; 0: never.", cli="--max-requests"),
    _d("pm.max_requests_jitter", P, Int(0), 0,
       "Adds random(0..jitter) to each worker's pm.max_requests so workers do not all restart at once.",
       origin="fastfpm"),
    _d("pm.max_memory", P, Size(0), 0,
       "A worker whose peak resident set (RSS) is over this size once a request's application is "
       "done answers that request, then exits and is replaced, as after pm.max_requests; 0: no limit.",
       origin="fastfpm",
       note="Peak RSS (getrusage's ru_maxrss, which request end reads anyway), not current RSS or "
            "PSS: free, and since a worker starts fresh, the most it ever held, which is what the "
            "limit bounds. It counts pages shared with the master, and never goes down: a request "
            "that briefly needed more ends its worker too (docs/operations.md, Memory recycling)."),
    _d("pm.status_path", P, UrlPath(), None,
       "Request path the workers answer with php-fpm's status page (text, ?json, ?xml, ?html, "
       "?openmetrics; ?full adds a row per worker). Unset: no status page.",
       note="Matched against the request path (REQUEST_URI without its query, percent-decoded), not "
            "SCRIPT_NAME. The status request counts as idle, not active. OpenMetrics counters end in "
            "_total; fastfpm's own fields follow php-fpm's (docs/operations.md)."),
    _d("pm.status_listen", P, Listen(), None,
       "Address (as `listen` takes it) on which the master itself answers pm.status_path and ping.path "
       "over FastCGI, from its event loop, so the page answers while every worker is busy. Unset: none.",
       note="php-fpm 8.0+ starts a hidden pool of workers there and, without pm.status_path, serves the "
            "page at `/` (on the pool's own socket too); fastfpm needs pm.status_path or ping.path. A "
            "unix socket gets listen.owner, listen.group and listen.mode; listen.allowed_clients applies "
            "to TCP clients. Other paths: php-fpm's 404 `File not found.`"),
    _d("ping.path", P, UrlPath(), None,
       "Request path the workers answer with ping.response (200, text/plain), to check the pool is alive.",
       note="Matched against the request path, as pm.status_path."),
    _d("ping.response", P, PingResponse(), "pong", "The body of the answer to ping.path.",
       note="php-fpm ignores it without ping.path; fastfpm warns."),
    _d("access.log", P, Path(), None,
       "File each request's line is appended to, in access.format; unset: no access log. SIGUSR1 reopens it.",
       note="Opened by the master (mode 0600, as php-fpm); workers inherit it and write one line each."),
    _d("access.format", P, AccessFormat(), None,
       "The access log line: php-fpm's % codes (see docs/operations.md, Access log).",
       default_doc='php-fpm\'s: %R - %u %t "%m %r" %s',
       note="%M is the worker's peak resident set at the request's end (Python has no per-request "
            "allocator); %r is REQUEST_URI without its query."),
    _d("access.suppress_path", P, Str(), None,
       "access.suppress_path[] = /ping: a 2xx GET or HEAD of this %r path, without query or body, "
       "is not logged.",
       array=True, default_doc="none"),
    _d("slowlog", P, Path(), None, "File the tracebacks of slow requests are appended to.", cli="--slowlog"),
    _d("request_slowlog_timeout", P, Time(), 0.0,
       "A request running this long gets its Python traceback written to slowlog; 0: off.",
       cli="--request-slowlog-timeout",
       note="php-fpm traces with ptrace (which containers often forbid); fastfpm's workers write their "
            "own traceback, even while blocked in C code."),
    _d("request_slowlog_trace_depth", P, Int(1), 20, "Most stack frames written per slowlog entry."),
    _d("request_terminate_timeout", P, Time(), 0.0,
       "A request running this long is ended (SIGTERM, then SIGKILL) and the worker replaced; 0: off.",
       cli="--request-terminate-timeout"),
    Directive("request_terminate_timeout_track_finished", P, Bool(), False, "", status="ignored",
              note="php-fpm's switch for requests past fastcgi_finish_request(); a WSGI request ends when "
                   "the response is closed, so the directive is accepted and has no effect."),
    _d("rlimit_files", P, Int(1), None, "Open file descriptor limit (RLIMIT_NOFILE) of the workers."),
    _d("rlimit_core", P, Rlimit(), None, "Core file size limit (RLIMIT_CORE) of the workers."),
    _unsupported("chroot", P,
                 "chroot is not supported: the Python interpreter and its packages would have to live "
                 "inside it. Use a container or systemd's RootDirectory= instead."),
    _d("chdir", P, Path(), None,
       "Directory the workers change to before loading the app. Unset: the master's.",
       cli="--chdir", metavar="DIR"),
    _d("catch_workers_output", P, Bool(), False,
       "Send the workers' stdout and stderr to the error log (else /dev/null, as FastCGI expects).",
       cli="--catch-workers-output"),
    _d("decorate_workers_output", P, Bool(), True,
       "With catch_workers_output, prefix each line with the pool and pid."),
    _d("clear_env", P, Bool(), True,
       "Start workers with an empty environment plus env[...]; no: they inherit the master's.",
       note="A pool built from the command line (no config file, so no env[...]) keeps the environment."),
    _d("security.limit_extensions", P, Extensions(), ".py",
       "Script mode (`app = script:`): only files ending in one of these extensions run; any other "
       "is answered 403 Access denied. Empty: every file runs (a warning).",
       note="php-fpm's default is `.php .phar`; fastfpm's `.py`. fastfpm checks the name the request "
            "gives and the file it resolves to, and each extension must start with '.'."),
    _unsupported("apparmor_hat", P, NOT_YET),
    _d("env", P, Str(), None,
       "env[NAME] = value sets a worker environment variable; a value $NAME copies the master's.",
       array=True, default_doc="none"),
    _php("php_value"),
    _php("php_admin_value"),
    _php("php_flag"),
    _php("php_admin_flag"),
    # ---- fastfpm's own pool directives
    _d("app", P, AppSpec(), DEMO_APP,
       "The WSGI application the pool serves: MODULE:CALLABLE, or `script:` for script mode "
       "(SCRIPT_FILENAME picks a file under script.root whose `application` serves the request).",
       origin="fastfpm", required=True,
       note="Required in a pool section; the built-in demo is the default only from the command line."),
    _d("on_worker_start", P, HookSpec(), None,
       "Called as CALLABLE(pool_name) in each worker after the app is imported, before its first "
       "request: open database or HTTP pools here. If it raises, the worker exits as on an app "
       "import failure (the master stops, a reload rolls back).",
       origin="fastfpm", default_doc="none",
       note="php-fpm has no worker hooks; gunicorn's post_worker_init is the model "
            "(docs/operations.md, Worker hooks)."),
    _d("on_worker_exit", P, HookSpec(), None,
       "Called as CALLABLE(pool_name) in a worker whose loop ended normally (graceful stop, reload, "
       "pm.max_requests, idle exit), not on SIGTERM or SIGKILL. An exception is logged; the worker "
       "still exits with status 0.",
       origin="fastfpm", default_doc="none", note="gunicorn's worker_exit, run in the worker."),
    _d("preload", P, Bool(), False,
       "Import the app once per pool and generation in a template process, which forks the workers "
       "(copy-on-write: less memory per worker, faster starts). A reload starts a new template.",
       origin="fastfpm",
       note="gunicorn's preload_app, but per generation, so a reload still loads new code; "
            "on_worker_start runs in each worker after the fork (docs/operations.md, Preload)."),
    _d("python_path", P, PathList(), list, "Directories put in front of sys.path before the app is imported.",
       origin="fastfpm", default_doc="none"),
    _d("mount", P, Mount(), "",
       "URL prefix the app is served under: SCRIPT_NAME is the prefix, PATH_INFO the rest.",
       origin="fastfpm", default_doc="none (the root)", cli="--mount"),
    _d("script.root", P, Path(), None,
       "Script mode (`app = script:`): the directory whose files SCRIPT_FILENAME may name; nothing "
       "outside it runs, symlinks followed. Required in script mode.",
       origin="fastfpm", default_doc="none", metavar="DIR", cli="--script-root"),
    _d("script.revalidate_freq", P, Time(), 2.0,
       "Script mode: how often a worker looks at a script file again (its inode, mtime and size) to "
       "import a new version; 0: on every request.",
       origin="fastfpm", note="opcache.revalidate_freq, with opcache.validate_timestamps on."),
    _d("idle_timeout", P, Time(), 5.0,
       "A connection that sends nothing for this long after accept (or between kept-alive requests) "
       "is closed. It waits among the worker's other connections, never holding the worker.",
       origin="fastfpm", cli="--idle-timeout"),
    _d("request_header_timeout", P, Time(), 10.0,
       "A request whose head (BEGIN_REQUEST and PARAMS) is not all in this long after its first bytes "
       "is closed; logged, at most one line per pool every 10 s.",
       origin="fastfpm", cli="--request-header-timeout",
       note="nginx's client_header_timeout for FastCGI: one deadline for the whole head, not restarted "
            "by each byte. A web server writes the head in one go (milliseconds), so 10s is generous; "
            "php-fpm has no such limit."),
    _d("request_body_timeout", P, Time(), 60.0,
       "A request whose body (STDIN) stops arriving for this long, between two pieces, is closed; "
       "logged as request_header_timeout is.",
       origin="fastfpm", cli="--request-body-timeout",
       note="nginx's client_body_timeout: the time between two reads, not for the whole body "
            "(request_terminate_timeout bounds that). 60s, nginx's own default, so that with "
            "fastcgi_request_buffering off a client slow enough for nginx is not cut by fastfpm first."),
    _d("read_timeout", P, Time(), 60.0,
       "A response the web server stops reading for this long is dropped and the connection closed.",
       origin="fastfpm",
       note="It once bounded the wait for the rest of a request too; request_header_timeout and "
            "request_body_timeout do that now."),
    _d("max_params_size", P, Size(1024), 65536,
       "Largest total size of one request's FastCGI params (headers and CGI variables).",
       origin="fastfpm", cli="--max-params-size"),
    _d("client_max_body_size", P, Size(0), 0,
       "Largest request body the app is given (nginx's name and syntax: 0 means no limit). A larger "
       "CONTENT_LENGTH is answered 413 without calling the app; a body sent without one makes "
       "wsgi.input raise past the limit.", origin="fastfpm",
       note="php-fpm leaves this to PHP's post_max_size, which empties $_POST and still runs the script; "
            "fastfpm never calls the app (docs/operations.md, Request body limit)."),
    _d("security.keep_http_proxy", P, Bool(), False,
       "Keep the HTTP_PROXY param (a request's `Proxy:` header) in the environ; no: it is dropped, "
       "which closes httpoxy (CVE-2016-5385) for the app and the HTTP libraries it hands the environ to.",
       origin="fastfpm",
       note="php-fpm has no such switch: PHP itself (since 5.5.38, 5.6.24 and 7.0.9) replaces "
            "$_SERVER['HTTP_PROXY'] by the process environment's HTTP_PROXY or removes it. fastfpm only "
            "removes it: the process environment stays in os.environ, where WSGI apps read it."),
)
del G, P

_BY_KEY: dict[tuple[str, str], Directive] = {}
for _directive in DIRECTIVES:
    for _section in (("global", "pool") if _directive.section == "any" else (_directive.section,)):
        _BY_KEY[(_section, _directive.name.lower())] = _directive
_STORED = {section: [d for d in DIRECTIVES if d.section == section and d.stored]
           for section in ("global", "pool")}
_BY_ATTR = {section: {d.attr: d for d in _STORED[section]} for section in ("global", "pool")}


# ---------------------------------------------------------------------------------------------------
# GlobalConfig and PoolConfig: dataclasses generated from the table, so a directive cannot exist in
# one place and not the other. Attributes are the directive names with dots as underscores
# (pm.max_children -> pm_max_children); every field is keyword-only.

def _field_for(directive: Directive) -> tuple[str, Any, Any]:
    vtype = directive.type
    assert vtype is not None
    annotation = vtype.pytype if directive.default is not None or vtype.pytype in (list, dict) else (
        vtype.pytype | None)
    default = directive.default
    if callable(default):
        return directive.attr, annotation, field(default_factory=default)
    return directive.attr, annotation, field(default=default)


class _Located:
    """Where each value came from, for messages."""

    source: dict[str, str]
    section_source: str

    def where(self, directive: str | None = None) -> str:
        """`file:line` where directive was set, else where the section starts (or 'command line')."""
        if directive and directive in self.source:
            return self.source[directive]
        return self.section_source or CLI_SOURCE


GlobalConfig = dataclasses.make_dataclass(
    "GlobalConfig",
    [_field_for(d) for d in _STORED["global"]] + [
        ("source", dict, field(default_factory=dict, compare=False, repr=False)),
        ("section_source", str, field(default="", compare=False, repr=False)),
    ],
    bases=(_Located,), kw_only=True,
    namespace={"__doc__": "The [global] section, typed; attributes are the directive names with '.' as '_'."},
)
GlobalConfig.__module__ = __name__

PoolConfig = dataclasses.make_dataclass(
    "PoolConfig",
    [("name", str, field(default="www"))] + [_field_for(d) for d in _STORED["pool"]] + [
        ("env", dict, field(default_factory=dict)),
        ("access_suppress_path", list, field(default_factory=list)),
        ("source", dict, field(default_factory=dict, compare=False, repr=False)),
        ("section_source", str, field(default="", compare=False, repr=False)),
        # attributes check() filled in itself (dynamic pm defaults): recomputed on every check()
        ("derived", set, field(default_factory=set, compare=False, repr=False)),
    ],
    bases=(_Located,), kw_only=True,
    namespace={"__doc__": "One pool, typed; attributes are the directive names with '.' as '_' "
                          "(pm.max_children -> pm_max_children), plus name and env."},
)
PoolConfig.__module__ = __name__


@dataclass
class Config:
    """A whole configuration: the [global] section and the pools, in the order they were declared."""

    global_: Any = field(default_factory=GlobalConfig)
    pools: list[Any] = field(default_factory=list)
    path: str | None = None          # the main file, None when built in code
    prefix: str | None = None        # what relative paths were resolved against
    files: list[str] = field(default_factory=list)     # every file read, in order
    warnings: list[str] = field(default_factory=list)  # `file:line: message`, nothing fatal

    def pool(self, name: str) -> Any:
        """The pool called name (case-insensitive, as php-fpm matches sections)."""
        for pool in self.pools:
            if pool.name.lower() == name.lower():
                return pool
        raise KeyError(name)

    def dump(self) -> str:
        """The effective configuration as INI text (see dump())."""
        return dump(self)


# ---------------------------------------------------------------------------------------------------
# The INI reader: php-fpm reads its files line by line through PHP's INI scanner; this follows the
# same rules for what a php-fpm file contains.

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY = re.compile(r"([A-Za-z0-9_.]+)\s*(?:\[\s*(.*?)\s*\])?")


def _expand_dollar(raw: str, j: int, environ: Mapping[str, str], pool: str | None, out: list[str]) -> int:
    """raw[j] is "$": append what ${VAR}, ${VAR:-default} or $pool there stands for (a lone "$" stays
    itself) to out, and return the index after it. ValueError says what is wrong."""
    if raw.startswith("${", j):
        end = raw.find("}", j + 2)
        if end < 0:
            raise ValueError("'${' without a closing '}'")
        name, sep, fallback = raw[j + 2:end].partition(":-")
        if not _ENV_NAME.fullmatch(name):
            raise ValueError(f"'${{{raw[j + 2:end]}}}' is not an environment variable reference")
        if name in environ:
            out.append(environ[name])
        elif sep:
            out.append(fallback)
        else:
            raise ValueError(f"environment variable {name} is not set "
                             f"(write ${{{name}:-default}} to give a fallback)")
        return end + 1
    if raw.startswith("$pool", j):
        if pool is None:
            raise ValueError("'$pool' can only be used inside a pool section")
        out.append(pool)
        return j + 5
    out.append("$")
    return j + 1


def _expand(raw: str, environ: Mapping[str, str], pool: str | None) -> tuple[str, bool]:
    """The value of an INI value's text, and whether any part of it was quoted.

    As PHP's INI scanner: "double quotes" expand ${VAR} and take \\" and \\\\ escapes, 'single quotes'
    are literal, unquoted text ends at ';'. ${VAR:-default} (PHP 8.3) gives a fallback. As php-fpm,
    $pool becomes the pool's name (in quoted values too, but not in single quotes). An unset ${VAR}
    without a fallback is an error (PHP would silently use ""), so a typo cannot empty an address.
    """
    out: list[str] = []
    quoted = False
    last_unquoted_start = None
    i, n = 0, len(raw)

    def dollar(j: int) -> int:
        return _expand_dollar(raw, j, environ, pool, out)

    while i < n:
        c = raw[i]
        if c == '"':
            quoted = True
            last_unquoted_start = None
            i += 1
            while True:
                if i >= n:
                    raise ValueError('a double-quoted value is missing its closing "')
                c = raw[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and raw[i + 1] in '"\\$':
                    out.append(raw[i + 1])
                    i += 2
                elif c == "$":
                    i = dollar(i)
                else:
                    out.append(c)
                    i += 1
        elif c == "'":
            quoted = True
            last_unquoted_start = None
            end = raw.find("'", i + 1)
            if end < 0:
                raise ValueError("a single-quoted value is missing its closing '")
            out.append(raw[i + 1:end])
            i = end + 1
        elif c == ";":
            break  # a comment runs to the end of the line
        else:
            if last_unquoted_start is None:
                last_unquoted_start = len(out)
            if c == "$":
                i = dollar(i)
            else:
                out.append(c)
                i += 1
    if last_unquoted_start is not None:
        # trailing blanks before a comment or the end of the line are not part of the value
        tail = "".join(out[last_unquoted_start:]).rstrip()
        del out[last_unquoted_start:]
        out.append(tail)
    return "".join(out).strip() if not quoted else "".join(out), quoted


class _Loader:
    """Reads a main file and its includes into a Config, collecting errors and warnings."""

    def __init__(self, environ: Mapping[str, str], prefix: str | None) -> None:
        self.environ = environ
        self.prefix = prefix
        self.global_ = GlobalConfig()
        self.pools: dict[str, Any] = {}
        self.current: Any = None  # the pool being read, None in [global]
        self.errors: list[str] = []
        self.warnings: list[str] = []
        self.files: list[str] = []
        self.rejected: set[tuple[str, str]] = set()  # (pool, directive) written with a bad value

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{where}: {message}")

    def read_file(self, path: str, via: str | None, stack: tuple[str, ...]) -> None:
        real = os.path.realpath(path)
        if real in stack:
            chain = " -> ".join([*stack[stack.index(real):], real])
            self.error(via or path, f"include cycle: {chain}")
            return
        if len(stack) >= MAX_INCLUDE_DEPTH:
            self.error(via or path, f"includes nested more than {MAX_INCLUDE_DEPTH} files deep")
            return
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if via is None:
                self.errors.append(f"{path}: cannot read the configuration file: {reason}")
            else:
                self.error(via, f"cannot read included file {path}: {reason}")
            return
        self.files.append(path)
        # An included file starts in the section that included it; afterwards the including file goes
        # on in its own section (php-fpm would go on in whatever section the included file ended in).
        saved = self.current
        for number, line in enumerate(text.splitlines(), 1):
            self.read_line(path, number, line, (*stack, real))
        if via is not None:
            self.current = saved

    def read_line(self, path: str, number: int, line: str, stack: tuple[str, ...]) -> None:
        where = f"{path}:{number}"
        text = line.strip()
        if not text or text[0] in ";#":
            return
        if text.startswith("["):
            end = text.find("]")
            rest = text[end + 1:].strip() if end >= 0 else ""
            if end < 0 or (rest and rest[0] not in ";#"):
                self.error(where, "a section header is written [name]")
                return
            self.open_section(text[1:end].strip(), where)
            return
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            self.error(where, "expected 'name = value' or '[section]'")
            return
        match = _KEY.fullmatch(key)
        if not match:
            self.error(where, f"{key!r} is not a directive name")
            return
        name, sub = match.group(1), match.group(2)
        lname = name.lower()
        pool_name = self.current.name if self.current is not None else None
        if lname == "include" and sub is None:
            try:
                pattern, _ = _expand(raw.strip(), self.environ, pool_name)
            except ValueError as exc:
                self.error(where, f"include: {exc}")
                return
            self.include(pattern, path, where, stack)
            return
        self.entry(name, sub, raw.strip(), where)

    def open_section(self, name: str, where: str) -> None:
        if name.lower() == "global":
            self.current = None
            return
        existing = self.pools.get(name.lower())
        if existing is not None:
            # php-fpm reopens a pool whose section appears again (compared case-insensitively)
            self.current = existing
            return
        pool = PoolConfig(name=name, section_source=where)
        self.pools[name.lower()] = pool
        self.current = pool

    def include(self, pattern: str, path: str, where: str, stack: tuple[str, ...]) -> None:
        if not pattern:
            self.error(where, "include needs a file name or glob pattern")
            return
        if not os.path.isabs(pattern):
            pattern = os.path.join(self.prefix or os.path.dirname(os.path.abspath(path)), pattern)
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                # php-fpm only warns here: an empty pool.d/ is a normal state
                self.warn(where, f"nothing matches the include pattern {pattern}")
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            # a plain file name that does not exist is a typo, not an empty directory: an error
            self.error(where, f"included file {pattern} does not exist")
            return
        for match in matches:
            if not os.path.isdir(match):  # as php-fpm, directories matched by a glob are skipped
                self.read_file(match, where, stack)

    def entry(self, name: str, sub: str | None, raw: str, where: str) -> None:
        section = "global" if self.current is None else "pool"
        lname = name.lower()
        written = name if sub is None else f"{name}[{sub}]"
        directive = _BY_KEY.get((section, lname))
        if directive is None:
            other = "pool" if section == "global" else "global"
            elsewhere = _BY_KEY.get((other, lname))
            if elsewhere is not None and elsewhere.status == "supported":
                if other == "global":
                    self.error(where, f"'{name}' is a [global] directive; move it to the [global] section")
                else:
                    self.error(where, f"'{name}' is a pool directive; move it into a pool section")
            elif elsewhere is not None:
                self.refuse(elsewhere, written, where)
            else:
                names = sorted({d.name for (s, _), d in _BY_KEY.items() if s == section})
                close = difflib.get_close_matches(lname, names, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.error(where, f"unknown directive '{written}'{hint}")
            return
        if directive.status in ("unsupported", "php"):
            self.refuse(directive, written, where)
            return
        if directive.array and sub is None:
            self.error(where, f"'{name}' needs a key: {name}[NAME] = value")
            return
        if not directive.array and sub is not None:
            self.error(where, f"'{name}' does not take a [key]")
            return
        pool_name = self.current.name if self.current is not None else None
        try:
            text, quoted = _expand(raw, self.environ, pool_name)
        except ValueError as exc:
            self.error(where, f"{written}: {exc}")
            return
        if directive.name == "env":
            self.set_env(sub or "", text, quoted, where)
            return
        if directive.name == "access.suppress_path":
            if text:  # as php-fpm, an empty entry is skipped
                self.current.access_suppress_path.append(text)
                self.current.source.setdefault(directive.name, where)
            return
        assert directive.type is not None
        if text == "" and not isinstance(directive.type, Bool | Extensions):
            # An empty value means "not set", as in php-fpm; an empty security.limit_extensions
            # allows every extension there, and here.
            value = directive.default_value()
        else:
            try:
                value = directive.type.parse(text)
            except ValueError as exc:
                self.error(where, f"invalid value {text!r} for '{directive.name}': {exc}")
                if self.current is not None:
                    self.rejected.add((self.current.name.lower(), directive.name))
                return
        if directive.status == "ignored":
            self.warn(where, f"'{directive.name}' has no effect in fastfpm: {directive.note}")
            return
        target = self.global_ if self.current is None else self.current
        setattr(target, directive.attr, value)
        target.source[directive.name] = where

    def refuse(self, directive: Directive, written: str, where: str) -> None:
        if directive.status == "php":
            self.error(where, f"'{written}': {directive.note}")
        else:
            self.error(where, f"'{written}' is not supported by fastfpm: {directive.note}")

    def set_env(self, name: str, text: str, quoted: bool, where: str) -> None:
        if not name or "=" in name or "\0" in name:
            self.error(where, f"env[{name}]: the variable name must be non-empty and contain no '='")
            return
        if text == "":
            self.error(where, f"env[{name}]: empty value (php-fpm refuses it too); remove the line instead")
            return
        if not quoted and text.startswith("$") and _ENV_NAME.fullmatch(text[1:]):
            # php-fpm's rule: env[X] = $Y takes Y from the master's environment ("" when unset)
            text = self.environ.get(text[1:], "")
        self.current.env[name] = text
        self.current.source[f"env[{name}]"] = where


def _pool_name_problem(name: str) -> str | None:
    if not name:
        return "a pool section needs a name: [www]"
    if len(name.encode()) > 63 or not name.isprintable() or any(c.isspace() for c in name):
        return f"pool name {name!r}: use at most 63 printable characters without spaces"
    return None


def load(path: str | os.PathLike[str], *, environ: Mapping[str, str] = os.environ,
         prefix: str | None = None) -> Config:
    """Read the configuration file at path (and what it includes), check it, and return it.

    prefix is php-fpm's -p: when given, relative includes and relative paths are taken from it;
    otherwise includes are relative to the including file and paths to the main file's directory.
    Raises ConfigError listing every problem as `file:line: message`.
    """
    path = os.fspath(path)
    loader = _Loader(environ, prefix)
    loader.read_file(path, None, ())
    for pool in loader.pools.values():
        for directive in _STORED["pool"]:
            written = directive.name in pool.source or (pool.name.lower(), directive.name) in loader.rejected
            if directive.required and not written:
                loader.error(pool.section_source, f"[pool {pool.name}] '{directive.name}' is not set; "
                                                  f"every pool needs one ({_EXAMPLE[directive.name]})")
    config = Config(global_=loader.global_, pools=list(loader.pools.values()), path=path,
                    prefix=os.path.abspath(prefix or os.path.dirname(os.path.abspath(path))),
                    files=loader.files, warnings=loader.warnings)
    if not config.pools and not any(e.startswith(f"{path}: cannot read") for e in loader.errors):
        loader.errors.append(f"{path}: no pool defined; add a pool section such as [www] "
                             f"with listen = ... and app = ...")
    errors = list(loader.errors)
    if not loader.errors or config.pools:
        errors += _check(config)
    if errors:
        raise ConfigError(errors)
    return config


_EXAMPLE = {"listen": "listen = 127.0.0.1:9000", "app": "app = myapp.wsgi:application"}


# ---------------------------------------------------------------------------------------------------
# Building in code: the command line's flags, or a test's.

# Option names that are not attribute names: a pm.* directive may be given without "pm." (max_children,
# as serve's --max-children spells it), and every serve flag by the name argparse gives its value.
_ALIASES = {d.attr.removeprefix("pm_"): d.attr for d in _STORED["pool"] if d.name.startswith("pm.")}
_ALIASES.update({d.cli_dest: d.attr for d in DIRECTIVES if d.cli and d.cli_dest != d.attr})


def apply_options(config: Config, options: Mapping[str, Any], source: str = CLI_SOURCE) -> Config:
    """Set attributes from keyword options (attribute names or --flag spellings, None = not given).

    A pool option applies to every pool, a global one to [global]; values may be text (parsed as the
    file's would be) or typed values. Raises ConfigError for unknown names or bad values; call check()
    afterwards (from_cli does).
    """
    errors = []
    for key, value in options.items():
        if value is None:
            continue
        attr = _ALIASES.get(key, key.replace("-", "_"))
        if attr == "name":
            for pool in config.pools:
                pool.name = str(value)
            continue
        if attr == "env":
            for pool in config.pools:
                pool.env.update(value)
                pool.source.update({f"env[{k}]": source for k in value})
            continue
        # names that exist in both sections (process.priority, rlimit_*) mean the pool's
        directive = _BY_ATTR["pool"].get(attr) or _BY_ATTR["global"].get(attr)
        if directive is None:
            close = difflib.get_close_matches(attr, [*_BY_ATTR["pool"], *_BY_ATTR["global"], *_ALIASES], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            errors.append(f"{source}: unknown option {key!r}{hint}")
            continue
        assert directive.type is not None
        try:
            typed = directive.type.check(value)
        except ValueError as exc:
            errors.append(f"{source}: invalid value {value!r} for {directive.name}: {exc}")
            continue
        targets = config.pools if directive.section == "pool" else [config.global_]
        for target in targets:
            setattr(target, directive.attr, typed)
            target.source[directive.name] = source
    if errors:
        raise ConfigError(errors)
    return config


def from_cli(app: str | None = None, /, **options: Any) -> Config:
    """The Config `serve [MODULE:CALLABLE] --flag ...` describes, without a file: one pool "www".

    Defaults are the table's: listen 127.0.0.1:9000, pm static, pm.max_children from
    default_max_children(), the demo app when app is None. clear_env is off, since without a file
    there is no env[...] to pass anything through. Options are as for apply_options (None = unset).
    """
    pool = PoolConfig(name="www", clear_env=False, section_source=CLI_SOURCE)
    if app is not None:
        options = {"app": app, **options}
    config = Config(global_=GlobalConfig(section_source=CLI_SOURCE), pools=[pool],
                    prefix=os.getcwd())
    apply_options(config, options)
    return check(config)


# ---------------------------------------------------------------------------------------------------
# Checks: php-fpm's fpm_conf_process_all_pools and fpm_conf_post_process, plus fastfpm's own.

def check(config: Config) -> Config:
    """Validate config in place: normalise values, derive dynamic-pm defaults, resolve relative paths.

    Returns config; raises ConfigError with every problem. Safe to call again after changing values.
    """
    errors = _check(config)
    if errors:
        raise ConfigError(errors)
    return config


def _check(config: Config) -> list[str]:
    errors: list[str] = []
    warnings: list[str] = []
    base = config.prefix or os.getcwd()
    _check_types(config.global_, "global", None, errors)
    g = config.global_
    if g.pid:
        g.pid = _absolute(g.pid, base)
    if g.error_log and g.error_log != "syslog":
        g.error_log = _absolute(g.error_log, base)

    for pool in config.pools:
        _check_pool(pool, base, errors, warnings)

    # php-fpm refuses two pools on one listen address; fastfpm also catches the same port written two
    # ways (9000 and 0.0.0.0:9000, say), which could not both be bound either.
    seen: list[tuple[Any, str, Any]] = []
    names: dict[str, Any] = {}
    for pool in config.pools:
        if pool.name.lower() in names:
            errors.append(f"{pool.where()}: [pool {pool.name}] two pools are named {pool.name!r}")
        names[pool.name.lower()] = pool
        missing = pool.section_source not in ("", CLI_SOURCE) and "listen" not in pool.source
        for directive, value in (("listen", None if missing else pool.listen),
                                 ("pm.status_listen", pool.pm_status_listen)):
            key = _address_key(value) if value else None
            if key is None:  # a pool without listen was reported already
                continue
            for other, other_directive, other_key in seen:
                if _addresses_clash(key, other_key):
                    use = "" if other_directive == "listen" else f" for {other_directive}"
                    errors.append(f"{pool.where(directive)}: [pool {pool.name}] {directive} address {value} "
                                  f"is already used by pool '{other.name}'{use} "
                                  f"({other.where(other_directive)})")
                    break
            seen.append((pool, directive, key))
    for message in warnings:
        if message not in config.warnings:
            config.warnings.append(message)
    return errors


def _check_types(target: Any, section: str, pool: str | None, errors: list[str]) -> bool:
    """Re-check every stored value (values set in code have not been through the parser)."""
    ok = True
    label = f"[pool {pool}] " if pool else ""
    for directive in _STORED[section]:
        value = getattr(target, directive.attr)
        if value is None:
            continue
        assert directive.type is not None
        try:
            setattr(target, directive.attr, directive.type.check(value))
        except ValueError as exc:
            errors.append(f"{target.where(directive.name)}: {label}invalid value {value!r} for "
                          f"'{directive.name}': {exc}")
            ok = False
    return ok


def _absolute(path: str, base: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


# report(directive, message): a check's failure or warning, placed at the directive's file:line.
_Report = Callable[[str | None, str], None]


def _check_pool(pool: Any, base: str, errors: list[str], warnings: list[str]) -> None:
    """One pool's checks, in order: its name and value types, then each concern's cross-checks."""
    name = pool.name

    def fail(directive: str | None, message: str) -> None:
        errors.append(f"{pool.where(directive)}: [pool {name}] {message}")

    def warn(directive: str | None, message: str) -> None:
        warnings.append(f"{pool.where(directive)}: [pool {name}] {message}")

    problem = _pool_name_problem(name)
    if problem:
        fail(None, problem)
    for attr in pool.derived:
        setattr(pool, attr, None)
    pool.derived.clear()
    if not _check_types(pool, "pool", name, errors):
        return  # the cross-checks below would only repeat the same problem
    pool_base = _check_prefix(pool, base, fail)
    _check_listen(pool, pool_base, warn)
    _check_accounts(pool, warn)
    _check_pm(pool, fail, warn)
    _check_slowlog(pool, pool_base, fail, warn)
    _check_access_log(pool, pool_base, fail, warn)
    _check_directories(pool, pool_base, fail, warn)
    _check_script(pool, pool_base, fail, warn)
    _check_connections(pool, fail)
    _check_status_paths(pool, fail, warn)


def _check_prefix(pool: Any, base: str, fail: _Report) -> str:
    """Resolve the pool's prefix first, and return what its other relative paths are taken from."""
    if pool.prefix:
        pool.prefix = _absolute(pool.prefix, base)
        if not os.path.isdir(pool.prefix):
            fail("prefix", f"the prefix {pool.prefix} does not exist or is not a directory")
    return pool.prefix or base


# The directives of TCP keepalive (fastfpm.address.tcp_keepalive), which unix sockets do not have.
_KEEPALIVE = ("listen.keepalive", "listen.keepalive_idle", "listen.keepalive_interval",
              "listen.keepalive_count")


def _check_listen(pool: Any, pool_base: str, warn: _Report) -> None:
    """A unix socket's path made absolute; settings for the other kind of socket are warned about."""
    from fastfpm.address import parse_address

    address = parse_address(pool.listen)
    if address.is_unix:
        pool.listen = _absolute(address.path, pool_base)
    # The pool's pm.status_listen socket takes the same owner, mode and allowed clients.
    unix = [address.is_unix]
    if pool.pm_status_listen:
        status = parse_address(pool.pm_status_listen)
        if status.is_unix:
            pool.pm_status_listen = _absolute(status.path, pool_base)
        unix.append(status.is_unix)
    if all(unix):
        if pool.listen_allowed_clients and "listen.allowed_clients" in pool.source:
            warn("listen.allowed_clients", "listen.allowed_clients only applies to TCP sockets; "
                                           "this pool listens on a unix socket")
    elif not any(unix):
        for directive in ("listen.owner", "listen.group", "listen.mode"):
            if directive in pool.source:
                warn(directive, f"{directive} only applies to unix sockets; this pool listens on TCP")
    if address.is_unix:
        # A unix socket's peer is on this machine: its end closes when the process dies, so there is
        # nothing to probe. A warning, not an error, so one file can move a pool between kinds.
        for directive in _KEEPALIVE:
            if directive in pool.source:
                warn(directive, f"{directive} only applies to TCP sockets; this pool listens on a "
                                "unix socket")


def _check_accounts(pool: Any, warn: _Report) -> None:
    """Users and groups named (not numbered) that this machine does not know: a warning, not an error."""
    for directive in ("user", "group", "listen.owner", "listen.group"):
        value = getattr(pool, directive.replace(".", "_"))
        if value and not value.isdigit():
            lookup = pwd.getpwnam if directive in ("user", "listen.owner") else grp.getgrnam
            try:
                lookup(value)
            except KeyError:
                kind = "user" if lookup is pwd.getpwnam else "group"
                warn(directive, f"{directive}: {kind} {value!r} does not exist on this machine")


def _check_pm(pool: Any, fail: _Report, warn: _Report) -> None:
    """pm: the conditions php-fpm checks in fpm_conf_process_all_pools, and directives the mode ignores."""
    if pool.pm == "dynamic":
        _check_dynamic(pool, fail)
    elif pool.pm == "ondemand":
        if pool.pm_process_idle_timeout <= 0:
            fail("pm.process_idle_timeout",
                 "pm.process_idle_timeout must be greater than 0 with pm = ondemand")
    dynamic_only = ("pm.start_servers", "pm.min_spare_servers", "pm.max_spare_servers", "pm.max_spawn_rate")
    for directive in dynamic_only:
        if pool.pm != "dynamic" and directive in pool.source:
            warn(directive, f"{directive} has no effect with pm = {pool.pm} (only with pm = dynamic)")
    if pool.pm != "ondemand" and "pm.process_idle_timeout" in pool.source:
        warn("pm.process_idle_timeout", f"pm.process_idle_timeout has no effect with pm = {pool.pm} "
                                        f"(only with pm = ondemand)")
    if pool.pm_max_requests_jitter and not pool.pm_max_requests:
        warn("pm.max_requests_jitter", "pm.max_requests_jitter has no effect while pm.max_requests is 0")


def _check_slowlog(pool: Any, pool_base: str, fail: _Report, warn: _Report) -> None:
    """The slow log and the request timeouts, as php-fpm checks them."""
    if pool.slowlog:
        pool.slowlog = _absolute(pool.slowlog, pool_base)
        if not os.path.isdir(os.path.dirname(pool.slowlog)):
            fail("slowlog", f"the directory of slowlog {pool.slowlog} does not exist")
    if pool.request_slowlog_timeout:
        if not pool.slowlog:
            fail("request_slowlog_timeout", "request_slowlog_timeout is set but slowlog is not: "
                                            "set slowlog = /path/to/file")
        if pool.request_terminate_timeout and pool.request_slowlog_timeout > pool.request_terminate_timeout:
            fail("request_slowlog_timeout",
                 f"request_slowlog_timeout ({Time().format(pool.request_slowlog_timeout)}) cannot be longer "
                 f"than request_terminate_timeout ({Time().format(pool.request_terminate_timeout)})")
    if pool.request_slowlog_trace_depth != 20 and not pool.slowlog:
        # php-fpm refuses a trace depth without slowlog; it is harmless, so fastfpm only warns
        warn("request_slowlog_trace_depth", "request_slowlog_trace_depth has no effect without slowlog")


def _check_access_log(pool: Any, pool_base: str, fail: _Report, warn: _Report) -> None:
    """access.log's directory exists; access.format and suppress_path without access.log do nothing."""
    if pool.access_log:
        pool.access_log = _absolute(pool.access_log, pool_base)
        if not os.path.isdir(os.path.dirname(pool.access_log)):
            fail("access.log", f"the directory of access.log {pool.access_log} does not exist")
    else:
        for directive in ("access.format", "access.suppress_path"):
            if directive in pool.source:
                warn(directive, f"{directive} has no effect without access.log")
    if not all(isinstance(path, str) for path in pool.access_suppress_path):
        fail("access.suppress_path", "access.suppress_path entries must be strings")


def _check_directories(pool: Any, pool_base: str, fail: _Report, warn: _Report) -> None:
    """chdir must exist; python_path directories should (a warning); both are made absolute."""
    if pool.chdir:
        pool.chdir = _absolute(pool.chdir, pool_base)
        if not os.path.isdir(pool.chdir):
            fail("chdir", f"the chdir directory {pool.chdir} does not exist or is not a directory")
    resolved = []
    for directory in pool.python_path:
        directory = _absolute(directory, pool_base)
        if not os.path.isdir(directory):
            warn("python_path", f"python_path directory {directory} does not exist")
        resolved.append(directory)
    pool.python_path = resolved


def _check_script(pool: Any, pool_base: str, fail: _Report, warn: _Report) -> None:
    """Script mode needs script.root, an existing directory; its directives without it are warned."""
    if pool.app != SCRIPT_APP:
        for name in ("script.root", "script.revalidate_freq", "security.limit_extensions"):
            if name in pool.source:
                warn(name, f"{name} has no effect unless app = {SCRIPT_APP}")
        return
    if not pool.script_root:
        fail("app", f"app = {SCRIPT_APP} (script mode) needs script.root, the directory of the scripts")
        return
    pool.script_root = _absolute(pool.script_root, pool_base)
    if not os.path.isdir(pool.script_root):
        fail("script.root",
             f"the script.root directory {pool.script_root} does not exist or is not a directory")
    if pool.mount:
        fail("mount", "mount has no effect in script mode: SCRIPT_NAME is the script's URL path; remove it")
    if not pool.security_limit_extensions:
        warn("security.limit_extensions", "security.limit_extensions is empty: any file under "
                                          "script.root runs as a script, whatever its extension")


def _check_connections(pool: Any, fail: _Report) -> None:
    """fastfpm's connection timeouts, and env[...] set in code (a file's are checked as they are read)."""
    for name in ("idle_timeout", "read_timeout", "request_header_timeout", "request_body_timeout"):
        value = getattr(pool, name)
        if value <= 0:
            fail(name, f"{name} must be greater than 0")
        elif value > MAX_CONNECTION_TIMEOUT:
            fail(name, f"{name} cannot be longer than {Time().format(MAX_CONNECTION_TIMEOUT)}")
    for key, value in list(pool.env.items()):
        if not isinstance(key, str) or not key or "=" in key or not isinstance(value, str):
            fail(f"env[{key}]", f"env[{key}]: names and values must be strings, names without '='")


def _check_status_paths(pool: Any, fail: _Report, warn: _Report) -> None:
    """pm.status_path and ping.path: one answer per path; ping.response needs ping.path; a
    pm.status_listen needs at least one of them to answer."""
    if pool.pm_status_path and pool.pm_status_path == pool.ping_path:
        fail("ping.path", f"ping.path and pm.status_path are both {pool.ping_path}; give each its own path")
    if not pool.ping_path and "ping.response" in pool.source:
        warn("ping.response", "ping.response has no effect without ping.path")
    if pool.pm_status_listen and not (pool.pm_status_path or pool.ping_path):
        # php-fpm serves its page at "/" then, and makes "/" the pool's own status path as well,
        # taking that path from the application; an error says what is missing instead.
        fail("pm.status_listen", "pm.status_listen answers only pm.status_path and ping.path, and this "
                                 "pool sets neither: add pm.status_path = /status (or ping.path)")


def _check_dynamic(pool: Any, fail: _Report) -> None:
    """php-fpm's checks for pm = dynamic, with fastfpm's defaults for unset spare counts."""
    children = pool.pm_max_children
    if pool.pm_min_spare_servers is None:
        pool.pm_min_spare_servers = max(1, children // 4)
        pool.derived.add("pm_min_spare_servers")
    if pool.pm_max_spare_servers is None:
        pool.pm_max_spare_servers = max(pool.pm_min_spare_servers, children // 2)
        pool.derived.add("pm_max_spare_servers")
    low, high = pool.pm_min_spare_servers, pool.pm_max_spare_servers
    if low < 1:
        fail("pm.min_spare_servers", f"pm.min_spare_servers ({low}) must be at least 1")
        return
    if high < 1:
        fail("pm.max_spare_servers", f"pm.max_spare_servers ({high}) must be at least 1")
        return
    if low > children:
        fail("pm.min_spare_servers", f"pm.min_spare_servers ({low}) cannot be more than "
                                     f"pm.max_children ({children})")
        return
    if high > children:
        fail("pm.max_spare_servers", f"pm.max_spare_servers ({high}) cannot be more than "
                                     f"pm.max_children ({children})")
        return
    if high < low:
        fail("pm.max_spare_servers", f"pm.max_spare_servers ({high}) cannot be less than "
                                     f"pm.min_spare_servers ({low})")
        return
    if not pool.pm_start_servers:
        pool.pm_start_servers = low + (high - low) // 2
        pool.derived.add("pm_start_servers")
    elif not low <= pool.pm_start_servers <= high:
        fail("pm.start_servers", f"pm.start_servers ({pool.pm_start_servers}) must be between "
                                 f"pm.min_spare_servers ({low}) and pm.max_spare_servers ({high})")


def _address_key(listen: str) -> tuple[str, ...] | None:
    from fastfpm.address import parse_address

    try:
        address = parse_address(listen)
    except ValueError:
        return None
    if address.is_unix:
        return ("unix", os.path.normpath(os.path.abspath(address.path)))
    host = (address.host or "").lower()
    if host in ("0.0.0.0", "::"):
        host = ""
    return ("tcp", host, str(address.port))


def _addresses_clash(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "unix":
        return a == b
    if a[2] != b[2] or a[2] == "0":  # port 0: the kernel picks a free port for each
        return False
    return a[1] == b[1] or a[1] == "" or b[1] == ""


# ---------------------------------------------------------------------------------------------------
# Output: the -tt dump and the reference page.

def _quote(text: str) -> str:
    """text as an INI value that reads back unchanged."""
    if text == "":
        return '""'
    if text != text.strip() or any(c in text for c in ";\"'$") or text[0] in "[#":
        if "'" not in text:
            return f"'{text}'"
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'
    return text


def _format_value(directive: Directive, value: Any) -> str:
    assert directive.type is not None
    return _quote(directive.type.format(value))


def dump(config: Config) -> str:
    """The effective configuration as INI (what `serve -tt` prints); it loads back to the same values."""
    lines = ["; effective fastfpm configuration" + (f" of {config.path}" if config.path else ""),
             "; unset directives are shown commented out", "", "[global]"]

    def section(target: Any, kind: str) -> None:
        for directive in _STORED[kind]:
            value = getattr(target, directive.attr)
            if value is None:
                lines.append(f";{directive.name} =")
            else:
                text = _format_value(directive, value)
                lines.append(f"{directive.name} = {text}" if text != '""' else f"{directive.name} =")

    section(config.global_, "global")
    for pool in config.pools:
        lines += ["", f"[{pool.name}]"]
        section(pool, "pool")
        for key, value in pool.env.items():
            lines.append(f"env[{key}] = {_quote(value)}")
        for path in pool.access_suppress_path:
            lines.append(f"access.suppress_path[] = {_quote(path)}")
    return "\n".join(lines) + "\n"


_MARKDOWN_INTRO = """\
# Configuration reference

<!-- Generated by `python -m fastfpm.config --markdown > docs/configuration.md` from the directive table
in fastfpm/config.py. Edit the table, not this file. -->

fastfpm reads php-fpm's configuration format: take a `php-fpm.conf` and its pool files, replace the
PHP-only lines with `app = MODULE:CALLABLE`, and run `python -m fastfpm serve -c fastfpm.conf`.
`python -m fastfpm check -c FILE` (or `serve -t`) checks a file; `serve -tt` also prints the effective
configuration. Every problem is reported as `file:line: message`, and nothing starts until there are none.

## The format

```ini
[global]
error_log = /var/log/fastfpm.log
include = pool.d/*.conf

[www]
listen = /run/fastfpm/$pool.sock
app = myapp.wsgi:application
pm = dynamic
pm.max_children = 10
env[DATABASE_URL] = ${DATABASE_URL}
```

- A `[global]` section and one section per pool; the section name is the pool's name. Directives before
  the first section are global. A section that appears again (in the same or another file) reopens the
  pool, as in php-fpm.
- Comments start with `;` (also after a value) or with `#` at the start of a line.
- Directive names are case-insensitive. A directive set twice keeps the last value.
- `include = PATTERN` reads more files there, in any section; a glob reads every match in sorted order
  (directories are skipped), and includes nest. A relative pattern is taken from the including file's
  directory, or from the prefix when one is given (`-p`, php-fpm's rule). A pattern that matches nothing
  is a warning (an empty `pool.d/` is normal); a plain file name that does not exist is an error, and so
  is an include cycle. An included file starts in the including file's section; after it, the including
  file goes on in its own section (php-fpm would go on in the section the included file ended in).
- `$pool` in a value is replaced by the pool's name (an error in `[global]`).
- `${VAR}` is replaced by the environment variable VAR, `${VAR:-default}` gives a fallback (PHP 8.3's
  syntax). An unset variable without a fallback is an error, where PHP would silently use an empty string.
- `"double quotes"` keep `;` and spaces and still expand `${VAR}` and `$pool` (escape with `\\"`, `\\\\`,
  `\\$`); `'single quotes'` are taken literally.
- An empty value (`name =`) means "not set" (the default applies); for a boolean it means no.
- Times: `30`, `30s`, `5m`, `1h`, `1d` (a plain number is seconds; fastfpm also takes fractions: `0.5s`).
- Booleans: `yes`/`no`, `on`/`off`, `true`/`false`, `1`/`0`.
- Sizes: bytes, or with `K`, `M`, `G` (powers of 1024): `64K`.
- `env[NAME] = value` sets an environment variable of the pool's workers; `env[NAME] = $NAME` copies
  the master's (empty when it has none), as php-fpm does.
- Relative paths (`pid`, `error_log`, `slowlog`, `chdir`, `python_path`, a unix `listen` socket) are taken
  from the pool's `prefix`, else the prefix given with `-p`, else the directory of the main configuration
  file. (php-fpm uses /usr or /var; neither means anything for a Python app.)
- A pool built from the command line alone (`serve myapp:application --max-children 4`) uses the
  defaults below: pool `www`, `listen = 127.0.0.1:9000`, `pm = static`, `pm.max_children` =
  `min(32, max(2, 2 x CPUs))` (two workers per CPU keep the CPUs busy while some wait on I/O; the cap
  stops a big machine from forking hundreds of app copies), and `clear_env = no`, since there is no
  `env[...]` to pass anything through.

## Checks

As php-fpm (`fpm_conf_process_all_pools`): every pool needs `listen` (and, in fastfpm, `app`);
two pools cannot share a listen address (fastfpm also catches one port written two ways, such as
`9000` and `0.0.0.0:9000`); `pm.max_children` >= 1; with `pm = dynamic`, `pm.min_spare_servers` and
`pm.max_spare_servers` >= 1 and not above `pm.max_children`, `pm.max_spare_servers` >=
`pm.min_spare_servers`, `pm.start_servers` between the two, `pm.max_spawn_rate` >= 1; with
`pm = ondemand`, `pm.process_idle_timeout` > 0; `process.priority` between -19 and 20;
`request_slowlog_timeout` needs `slowlog` and cannot exceed `request_terminate_timeout`; `chdir` and
`prefix` must be existing directories; `log_limit` >= 512; script mode (`app = script:`) needs
`script.root`, an existing directory, and refuses `mount`; each `security.limit_extensions` entry
starts with '.'.

Warnings (reported, not fatal): a directive that has no effect with the pool's `pm` (or
`request_slowlog_trace_depth` without `slowlog`, which php-fpm refuses), socket ownership
settings on a TCP socket (or `listen.allowed_clients` on a unix one), a user or group this machine does
not know, a `python_path` directory that does not exist, an include pattern that matches nothing,
an empty `security.limit_extensions` in script mode (php-fpm allows every file then, and so does
fastfpm), `script.*` or `security.limit_extensions` without script mode.

## Differences from php-fpm, in short

- `pm` and `pm.max_children` have defaults (php-fpm requires them), and so do `pm.min_spare_servers`
  and `pm.max_spare_servers` with `pm = dynamic`.
- `daemonize` defaults to no, `error_log` to standard error, `process_control_timeout` to 10s.
- PHP-only directives (`php_value[...]`, `php_admin_value[...]`, `php_flag[...]`, `php_admin_flag[...]`)
  are errors that say what to do instead, never silently ignored.
- Directives fastfpm does not implement yet (the status page, ping, the access log, `process.dumpable`)
  are errors ("not supported yet"), so a setting never silently does nothing. The few that are accepted
  without effect (`log_buffering`, `events.mechanism`, `request_terminate_timeout_track_finished`) say
  so with a warning.

## How the process manager applies them

php-fpm's algorithm (`fpm_pctl_perform_idle_server_maintenance`), once a second per pool:

- `static`: `pm.max_children` workers, each replaced as soon as it exits.
- `dynamic`: starts `pm.start_servers`. While fewer than `pm.min_spare_servers` workers are idle it spawns
  1, 2, 4, 8 ... workers per second (up to `pm.max_spawn_rate`, never past `pm.max_children`), warning
  "seems busy" from 8 on. While more than `pm.max_spare_servers` are idle it stops one idle worker per
  second. When `pm.max_children` stops a spawn it logs "server reached pm.max_children setting" once per
  episode and counts it (the status page's "max children reached").
- `ondemand`: no worker at start; a connection that finds no idle worker gets one spawned (up to
  `pm.max_children`); a worker idle longer than `pm.process_idle_timeout` is stopped, one per second.
- `process.max` caps all pools together; the first pools in the file get the room first.
- A worker that exits for any other reason than being stopped by the process manager (`pm.max_requests`,
  a crash, `request_terminate_timeout`) is replaced at once, in every mode.

Where fastfpm differs, and why: the idle worker stopped is the one idle the longest (php-fpm: the oldest
process); workers still importing the app count as idle-to-be, so a slow import does not make `dynamic`
fork more every second; the spawn rate never overshoots `pm.max_spawn_rate`; an episode of
`pm.max_children` warnings ends as soon as the pool is no longer short of workers (php-fpm: at its next
spawn); `ondemand` counts "max children reached" only when a connection really has to wait.
"""


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_default(directive: Directive) -> str:
    if directive.default_doc:
        return directive.default_doc
    if directive.default is None:
        return "not set"
    assert directive.type is not None
    shown = directive.type.format(directive.default_value())
    return f"`{shown}`" if shown else "empty"


def render_markdown() -> str:
    """docs/configuration.md: the format, the checks, and every directive from the table."""
    out = [_MARKDOWN_INTRO]
    groups = (
        ("Global directives (`[global]`)",
         lambda d: d.section in ("global", "any") and d.status == "supported"),
        ("Pool directives (php-fpm's)", lambda d: d.section == "pool" and d.status == "supported"
         and d.origin == "php-fpm"),
        ("Pool directives (fastfpm's own)", lambda d: d.section == "pool" and d.origin == "fastfpm"),
    )
    for title, wanted in groups:
        out += [f"## {title}", "", "| directive | type | default | what it does |", "|---|---|---|---|"]
        for d in DIRECTIVES:
            if not wanted(d):
                continue
            assert d.type is not None
            name = f"`{d.name}[NAME]`" if d.array else f"`{d.name}`"
            what = d.doc + (f" *fastfpm:* {d.note}" if d.note else "")
            out.append(f"| {name} | {_md_escape(d.type.label)} | {_md_escape(_md_default(d))} | "
                       f"{_md_escape(what)} |")
        out.append("")
    out += ["## php-fpm directives fastfpm refuses or ignores", "",
            "Each of these is reported with its `file:line` and the text below.", "",
            "| directive | section | what happens |", "|---|---|---|"]
    for d in DIRECTIVES:
        if d.status == "supported":
            continue
        name = f"`{d.name}[...]`" if d.array else f"`{d.name}`"
        verdict = "accepted with a warning: " if d.status == "ignored" else "error: "
        out.append(f"| {name} | {d.section} | {_md_escape(verdict + d.note)} |")
    out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------
# The configuration test: `python -m fastfpm check`, `serve -t` / `-tt` and `python -m fastfpm.config`.

@dataclass(frozen=True)
class CheckWording:
    """What a configuration test puts before each kind of line it writes to stderr."""

    error: str      # a problem in the configuration (the message is already `file:line: ...`)
    refusal: str    # a problem the caller's own check found (workers that could not start)
    failed: str     # "configuration file X test failed"
    passed: str     # "configuration file X test is successful"


# fastfpm's commands (check, serve -t); python -m fastfpm.config words its lines as `php-fpm -t` does.
FASTFPM_WORDING = CheckWording(error="", refusal="fastfpm: ", failed="fastfpm: ", passed="fastfpm: ")
PHP_FPM_WORDING = CheckWording(error="ERROR: ", refusal="ERROR: ", failed="ERROR: ", passed="NOTICE: ")


def run_check(build: Callable[[], Config], path: str | None, *, show: bool = False,
              refusals: Callable[[Config], list[str]] | None = None,
              wording: CheckWording = FASTFPM_WORDING) -> int:
    """Test a configuration, as php-fpm -t does, and return the exit status: 0 when it is usable, else 1.

    build() reads it (ConfigError: every problem is printed); refusals(config) lists what else stops
    it from running (serve's worker identity rules). Warnings are printed, show prints the effective
    configuration on stdout (-tt), and the last line on stderr says whether the test of path (None:
    the command line) failed or is successful.
    """
    name = path or "(command line)"
    try:
        config = build()
    except ConfigError as exc:
        return _check_failed(exc.errors, wording.error, name, wording)
    problems = refusals(config) if refusals is not None else []
    if problems:
        return _check_failed(problems, wording.refusal, name, wording)
    for warning in config.warnings:
        print(f"WARNING: {warning}", file=sys.stderr)
    if show:
        print(dump(config))
    print(f"{wording.passed}configuration file {name} test is successful", file=sys.stderr)
    return 0


def _check_failed(problems: Iterable[str], prefix: str, name: str, wording: CheckWording) -> int:
    for problem in problems:
        print(f"{prefix}{problem}", file=sys.stderr)
    print(f"{wording.failed}configuration file {name} test failed", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """`python -m fastfpm.config FILE` checks a file; --dump prints it; --markdown prints the docs."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastfpm.config", description=main.__doc__)
    parser.add_argument("file", nargs="?", help="configuration file to check")
    parser.add_argument("--dump", action="store_true", help="print the effective configuration (as -tt)")
    parser.add_argument("--markdown", action="store_true", help="print docs/configuration.md")
    parser.add_argument("-p", "--prefix", help="prefix for relative paths (php-fpm's -p)")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(render_markdown())
        return 0
    if not args.file:
        parser.error("a configuration file is needed (or --markdown)")
    return run_check(lambda: load(args.file, prefix=args.prefix), args.file, show=args.dump,
                     wording=PHP_FPM_WORDING)

if __name__ == "__main__":
    sys.exit(main())
