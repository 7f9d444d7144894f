"""serve's directive flags come from the directive table: the flag, its default and help are the directive's.

Each Directive declared with cli= gets exactly that flag in `serve`, with no argparse default (not given
means the file's value or the directive's default applies), the directive's doc and default in --help,
and a value that reaches the directive it was declared on.
"""

from __future__ import annotations

import argparse
import syslog
from pathlib import Path

import pytest

from fastfpm import cli
from fastfpm import config as config_module
from fastfpm.config import CLI_SOURCE, DIRECTIVES, Bool, Choice, GlobalConfig, from_cli
from fastfpm.log import ErrorLog

FLAGGED = [d for d in DIRECTIVES if d.cli]

# The flags serve has had for its directives, with their placeholders: a flag is never lost or renamed.
HISTORICAL_FLAGS = {
    "--listen": "ADDR", "--listen-mode": "MODE", "--listen-owner": "USER", "--listen-group": "GROUP",
    "--listen-backlog": "N", "--user": "USER", "--group": "GROUP", "--pm": None, "--max-children": "N",
    "--start-servers": "N", "--min-spare-servers": "N", "--max-spare-servers": "N",
    "--process-idle-timeout": "TIME", "--max-requests": "N", "--request-terminate-timeout": "TIME",
    "--request-slowlog-timeout": "TIME", "--slowlog": "FILE", "--chdir": "DIR", "--mount": "PREFIX",
    "--idle-timeout": "TIME", "--request-header-timeout": "TIME", "--request-body-timeout": "TIME",
    "--max-params-size": "BYTES", "--catch-workers-output": None, "--script-root": "DIR",
    "--listen-reuseport": None,
    "--log-level": None, "--error-log": "FILE", "--pid": "FILE",
}


def serve_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices["serve"]


def serve_actions() -> dict[str, argparse.Action]:
    return {flag: action for action in serve_parser()._actions for flag in action.option_strings}


def directive_group_flags() -> dict[str, str]:
    """Every flag in serve's directive groups, with the group's section."""
    titles = {title: section for section, title in cli.DIRECTIVE_FLAG_GROUPS}
    return {flag: titles[group.title] for group in serve_parser()._action_groups if group.title in titles
            for action in group._group_actions for flag in action.option_strings}


def test_the_flags_are_the_historical_ones() -> None:
    actions = serve_actions()
    assert {flag: actions[flag].metavar for flag in directive_group_flags()} == HISTORICAL_FLAGS


@pytest.mark.parametrize("directive", FLAGGED, ids=lambda d: d.name)
def test_a_directive_with_cli_has_that_flag(directive) -> None:
    actions = serve_actions()
    assert directive_group_flags()[directive.cli[0]] == directive.section
    action = actions[directive.cli[0]]
    assert action.option_strings == list(directive.cli)
    assert action.dest == directive.cli_dest
    assert action.default is None  # not given: the file's value, else the directive's default
    if isinstance(directive.type, Choice):
        assert action.choices == list(directive.type.choices)
    elif isinstance(directive.type, Bool):
        assert (action.nargs, action.const) == (0, "yes")
    else:
        assert action.metavar == directive.cli_metavar


def test_every_directive_flag_comes_from_the_table() -> None:
    assert set(directive_group_flags()) == {flag for d in FLAGGED for flag in d.cli}
    assert set(cli.OPTION_FLAGS) == {d.cli_dest for d in FLAGGED}


@pytest.mark.parametrize("directive", FLAGGED, ids=lambda d: d.name)
def test_help_shows_the_doc_and_the_default(directive) -> None:
    helptext = " ".join(serve_parser().format_help().split())
    assert " ".join(directive.doc.replace("`", "").split()) in helptext
    default = directive.cli_default_text()
    if directive.default is not None or directive.default_doc:
        assert default
        assert f"(default: {default})" in " ".join(directive.cli_help().split())
        assert f"(default: {' '.join(default.split())})" in helptext


def test_help_of_a_computed_default_shows_the_value_here() -> None:
    (max_children,) = [d for d in DIRECTIVES if d.name == "pm.max_children"]
    assert max_children.cli_help().endswith(
        f"(default: min(32, max(2, 2 x CPUs)), here {max_children.default_value()})")


