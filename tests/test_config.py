"""fastfpm.config: php-fpm's INI format, the directive table, checks, the -tt dump, the docs, `check`."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from fastfpm import config as cfg
from fastfpm.config import Config, ConfigError, PoolConfig, check, dump, from_cli, load
from tests.servers import run_cli, write_config

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
POOL = "[www]\nlisten = 127.0.0.1:9000\napp = myapp:application\n"
APP = "tests.apps.counters_app:app"


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def load_text(tmp_path: Path, text: str, environ: dict[str, str] | None = None,
              name: str = "fpm.conf") -> Config:
    return load(write(tmp_path, name, text), environ=environ or {})


def errors_of(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text, environ)
    return info.value.errors


def one_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    errors = errors_of(tmp_path, text, environ)
    assert len(errors) == 1, errors
    return errors[0]


def pool_with(tmp_path: Path, lines: str, environ: dict[str, str] | None = None) -> PoolConfig:
    return load_text(tmp_path, POOL + textwrap.dedent(lines), environ).pools[0]


# ---------------------------------------------------------------------------------------------------
# Debian's stock files

def test_stock_debian_files_load_cleanly():
    config = load(DATA / "php-fpm.conf")
    assert config.warnings == []
    assert [p.name for p in config.pools] == ["www"]
    assert config.files == [str(DATA / "php-fpm.conf"), str(DATA / "www.conf")]
    g = config.global_
    assert g.pid == "/run/php/php8.2-fpm.pid"
    assert g.error_log == "/var/log/php8.2-fpm.log"
    www = config.pool("www")
    assert (www.user, www.group) == ("www-data", "www-data")
    assert www.listen == "/run/php/php8.2-fpm.sock"
    assert (www.listen_owner, www.listen_group, www.listen_mode) == ("www-data", "www-data", 0o660)
    assert www.pm == "dynamic"
    assert (www.pm_max_children, www.pm_start_servers, www.pm_min_spare_servers,
            www.pm_max_spare_servers) == (5, 2, 1, 3)
    assert www.app == "myapp.wsgi:application"
    line = _line_of(DATA / "www.conf", "pm.max_children =")
    assert www.source["pm.max_children"] == f"{DATA / 'www.conf'}:{line}"


def test_stock_pool_file_loads_alone():
    config = load(DATA / "www.conf")
    assert config.pool("WWW").pm_max_spare_servers == 3


def test_stock_pool_file_with_php_lines_uncommented_is_refused(tmp_path):
    text = (DATA / "www.conf").read_text().replace(";php_admin_value[memory_limit] = 32M",
                                                    "php_admin_value[memory_limit] = 32M")
    path = tmp_path / "www.conf"
    path.write_text(text.replace("app = myapp.wsgi:application\n", "app = myapp.wsgi:application\n"
                                 "php_admin_value[memory_limit] = 32M\n"))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert info.value.errors == [
        f"{path}:{_line_of(path, 'php_admin_value[memory_limit]')}: 'php_admin_value[memory_limit]': "
        f"{cfg.PHP_SETTINGS_MESSAGE}"]


def _line_of(path: Path, text: str) -> int:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(text):
            return number
    raise AssertionError(text)


# ---------------------------------------------------------------------------------------------------
# value types, one directive of each

@pytest.mark.parametrize(("line", "attr", "expected"), [
    ("pm.max_children = 12", "pm_max_children", 12),
    ("pm.max_requests = +500", "pm_max_requests", 500),
    ("listen.backlog = -1", "listen_backlog", -1),
    ("request_terminate_timeout = 30", "request_terminate_timeout", 30.0),
    ("request_terminate_timeout = 30s", "request_terminate_timeout", 30.0),
    ("request_terminate_timeout = 2m", "request_terminate_timeout", 120.0),
    ("request_terminate_timeout = 1h", "request_terminate_timeout", 3600.0),
    ("request_terminate_timeout = 1d", "request_terminate_timeout", 86400.0),
    ("request_terminate_timeout = 0.5s", "request_terminate_timeout", 0.5),
    ("request_terminate_timeout = 0", "request_terminate_timeout", 0.0),
    ("idle_timeout = 2.5", "idle_timeout", 2.5),
    ("catch_workers_output = yes", "catch_workers_output", True),
    ("catch_workers_output = On", "catch_workers_output", True),
    ("catch_workers_output = TRUE", "catch_workers_output", True),
    ("catch_workers_output = 1", "catch_workers_output", True),
    ("clear_env = no", "clear_env", False),
    ("clear_env = off", "clear_env", False),
    ("clear_env = false", "clear_env", False),
    ("clear_env = 0", "clear_env", False),
    ("clear_env =", "clear_env", False),
    ("max_params_size = 1024", "max_params_size", 1024),
    ("max_params_size = 128K", "max_params_size", 131072),
    ("max_params_size = 1m", "max_params_size", 1048576),
    ("max_params_size = 2KiB", "max_params_size", 2048),
    ("pm = ondemand", "pm", "ondemand"),
    ("pm = Static", "pm", "static"),
    ("listen.mode = 0600", "listen_mode", 0o600),
    ("listen.mode = 666", "listen_mode", 0o666),
    ("rlimit_core = unlimited", "rlimit_core", -1),
    ("rlimit_core = 0", "rlimit_core", 0),
    ("rlimit_files = 4096", "rlimit_files", 4096),
    ("process.priority = -19", "process_priority", -19),
    ("user = nobody", "user", "nobody"),
    ("listen.allowed_clients = 127.0.0.1, ::1,10.0.0.0/8", "listen_allowed_clients",
     ["127.0.0.1", "::1", "10.0.0.0/8"]),
    ("listen.allowed_clients =", "listen_allowed_clients", []),
    ("python_path = /usr:/tmp", "python_path", ["/usr", "/tmp"]),
    ("mount = /app/", "mount", "/app"),
    ("mount = /", "mount", ""),
    ("app = pkg.mod:make_app.wsgi", "app", "pkg.mod:make_app.wsgi"),
    ("app = justamodule", "app", "justamodule"),
    ("request_slowlog_trace_depth = 5\nslowlog = /tmp/slow.log", "request_slowlog_trace_depth", 5),
    ("pm.max_requests_jitter = 50\npm.max_requests = 500", "pm_max_requests_jitter", 50),
    ("read_timeout = 1m", "read_timeout", 60.0),
    ("client_max_body_size = 0", "client_max_body_size", 0),
    ("client_max_body_size = 10m", "client_max_body_size", 10485760),
    ("client_max_body_size = 1000", "client_max_body_size", 1000),
    ("security.keep_http_proxy = yes", "security_keep_http_proxy", True),
    ("request_header_timeout = 3s", "request_header_timeout", 3.0),
    ("request_body_timeout = 0.5", "request_body_timeout", 0.5),
    ("pm.max_memory = 256M", "pm_max_memory", 256 << 20),
    ("pm.max_memory = 1g", "pm_max_memory", 1 << 30),
    ("pm.max_memory = 0", "pm_max_memory", 0),
    ("listen.keepalive = off", "listen_keepalive", False),
    ("listen.keepalive_idle = 2m", "listen_keepalive_idle", 120.0),
    ("listen.keepalive_idle = 32767", "listen_keepalive_idle", 32767.0),
    ("listen.keepalive_interval = 1s", "listen_keepalive_interval", 1.0),
    ("listen.keepalive_count = 127", "listen_keepalive_count", 127),
])
def test_pool_value_types(tmp_path, line, attr, expected):
    pool = pool_with(tmp_path, line + "\n")
    assert getattr(pool, attr) == expected


@pytest.mark.parametrize(("line", "attr", "expected"), [
    ("log_level = WARN", "log_level", "warning"),
    ("log_level = debug", "log_level", "debug"),
    ("error_log = SysLog", "error_log", "syslog"),
    ("syslog.facility = LOCAL3", "syslog_facility", "local3"),
    ("syslog.ident = myapp", "syslog_ident", "myapp"),
    ("log_limit = 4096", "log_limit", 4096),
    ("emergency_restart_threshold = 10", "emergency_restart_threshold", 10),
    ("emergency_restart_interval = 1m", "emergency_restart_interval", 60.0),
    ("process_control_timeout = 10s", "process_control_timeout", 10.0),
    ("process.max = 128", "process_max", 128),
    ("process.priority = 20", "process_priority", 20),
    ("daemonize = yes", "daemonize", True),
    ("rlimit_files = 1024", "rlimit_files", 1024),
    ("rlimit_core = unlimited", "rlimit_core", -1),
    ("systemd_interval = 0", "systemd_interval", 0.0),
    ("pid = /run/fastfpm.pid", "pid", "/run/fastfpm.pid"),
])
def test_global_value_types(tmp_path, line, attr, expected):
    config = load_text(tmp_path, f"[global]\n{line}\n" + POOL)
    assert getattr(config.global_, attr) == expected


@pytest.mark.parametrize(("line", "fragment"), [
    ("pm.max_children = ten", "invalid value 'ten' for 'pm.max_children': expected a whole number"),
    ("pm.max_children = 0", "invalid value '0' for 'pm.max_children': must be at least 1"),
    ("pm.max_requests = -1", "must be at least 0"),
    ("request_terminate_timeout = 10x", "expected a time such as 30, 30s, 5m, 1h or 1d"),
    ("request_terminate_timeout = -5", "expected a time"),
    ("clear_env = maybe", "expected yes/no, on/off, true/false or 1/0"),
    ("max_params_size = 12Q", "expected a size such as 65536, 64K or 1M"),
    ("max_params_size = 100", "must be at least 1K"),
    ("client_max_body_size = 10X", "invalid value '10X' for 'client_max_body_size': expected a size"),
    ("client_max_body_size = -1", "expected a size such as 65536, 64K or 1M"),
    ("security.keep_http_proxy = sometimes", "expected yes/no"),
    ("pm.max_memory = 256MB!", "invalid value '256MB!' for 'pm.max_memory': expected a size"),
    ("pm.max_memory = -100M", "expected a size such as 65536, 64K or 1M"),
    ("pm.max_memory = lots", "expected a size"),
    ("pm = lazy", "expected one of static, dynamic, ondemand"),
    ("listen.mode = 0999", "expected an octal file mode"),
    ("rlimit_core = lots", "expected a number >= 0 or 'unlimited'"),
    ("process.priority = -20", "must be at least -19"),
    ("process.priority = 21", "must be at most 20"),
    ("listen.allowed_clients = 127.0.0.1,localhost", "'localhost' is not an IP address or network"),
    ("mount = app", "a mount prefix starts with '/'"),
    ("app = my-app:application", "expected MODULE:CALLABLE"),
    ("on_worker_start = myapp.hooks", "invalid value 'myapp.hooks' for 'on_worker_start': expected "
                                      "MODULE:CALLABLE"),
    ("on_worker_start = my-app:open", "expected MODULE:CALLABLE"),
    ("on_worker_exit = myapp:close:now", "invalid value 'myapp:close:now' for 'on_worker_exit'"),
    ("on_worker_exit = :close", "expected MODULE:CALLABLE"),
    ("listen = 127.0.0.1:99999", "out of range"),
    ("listen = ::1:9000", "write IPv6 addresses in brackets"),
    ("listen.keepalive = sometimes", "invalid value 'sometimes' for 'listen.keepalive': expected yes/no"),
    ("listen.keepalive_idle = 1.5s", "'listen.keepalive_idle': must be whole seconds, not 1.5s"),
    ("listen.keepalive_idle = 0", "'listen.keepalive_idle': must be from 1s to 32767s"),
    ("listen.keepalive_idle = 10h", "'listen.keepalive_idle': must be from 1s to 32767s"),
    ("listen.keepalive_interval = soon", "'listen.keepalive_interval': expected a time such as 30"),
    ("listen.keepalive_interval = 0", "'listen.keepalive_interval': must be from 1s to 32767s"),
    ("listen.keepalive_count = 0", "'listen.keepalive_count': must be at least 1"),
    ("listen.keepalive_count = 128", "'listen.keepalive_count': must be at most 127"),
])
def test_bad_values_are_reported_with_file_and_line(tmp_path, line, fragment):
    error = one_error(tmp_path, POOL + line + "\n")
    assert error.startswith(f"{tmp_path / 'fpm.conf'}:4: ")
    assert fragment in error


@pytest.mark.parametrize(("line", "fragment"), [
    ("log_level = loud", "invalid value 'loud' for 'log_level'"),
    ("log_limit = 100", "must be at least 512"),
    ("syslog.facility = kernel", "invalid value 'kernel' for 'syslog.facility'"),
    ("process.max = -1", "must be at least 0"),
    ("daemonize = sometimes", "expected yes/no"),
])
def test_bad_global_values(tmp_path, line, fragment):
    error = one_error(tmp_path, f"[global]\n{line}\n" + POOL)
    assert error.startswith(f"{tmp_path / 'fpm.conf'}:2: ")
    assert fragment in error


def test_every_stored_directive_parses_its_own_formatted_default():
    for directive in cfg.DIRECTIVES:
        if not directive.stored:
            continue
        value = directive.default_value()
        if value is None:
            continue
        assert directive.type.parse(directive.type.format(value)) == value, directive.name


def test_every_directive_is_documented_and_named_consistently():
    seen = set()
    for directive in cfg.DIRECTIVES:
        assert (directive.section, directive.name) not in seen, directive.name
        seen.add((directive.section, directive.name))
        assert directive.section in ("global", "pool", "any")
        assert directive.status in ("supported", "ignored", "unsupported", "php")
        if directive.status == "supported":
            assert directive.doc.endswith("."), directive.name
            assert directive.type is not None
        else:
            assert directive.note, directive.name
    issue_list = """pid error_log syslog.facility syslog.ident log_level log_limit emergency_restart_threshold
        emergency_restart_interval process_control_timeout process.max process.priority daemonize
        rlimit_files rlimit_core systemd_interval include""".split()
    assert {d.name for d in cfg.DIRECTIVES if d.section in ("global", "any") and d.status == "supported"} \
        == set(issue_list)
    pools = """user group listen listen.backlog listen.owner listen.group listen.mode listen.allowed_clients
        process.priority pm pm.max_children pm.start_servers pm.min_spare_servers pm.max_spare_servers
        pm.max_spawn_rate pm.process_idle_timeout pm.max_requests request_terminate_timeout
        request_slowlog_timeout request_slowlog_trace_depth slowlog rlimit_files rlimit_core chdir
        catch_workers_output decorate_workers_output clear_env env app python_path mount
        pm.max_requests_jitter pm.max_memory idle_timeout max_params_size""".split()
    supported = {d.name for d in cfg.DIRECTIVES if d.section == "pool" and d.status == "supported"}
    assert set(pools) <= supported


def test_php_fpm_defaults_are_kept():
    pool = PoolConfig()
    assert pool.listen_backlog == 511
    assert pool.listen_mode == 0o660
    assert pool.pm_max_spawn_rate == 32
    assert pool.pm_process_idle_timeout == 10.0
    assert pool.request_slowlog_trace_depth == 20
    assert (pool.clear_env, pool.decorate_workers_output, pool.catch_workers_output) == (True, True, False)
    assert (pool.idle_timeout, pool.max_params_size) == (5.0, 65536)
    g = cfg.GlobalConfig()
    assert (g.log_level, g.log_limit, g.syslog_facility, g.process_max) == ("notice", 1024, "daemon", 0)
    assert (g.daemonize, g.error_log, g.systemd_interval) == (False, None, 10.0)


def test_default_max_children_rule(monkeypatch):
    for cpus, expected in ((None, 2), (1, 2), (2, 4), (8, 16), (16, 32), (64, 32)):
        monkeypatch.setattr(os, "cpu_count", lambda cpus=cpus: cpus)
        assert cfg.default_max_children() == expected
        assert PoolConfig().pm_max_children == expected


# ---------------------------------------------------------------------------------------------------
# the INI syntax

def test_comments_blank_lines_and_case(tmp_path):
    config = load_text(tmp_path, """
        ; a comment
        # another comment
        [Global]
        LOG_LEVEL = debug ; trailing comment

        [www]   ; the pool
        listen = 127.0.0.1:9001
        app = myapp:application
        PM.Max_Children = 3
        user = "nobody" ; quoted then a comment
        """)
    assert config.global_.log_level == "debug"
    pool = config.pool("www")
    assert pool.pm_max_children == 3
    assert pool.user == "nobody"


def test_directives_before_any_section_are_global(tmp_path):
    config = load_text(tmp_path, "log_level = error\n" + POOL)
    assert config.global_.log_level == "error"


def test_quoting(tmp_path):
    pool = pool_with(tmp_path, """
        env[A] = "semi;colon and  spaces "
        env[B] = 'single ${NOPE} $pool'
        env[C] = "esc \\"q\\" \\$pool \\\\"
        env[D] = "x"'y'z
        env[E] = plain value   ; comment
        """)
    assert pool.env == {"A": "semi;colon and  spaces ", "B": "single ${NOPE} $pool",
                        "C": 'esc "q" $pool \\', "D": "xyz", "E": "plain value"}


def test_unterminated_quote_is_an_error(tmp_path):
    assert "missing its closing" in one_error(tmp_path, POOL + 'user = "nobody\n')


def test_pool_expansion(tmp_path):
    config = load_text(tmp_path, """
        [api]
        listen = /tmp/$pool.sock
        app = myapp:application
        slowlog = /tmp/$pool.slow
        env[POOL] = "$pool"
        env[SUFFIX] = $poolx
        """)
    pool = config.pool("api")
    assert pool.listen == "/tmp/api.sock"
    assert pool.slowlog == "/tmp/api.slow"
    assert pool.env == {"POOL": "api", "SUFFIX": "apix"}


def test_pool_expansion_in_global_is_an_error(tmp_path):
    error = one_error(tmp_path, "[global]\npid = /run/$pool.pid\n" + POOL)
    assert error == f"{tmp_path / 'fpm.conf'}:2: pid: '$pool' can only be used inside a pool section"


def test_environment_variables(tmp_path):
    environ = {"PORT": "9123", "APP": "svc.wsgi:app", "LEVEL": "debug"}
    config = load_text(tmp_path, """
        [global]
        log_level = ${LEVEL}
        [www]
        listen = 127.0.0.1:${PORT}
        app = "${APP}"
        user = ${MISSING:-nobody}
        group = ${MISSING:-}
        """, environ)
    pool = config.pool("www")
    assert config.global_.log_level == "debug"
    assert (pool.listen, pool.app) == ("127.0.0.1:9123", "svc.wsgi:app")
    assert (pool.user, pool.group) == ("nobody", None)


def test_unset_environment_variable_is_an_error(tmp_path):
    error = one_error(tmp_path, POOL + "user = ${NOBODY_SET_THIS}\n")
    assert error == (f"{tmp_path / 'fpm.conf'}:4: user: environment variable NOBODY_SET_THIS is not set "
                     f"(write ${{NOBODY_SET_THIS:-default}} to give a fallback)")
    assert "'${' without a closing '}'" in one_error(tmp_path, POOL + "user = ${OOPS\n")


def test_env_array(tmp_path):
    pool = pool_with(tmp_path, """
        env[PATH] = /usr/local/bin:/usr/bin:/bin
        env[HOSTNAME] = $HOSTNAME
        env[GONE] = $NOT_IN_ENVIRON
        env[LITERAL] = '$HOSTNAME'
        env[lower_Case] = x
        """, {"HOSTNAME": "web1"})
    assert pool.env == {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOSTNAME": "web1", "GONE": "",
                        "LITERAL": "$HOSTNAME", "lower_Case": "x"}
    assert pool.source["env[PATH]"].endswith("fpm.conf:5")  # line 4 is the blank after POOL


@pytest.mark.parametrize(("line", "fragment"), [
    ("env[EMPTY] =", "env[EMPTY]: empty value"),
    ("env[] = x", "the variable name must be non-empty"),
    ("env = x", "'env' needs a key: env[NAME] = value"),
    ("user[x] = nobody", "'user' does not take a [key]"),
])
def test_env_errors(tmp_path, line, fragment):
    error = one_error(tmp_path, POOL + line + "\n")
    assert error.startswith(f"{tmp_path / 'fpm.conf'}:4: ")
    assert fragment in error


@pytest.mark.parametrize("line", ["listen 127.0.0.1:9000", "= value", "[unclosed", "[www] junk"])
def test_syntax_errors(tmp_path, line):
    error = one_error(tmp_path, POOL + line + "\n")
    assert error.startswith(f"{tmp_path / 'fpm.conf'}:4: ")


def test_empty_value_means_default(tmp_path):
    pool = pool_with(tmp_path, "pm.max_requests = 9\npm.max_requests =\nuser =\n")
    assert pool.pm_max_requests == 0
    assert pool.user is None


def test_later_value_wins_and_sections_reopen(tmp_path):
    config = load_text(tmp_path, """
        [a]
        listen = 127.0.0.1:9001
        app = a:app
        pm.max_children = 2
        [b]
        listen = 127.0.0.1:9002
        app = b:app
        [A]
        pm.max_children = 7
        """)
    assert [p.name for p in config.pools] == ["a", "b"]
    assert config.pool("a").pm_max_children == 7
    assert config.pool("a").source["pm.max_children"].endswith(":10")


# ---------------------------------------------------------------------------------------------------
# include

def test_include_glob_relative_to_including_file_in_sorted_order(tmp_path):
    write(tmp_path, "etc/pool.d/20-b.conf", "[b]\nlisten = 127.0.0.1:9002\napp = b:app\n")
    write(tmp_path, "etc/pool.d/10-a.conf", "[a]\nlisten = 127.0.0.1:9001\napp = a:app\n")
    write(tmp_path, "etc/pool.d/README", "not a config file")
    (tmp_path / "etc/pool.d/sub.conf").mkdir()  # a directory matching the glob is skipped
    main = write(tmp_path, "etc/fpm.conf", "[global]\ninclude = pool.d/*.conf\n")
    config = load(main, environ={})
    assert [p.name for p in config.pools] == ["a", "b"]
    assert config.files == [str(main), str(tmp_path / "etc/pool.d/10-a.conf"),
                            str(tmp_path / "etc/pool.d/20-b.conf")]


def test_include_relative_to_prefix_when_given(tmp_path):
    write(tmp_path, "prefix/pools/www.conf", POOL)
    main = write(tmp_path, "etc/fpm.conf", "include=pools/*.conf\n")
    config = load(main, environ={}, prefix=str(tmp_path / "prefix"))
    assert config.pools[0].name == "www"
    assert config.prefix == str(tmp_path / "prefix")


def test_nested_includes_and_absolute_paths(tmp_path):
    write(tmp_path, "c.conf", "pm.max_children = 3\n")
    write(tmp_path, "sub/b.conf", f"[www]\nlisten = 9005\napp = x:y\ninclude = {tmp_path / 'c.conf'}\n")
    write(tmp_path, "a.conf", "include = sub/b.conf\n")
    main = write(tmp_path, "main.conf", "include = a.conf\n")
    config = load(main, environ={})
    assert config.pool("www").pm_max_children == 3
    assert len(config.files) == 4


def test_included_file_inherits_section_and_section_is_restored_after(tmp_path):
    write(tmp_path, "extra.conf", "pm.max_children = 4\n[other]\nlisten = 9002\napp = o:app\n")
    config = load_text(tmp_path, POOL + "include = extra.conf\npm.max_requests = 10\n")
    assert config.pool("www").pm_max_children == 4
    assert config.pool("www").pm_max_requests == 10  # php-fpm would have set it on [other]
    assert config.pool("other").pm_max_requests == 0


def test_include_cycle_is_reported(tmp_path):
    write(tmp_path, "b.conf", "include = a.conf\n")
    a = write(tmp_path, "a.conf", POOL + "include = b.conf\n")
    with pytest.raises(ConfigError) as info:
        load(a, environ={})
    b = tmp_path / "b.conf"
    assert info.value.errors == [f"{b}:1: include cycle: {a} -> {b} -> {a}"]


def test_self_include_is_a_cycle(tmp_path):
    error = one_error(tmp_path, POOL + "include = *.conf\n")
    assert "include cycle" in error
    assert error.startswith(f"{tmp_path / 'fpm.conf'}:4: ")


def test_include_of_missing_file_is_an_error_but_empty_glob_is_a_warning(tmp_path):
    error = one_error(tmp_path, POOL + "include = nothere.conf\n")
    assert error == f"{tmp_path / 'fpm.conf'}:4: included file {tmp_path / 'nothere.conf'} does not exist"
    config = load_text(tmp_path, POOL + "include = pool.d/*.conf\n")
    assert config.warnings == [f"{tmp_path / 'fpm.conf'}:4: nothing matches the include pattern "
                               f"{tmp_path / 'pool.d/*.conf'}"]


def test_include_depth_limit(tmp_path):
    for i in range(12):
        write(tmp_path, f"d{i}.conf", f"include = d{i + 1}.conf\n")
    write(tmp_path, "d12.conf", POOL)
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "d0.conf", environ={})
    assert "includes nested more than 10 files deep" in info.value.errors[0]


def test_errors_in_included_files_name_that_file(tmp_path):
    write(tmp_path, "pool.d/www.conf", POOL + "pm.max_childs = 3\n")
    error = one_error(tmp_path, "include = pool.d/www.conf\n")
    assert error == (f"{tmp_path / 'pool.d/www.conf'}:4: unknown directive 'pm.max_childs' "
                     f"(did you mean 'pm.max_children'?)")


def test_unreadable_main_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.conf")
    assert info.value.errors == [f"{tmp_path / 'missing.conf'}: cannot read the configuration file: "
                                 f"No such file or directory"]


# ---------------------------------------------------------------------------------------------------
# directives fastfpm refuses, misplaced and unknown directives

@pytest.mark.parametrize("line", ["php_value[memory_limit] = 128M", "php_admin_value[error_log] = /x",
                                  "php_flag[display_errors] = off", "php_admin_flag[log_errors] = on"])
def test_php_settings_are_errors_with_advice(tmp_path, line):
    error = one_error(tmp_path, POOL + line + "\n")
    key = line.split(" =")[0]
    assert error == f"{tmp_path / 'fpm.conf'}:4: '{key}': {cfg.PHP_SETTINGS_MESSAGE}"


@pytest.mark.parametrize(("line", "fragment"), [
    ("chroot = /srv", "RootDirectory="),
    ("listen.acl_users = www-data", "use listen.owner, listen.group and listen.mode"),
    ("listen.setfib = 1", "FreeBSD"),
    ("process.dumpable = yes", "not supported yet"),
])
def test_unsupported_php_fpm_directives_say_what_to_do(tmp_path, line, fragment):
    error = one_error(tmp_path, POOL + line + "\n")
    assert error.startswith(f"{tmp_path / 'fpm.conf'}:4: '")
    assert fragment in error


def test_status_and_ping_paths_are_read(tmp_path):
    pool = pool_with(tmp_path, "pm.status_path = /fpm-status\nping.path = /ping\n")
    assert (pool.pm_status_path, pool.ping_path, pool.ping_response) == ("/fpm-status", "/ping", "pong")
    assert pool_with(tmp_path, "ping.path = /ping\nping.response = alive\n").ping_response == "alive"
    assert pool_with(tmp_path, "").pm_status_path is None


@pytest.mark.parametrize(("line", "fragment"), [
    # php-fpm's checks (fpm_conf.c), with its wording
    ("pm.status_path = status", "must start with a '/'"),
    ("pm.status_path = /", "is not long enough"),
    ("pm.status_path = /st atus", "must contain only the following characters '[alphanum]/_-.~'"),
    ("ping.path = /ping?x", "must contain only the following characters"),
    ("ping.path = ping", "must start with a '/'"),
])
def test_status_and_ping_paths_are_checked_as_php_fpm_checks_them(tmp_path, line, fragment):
    error = one_error(tmp_path, POOL + line + "\n")
    assert error.startswith(f"{tmp_path / 'fpm.conf'}:4: invalid value")
    assert fragment in error


def test_status_and_ping_cannot_share_a_path(tmp_path):
    error = one_error(tmp_path, POOL + "pm.status_path = /s\nping.path = /s\n")
    assert error.startswith(f"{tmp_path / 'fpm.conf'}:5: [pool www] ping.path and pm.status_path")


def test_ping_response_without_ping_path_warns(tmp_path):
    config = load_text(tmp_path, POOL + "ping.response = ok\n")
    assert config.warnings == [f"{tmp_path / 'fpm.conf'}:4: [pool www] ping.response has no effect "
                               f"without ping.path"]


@pytest.mark.parametrize(("text", "fragment"), [
    ("[global]\nlog_buffering = no\n" + POOL, "'log_buffering' has no effect in fastfpm"),
    ("[global]\nevents.mechanism = epoll\n" + POOL, "'events.mechanism' has no effect in fastfpm"),
    (POOL + "request_terminate_timeout_track_finished = yes\n", "has no effect in fastfpm"),
])
def test_ignored_directives_warn(tmp_path, text, fragment):
    config = load_text(tmp_path, text)
    assert len(config.warnings) == 1
    assert fragment in config.warnings[0]


def test_ignored_directive_values_are_still_checked(tmp_path):
    assert "expected yes/no" in one_error(tmp_path, "log_buffering = maybe\n" + POOL)


def test_misplaced_directives(tmp_path):
    errors = errors_of(tmp_path, "[global]\npm = static\n" + POOL + "log_level = debug\n")
    path = tmp_path / "fpm.conf"
    assert errors == [f"{path}:2: 'pm' is a pool directive; move it into a pool section",
                      f"{path}:6: 'log_level' is a [global] directive; move it to the [global] section"]


def test_unknown_directive(tmp_path):
    assert one_error(tmp_path, POOL + "frobnicate = 1\n") == (
        f"{tmp_path / 'fpm.conf'}:4: unknown directive 'frobnicate'")


def test_all_errors_are_collected(tmp_path):
    errors = errors_of(tmp_path, POOL + "pm = lazy\nfoo = 1\nphp_value[x] = 1\nuser = ${NOPE}\n")
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in errors] == ["4", "5", "6", "7"]


# ---------------------------------------------------------------------------------------------------
# pool checks (php-fpm's fpm_conf_process_all_pools)

def test_pool_without_listen_or_app(tmp_path):
    errors = errors_of(tmp_path, "[global]\n\n[www]\npm = static\n")
    path = tmp_path / "fpm.conf"
    assert errors == [
        f"{path}:3: [pool www] 'listen' is not set; every pool needs one (listen = 127.0.0.1:9000)",
        f"{path}:3: [pool www] 'app' is not set; every pool needs one (app = myapp.wsgi:application)"]


def test_bad_required_value_is_not_also_reported_missing(tmp_path):
    errors = errors_of(tmp_path, "[a]\nlisten = nope:x\napp = my-app\n[b]\nlisten = 9000\napp = b:app\n")
    assert len(errors) == 2, errors
    assert "invalid value 'nope:x' for 'listen'" in errors[0]
    assert "invalid value 'my-app' for 'app'" in errors[1]


def test_no_pool_at_all(tmp_path):
    assert one_error(tmp_path, "[global]\nlog_level = debug\n").endswith(
        "no pool defined; add a pool section such as [www] with listen = ... and app = ...")


@pytest.mark.parametrize(("lines", "line", "fragment"), [
    ("pm = dynamic\npm.max_children = 5\npm.min_spare_servers = 0\npm.max_spare_servers = 3", 6,
     "pm.min_spare_servers (0) must be at least 1"),
    ("pm = dynamic\npm.max_children = 5\npm.min_spare_servers = 1\npm.max_spare_servers = 0", 7,
     "pm.max_spare_servers (0) must be at least 1"),
    ("pm = dynamic\npm.max_children = 5\npm.min_spare_servers = 3\npm.max_spare_servers = 2", 7,
     "pm.max_spare_servers (2) cannot be less than pm.min_spare_servers (3)"),
    ("pm = dynamic\npm.max_children = 5\npm.min_spare_servers = 1\npm.max_spare_servers = 6", 7,
     "pm.max_spare_servers (6) cannot be more than pm.max_children (5)"),
    ("pm = dynamic\npm.max_children = 5\npm.min_spare_servers = 6\npm.max_spare_servers = 6", 6,
     "pm.min_spare_servers (6) cannot be more than pm.max_children (5)"),
    ("pm = dynamic\npm.max_children = 4\npm.min_spare_servers = 5", 6,
     "pm.min_spare_servers (5) cannot be more than pm.max_children (4)"),
    ("pm = dynamic\npm.max_children = 5\npm.min_spare_servers = 2\npm.max_spare_servers = 3\n"
     "pm.start_servers = 4", 8, "pm.start_servers (4) must be between pm.min_spare_servers (2) and "
                                "pm.max_spare_servers (3)"),
    ("pm = dynamic\npm.max_children = 5\npm.min_spare_servers = 2\npm.max_spare_servers = 3\n"
     "pm.start_servers = 1", 8, "pm.start_servers (1) must be between"),
    ("pm = ondemand\npm.process_idle_timeout = 0", 5,
     "pm.process_idle_timeout must be greater than 0 with pm = ondemand"),
    ("request_slowlog_timeout = 5s", 4, "request_slowlog_timeout is set but slowlog is not"),
    ("slowlog = /tmp/slow.log\nrequest_slowlog_timeout = 20\nrequest_terminate_timeout = 10", 5,
     "request_slowlog_timeout (20s) cannot be longer than request_terminate_timeout (10s)"),
    ("slowlog = /no/such/dir/slow.log", 4, "the directory of slowlog /no/such/dir/slow.log does not exist"),
    ("chdir = /no/such/dir", 4, "the chdir directory /no/such/dir does not exist"),
    ("prefix = /no/such/dir", 4, "the prefix /no/such/dir does not exist"),
    ("request_header_timeout = 0", 4, "request_header_timeout must be greater than 0"),
    ("request_body_timeout = 0s", 4, "request_body_timeout must be greater than 0"),
    ("request_body_timeout = 2d", 4, "request_body_timeout cannot be longer than 86400s"),
    ("idle_timeout = 25d", 4, "idle_timeout cannot be longer than 86400s"),
])
def test_pool_contradictions(tmp_path, lines, line, fragment):
    error = one_error(tmp_path, POOL + lines + "\n")
    assert error.startswith(f"{tmp_path / 'fpm.conf'}:{line}: [pool www] "), error
    assert fragment in error


def test_slow_client_deadlines_default_to_what_nginx_in_front_needs(tmp_path):
    pool = pool_with(tmp_path, "")
    assert (pool.idle_timeout, pool.request_header_timeout, pool.request_body_timeout) == (5.0, 10.0, 60.0)


def test_dynamic_defaults_follow_php_fpm(tmp_path):
    pool = pool_with(tmp_path, "pm = dynamic\npm.max_children = 20\npm.min_spare_servers = 2\n"
                               "pm.max_spare_servers = 9\n")
    assert pool.pm_start_servers == 2 + (9 - 2) // 2
    pool = pool_with(tmp_path, "pm = dynamic\npm.max_children = 20\npm.min_spare_servers = 2\n"
                               "pm.max_spare_servers = 9\npm.start_servers = 0\n")
    assert pool.pm_start_servers == 5


def test_dynamic_spare_defaults_when_unset(tmp_path):
    pool = pool_with(tmp_path, "pm = dynamic\npm.max_children = 10\n")
    assert (pool.pm_min_spare_servers, pool.pm_max_spare_servers, pool.pm_start_servers) == (2, 5, 3)
    pool = pool_with(tmp_path, "pm = dynamic\npm.max_children = 1\n")
    assert (pool.pm_min_spare_servers, pool.pm_max_spare_servers, pool.pm_start_servers) == (1, 1, 1)


def test_two_pools_on_one_address(tmp_path):
    path = tmp_path / "fpm.conf"
    error = one_error(tmp_path, "[a]\nlisten = 127.0.0.1:9000\napp = a:app\n[b]\napp = b:app\n"
                                "listen = 127.0.0.1:9000\n")
    assert error == (f"{path}:6: [pool b] listen address 127.0.0.1:9000 is already used by pool 'a' "
                     f"({path}:2)")


@pytest.mark.parametrize(("first", "second", "clash"), [
    ("9000", "0.0.0.0:9000", True),
    ("9000", "127.0.0.1:9000", True),
    ("[::]:9000", "127.0.0.1:9000", True),
    ("127.0.0.1:9000", "127.0.0.2:9000", False),
    ("127.0.0.1:9000", "127.0.0.1:9001", False),
    ("/tmp/a.sock", "/tmp/a.sock", True),
    ("/tmp/a.sock", "/tmp/b.sock", False),
    ("127.0.0.1:0", "127.0.0.1:0", False),
])
def test_address_clashes(tmp_path, first, second, clash):
    text = f"[a]\nlisten = {first}\napp = a:app\n[b]\nlisten = {second}\napp = b:app\n"
    if clash:
        assert "is already used by pool 'a'" in one_error(tmp_path, text)
    else:
        assert len(load_text(tmp_path, text).pools) == 2


def test_relative_paths_are_resolved_against_the_config_directory(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "app").mkdir()
    config = load_text(tmp_path, """
        [global]
        pid = run/fastfpm.pid
        error_log = logs/error.log
        [www]
        listen = run/www.sock
        app = myapp:application
        slowlog = logs/$pool.slow
        chdir = app
        python_path = app:lib
        """)
    pool = config.pool("www")
    assert config.global_.pid == str(tmp_path / "run/fastfpm.pid")
    assert config.global_.error_log == str(tmp_path / "logs/error.log")
    assert pool.listen == str(tmp_path / "run/www.sock")
    assert pool.slowlog == str(tmp_path / "logs/www.slow")
    assert pool.chdir == str(tmp_path / "app")
    assert pool.python_path == [str(tmp_path / "app"), str(tmp_path / "lib")]
    assert config.warnings == [f"{tmp_path / 'fpm.conf'}:10: [pool www] python_path directory "
                               f"{tmp_path / 'lib'} does not exist"]


def test_pool_prefix(tmp_path):
    (tmp_path / "pools/www").mkdir(parents=True)
    pool = pool_with(tmp_path, "prefix = pools/$pool\nslowlog = slow.log\n")
    assert pool.prefix == str(tmp_path / "pools/www")
    assert pool.slowlog == str(tmp_path / "pools/www/slow.log")


def test_error_log_syslog_is_not_a_path(tmp_path):
    config = load_text(tmp_path, "error_log = syslog\n" + POOL)
    assert config.global_.error_log == "syslog"


@pytest.mark.parametrize(("lines", "fragment"), [
    ("pm.min_spare_servers = 2", "pm.min_spare_servers has no effect with pm = static"),
    ("pm = ondemand\npm.start_servers = 2", "pm.start_servers has no effect with pm = ondemand"),
    ("pm = dynamic\npm.process_idle_timeout = 5s", "pm.process_idle_timeout has no effect with pm = dynamic"),
    ("pm.max_requests_jitter = 10", "pm.max_requests_jitter has no effect while pm.max_requests is 0"),
    ("request_slowlog_trace_depth = 10", "request_slowlog_trace_depth has no effect without slowlog"),
    ("listen.owner = nobody", "listen.owner only applies to unix sockets"),
    ("listen.mode = 0600", "listen.mode only applies to unix sockets"),
    ("user = no-such-user-here", "user: user 'no-such-user-here' does not exist on this machine"),
    ("group = no-such-group-here", "group: group 'no-such-group-here' does not exist on this machine"),
])
def test_warnings(tmp_path, lines, fragment):
    config = load_text(tmp_path, POOL + lines + "\n")
    assert len(config.warnings) == 1, config.warnings
    assert fragment in config.warnings[0]
    assert config.warnings[0].startswith(f"{tmp_path / 'fpm.conf'}:")


def test_allowed_clients_on_unix_socket_warns(tmp_path):
    config = load_text(tmp_path, "[www]\nlisten = /tmp/x.sock\napp = a:b\n"
                                 "listen.allowed_clients = 127.0.0.1\n")
    assert "only applies to TCP sockets" in config.warnings[0]


def test_keepalive_defaults_find_a_silent_peer_in_two_minutes(tmp_path):
    """On by default, 60s:10s:6 (nginx's so_keepalive=60s:10s:6): idle + count * interval = 120 s."""
    pool = pool_with(tmp_path, "")
    assert pool.listen_keepalive is True
    idle, interval, count = (pool.listen_keepalive_idle, pool.listen_keepalive_interval,
                             pool.listen_keepalive_count)
    assert (idle, interval, count) == (60, 10, 6)
    assert idle + count * interval == 120


def test_keepalive_on_unix_socket_warns_once_per_directive_set(tmp_path):
    config = load_text(tmp_path, "[www]\nlisten = /tmp/x.sock\napp = a:b\n"
                                 "listen.keepalive_idle = 30\nlisten.keepalive_count = 3\n")
    where = str(tmp_path / "fpm.conf")
    tail = "only applies to TCP sockets; this pool listens on a unix socket"
    assert config.warnings == [f"{where}:4: [pool www] listen.keepalive_idle {tail}",
                               f"{where}:5: [pool www] listen.keepalive_count {tail}"]
    # Left at their defaults, they say nothing: a unix pool is not told about an option it never set.
    assert load_text(tmp_path, "[www]\nlisten = /tmp/x.sock\napp = a:b\n").warnings == []


def test_numeric_user_needs_no_lookup(tmp_path):
    assert load_text(tmp_path, POOL + "user = 12345\ngroup = 12345\n").warnings == []


def test_bad_pool_name(tmp_path):
    assert "pool name 'a b'" in one_error(tmp_path, "[a b]\nlisten = 9000\napp = a:b\n")


# ---------------------------------------------------------------------------------------------------
# building in code

def test_from_cli_defaults(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    config = from_cli()
    (pool,) = config.pools
    assert (pool.name, pool.listen, pool.pm, pool.pm_max_children) == ("www", "127.0.0.1:9000", "static", 6)
    assert pool.app == "fastfpm.demo:application"
    assert pool.clear_env is False
    assert config.path is None


def test_from_cli_options():
    config = from_cli("myapp:application", listen="127.0.0.1:9100", max_children="4", pm="dynamic",
                      listen_mode=0o600, log_level="debug", error_log=None, mount="/x/",
                      idle_timeout="2s", max_params_size="32K", max_requests=100)
    (pool,) = config.pools
    assert (pool.app, pool.listen) == ("myapp:application", "127.0.0.1:9100")
    assert (pool.pm_max_children, pool.pm) == (4, "dynamic")
    assert (pool.pm_min_spare_servers, pool.pm_max_spare_servers, pool.pm_start_servers) == (1, 2, 1)
    assert (pool.listen_mode, pool.mount) == (0o600, "/x")
    assert (pool.idle_timeout, pool.max_params_size) == (2.0, 32768)
    assert pool.pm_max_requests == 100
    assert config.global_.log_level == "debug"
    assert config.global_.error_log is None
    assert pool.source["pm.max_children"] == "command line"


def test_from_cli_errors():
    with pytest.raises(ConfigError) as info:
        from_cli(max_childen=4)
    assert info.value.errors == ["command line: unknown option 'max_childen' (did you mean 'max_children'?)"]
    with pytest.raises(ConfigError) as info:
        from_cli(max_children=0)
    assert info.value.errors == ["command line: invalid value 0 for pm.max_children: must be at least 1"]
    with pytest.raises(ConfigError) as info:
        from_cli(pm="dynamic", max_children=4, min_spare_servers=3, max_spare_servers=2)
    assert info.value.errors == ["command line: [pool www] pm.max_spare_servers (2) cannot be less than "
                                 "pm.min_spare_servers (3)"]


def test_pool_config_built_in_code_is_checked():
    pool = PoolConfig(name="api", app="api:app", listen="127.0.0.1:9200", pm_max_children=3)
    config = check(Config(pools=[pool]))
    assert config.pools[0].pm == "static"
    with pytest.raises(ConfigError) as info:
        check(Config(pools=[PoolConfig(pm_max_children="many")]))
    assert info.value.errors == ["command line: [pool www] invalid value 'many' for 'pm.max_children': "
                                 "expected a whole number"]
    with pytest.raises(ConfigError):
        check(Config(pools=[PoolConfig(name="a"), PoolConfig(name="A", listen="9001")]))


def test_check_recomputes_derived_values():
    config = from_cli(pm="dynamic", max_children=8)
    pool = config.pools[0]
    assert (pool.pm_min_spare_servers, pool.pm_max_spare_servers) == (2, 4)
    pool.pm_max_children = 40
    check(config)
    assert (pool.pm_min_spare_servers, pool.pm_max_spare_servers, pool.pm_start_servers) == (10, 20, 15)


def test_apply_options_over_a_loaded_file():
    config = load(DATA / "php-fpm.conf")
    cfg.apply_options(config, {"max_children": 9, "log_level": "debug", "listen": None})
    check(config)
    assert config.pool("www").pm_max_children == 9
    assert config.pool("www").listen == "/run/php/php8.2-fpm.sock"
    assert config.global_.log_level == "debug"


# ---------------------------------------------------------------------------------------------------
# output: the -tt dump, the docs, the module's command line

def test_dump_loads_back_to_the_same_config(tmp_path):
    (tmp_path / "logs").mkdir()
    config = load_text(tmp_path, """
        [global]
        log_level = debug
        error_log = logs/err.log
        [www]
        listen = /tmp/$pool.sock
        app = myapp:application
        pm = dynamic
        pm.max_children = 10
        request_slowlog_timeout = 1.5s
        slowlog = logs/slow.log
        listen.allowed_clients = 127.0.0.1,::1
        python_path = /usr:/tmp
        env[A] = "semi;colon"
        env[B] = '$literal'
        env[C] = "it's \\"quoted\\""
        env[D] = ${HOME}
        [second]
        listen = 9001
        app = other:app
        """, {"HOME": "/root"})
    text = dump(config)
    assert "[global]\n" in text and "\n[www]\n" in text and "\n[second]\n" in text
    assert "pm.max_children = 10\n" in text
    assert "request_slowlog_timeout = 1.5s\n" in text
    assert ";user =\n" in text
    again = load(write(tmp_path, "dumped.conf", text), environ={})
    assert again.global_ == config.global_
    assert again.pools == config.pools


def test_docs_are_generated_from_the_table():
    text = cfg.render_markdown()
    for directive in cfg.DIRECTIVES:
        assert f"`{directive.name}" in text, directive.name
    assert "min(32, max(2, 2 x CPUs))" in text
    assert (ROOT / "docs" / "configuration.md").read_text() == text, \
        "docs/configuration.md is stale: run python -m fastfpm.config --markdown > docs/configuration.md"


def test_module_command_line(tmp_path, capsys):
    assert cfg.main([str(DATA / "php-fpm.conf")]) == 0
    assert "test is successful" in capsys.readouterr().err
    bad = write(tmp_path, "bad.conf", POOL + "php_value[x] = 1\n")
    assert cfg.main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"ERROR: {bad}:4: 'php_value[x]'" in err
    assert cfg.main([str(DATA / "php-fpm.conf"), "--dump"]) == 0
    assert "[www]" in capsys.readouterr().out
    assert cfg.main(["--markdown"]) == 0
    assert capsys.readouterr().out.startswith("# Configuration reference")


# ---------------------------------------------------------------------------------------------------
# check, serve -t and serve -tt run as real commands

def test_config_errors_are_reported_with_file_and_line(tmp_path: Path) -> None:
    conf = write_config(tmp_path / "bad.conf", "[www]\nlisten = 127.0.0.1:9\napp = x:y\n"
                        "pm = dynamic\npm.max_children = 2\npm.min_spare_servers = 5\n"
                        "php_value[memory_limit] = 1G\n"
                        "no_such_directive = 1\n")
    result = run_cli("serve", "-c", str(conf), "-R")
    assert result.returncode == 1
    assert f"{conf}:7:" in result.stderr and "PHP" in result.stderr
    assert f"{conf}:8:" in result.stderr and "no_such_directive" in result.stderr
    assert "pm.min_spare_servers" in result.stderr
    assert "ready to handle" not in result.stderr  # nothing started


def test_serve_tt_dumps_the_effective_configuration(tmp_path: Path) -> None:
    result = run_cli("serve", "tests.apps.router:app", "--pm", "dynamic", "--max-children", "8", "-R", "-tt")
    assert result.returncode == 0, result.stderr
    assert "pm = dynamic" in result.stdout and "pm.max_children = 8" in result.stdout
    assert "pm.start_servers" in result.stdout


@pytest.mark.parametrize("command", [["check"], ["serve", "-t"]])
def test_a_bad_config_fails_the_check_with_file_and_line(tmp_path: Path, command: list[str]) -> None:
    conf = write_config(tmp_path / "bad.conf", f"""[www]
listen = {tmp_path}/b.sock
app = {APP}
pm.max_children = lots
no_such_directive = 1
""")
    result = run_cli(*command, "-c", str(conf))
    assert result.returncode != 0
    assert f"{conf}:4: invalid value 'lots' for 'pm.max_children'" in result.stderr
    assert f"{conf}:5: unknown directive 'no_such_directive'" in result.stderr
    assert "test failed" in result.stderr and "ready to handle" not in result.stderr


@pytest.mark.parametrize("command", [["check"], ["serve", "-t"]])
def test_the_check_refuses_root_workers_as_serve_does(tmp_path: Path, command: list[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("the refusal applies to a master started as root; this test runs as another user")
    conf = write_config(tmp_path / "root.conf", f"""[www]
listen = {tmp_path}/r.sock
app = {APP}
pm.max_children = 1
""")
    refused = run_cli(*command, "-c", str(conf))
    assert refused.returncode == 1
    assert "[pool www] please specify user and group other than root" in refused.stderr
    assert "test failed" in refused.stderr
    allowed = run_cli(*command, "-R", "-c", str(conf))
    assert allowed.returncode == 0, allowed.stderr
    assert "test is successful" in allowed.stderr