def test_every_flag_sets_its_directive(tmp_path: Path) -> None:
    argv = ["serve", "tests.apps.router:app",
            "--user", "0", "--group", "0", "--listen", str(tmp_path / "s.sock"), "--listen-backlog", "128",
            "--listen-owner", "0", "--listen-group", "0", "--listen-mode", "0600", "--pm", "dynamic",
            "--max-children", "8", "--start-servers", "3", "--min-spare-servers", "2",
            "--max-spare-servers", "4", "--process-idle-timeout", "3s", "--max-requests", "100",
            "--slowlog", str(tmp_path / "slow.log"), "--request-slowlog-timeout", "1s",
            "--request-terminate-timeout", "2s", "--chdir", str(tmp_path), "--catch-workers-output",
            "--mount", "/app", "--script-root", str(tmp_path), "--idle-timeout", "2s",
            "--request-header-timeout", "3s", "--request-body-timeout", "4s", "--max-params-size", "32K",
            "--listen-reuseport",
            "--pid", str(tmp_path / "fpm.pid"), "--error-log", str(tmp_path / "error.log"),
            "--log-level", "debug"]
    args = cli.build_parser().parse_args(argv)
    config, options = cli.load_config(args)
    assert set(options) == set(cli.OPTION_FLAGS)
    (pool,) = config.pools
    for directive in FLAGGED:
        target = pool if directive.section == "pool" else config.global_
        assert target.source.get(directive.name) == CLI_SOURCE, directive.name
    assert (pool.pm_max_children, pool.listen_mode, pool.catch_workers_output) == (8, 0o600, True)
    assert pool.listen_reuseport is True
    assert (pool.max_params_size, config.global_.log_level) == (32768, "debug")


def test_pm_directives_without_flags_keep_their_short_keyword_names() -> None:
    (pool,) = from_cli(max_spawn_rate=5, max_requests_jitter=3, max_requests=10).pools
    assert (pool.pm_max_spawn_rate, pool.pm_max_requests_jitter, pool.pm_max_requests) == (5, 3, 10)


def test_error_log_from_global(tmp_path: Path) -> None:
    g = GlobalConfig(error_log=str(tmp_path / "error.log"), log_level="warning", log_limit=600,
                     syslog_ident="ident", syslog_facility="local3")
    log = ErrorLog.from_global(g)
    try:
        assert (log.path, log.level, log.limit) == (g.error_log, "warning", 600)
        assert (log.syslog_ident, log.syslog_facility) == ("ident", syslog.LOG_LOCAL3)
        log.warning("hello")
        assert (tmp_path / "error.log").read_text().endswith("WARNING: hello\n")
    finally:
        log.stream.close()


# ---------------------------------------------------------------------------------------------------
# One configuration test behind `check`, `serve -t` and `python -m fastfpm.config`

def test_check_and_the_config_module_report_the_same_problems(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text(f"[www]\nlisten = {tmp_path}/b.sock\napp = x:y\n"
                   "pm.max_children = lots\nphp_value[x] = 1\n")
    assert cli.main(["check", "-R", "-c", str(bad)]) == 1
    from_check = capsys.readouterr().err.splitlines()
    assert config_module.main([str(bad)]) == 1
    from_module = capsys.readouterr().err.splitlines()
    assert from_check[-1] == f"fastfpm: configuration file {bad} test failed"
    assert from_module[-1] == f"ERROR: configuration file {bad} test failed"
    assert [f"ERROR: {line}" for line in from_check[:-1]] == from_module[:-1]
    assert from_check[0].startswith(f"{bad}:4: invalid value 'lots'")


def test_a_command_line_that_fails_the_check_is_named_so(capsys) -> None:
    assert cli.main(["serve", "-t", "tests.apps.router:app", "--max-children", "0", "-R"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["command line: invalid value '0' for pm.max_children: must be at least 1",
                   "fastfpm: configuration file (command line) test failed"]


def test_serve_tt_prints_the_effective_configuration(capsys) -> None:
    assert cli.main(["serve", "-tt", "tests.apps.router:app", "--max-children", "3", "-R"]) == 0
    out, err = capsys.readouterr()
    assert "pm.max_children = 3\n" in out
    assert err.splitlines()[-1] == "fastfpm: configuration file (command line) test is successful"
