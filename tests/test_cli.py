"""The command line as users type it: `python -m fastfpm request` against a real server, --version, --help.

Every option is shown to reach the application as it says: -X, -d DATA, -d @FILE, -H, --param, -i,
the query in the path, and the exit status (0 for 2xx/3xx, 1 for an error status or no answer,
2 for a malformed option). The server is tests.apps.router: /env echoes the environ and the body,
/upload hashes the body, /status answers with the status asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastfpm import __version__
from tests.servers import REPO_ROOT, FastFPMServer, Launcher, run_cli

ROUTER = "tests.apps.router:app"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FastFPMServer]:
    """One fastfpm serving the router's applications for every test here."""
    with Launcher(tmp_path_factory.mktemp) as launcher:
        yield launcher.fastfpm(ROUTER, max_children=2)


def fastfpm_request(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """`python -m fastfpm request ARGS` to completion, output as bytes."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "fastfpm", "request", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, timeout=timeout)


def echoed(result: subprocess.CompletedProcess[bytes]) -> dict[str, Any]:
    """The environ echo's JSON from a successful run."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_get_by_default_with_the_query_from_the_path(server: FastFPMServer) -> None:
    seen = echoed(fastfpm_request(server.address, "/env/some/where?a=1&b=two"))
    environ = seen["environ"]
    assert environ["REQUEST_METHOD"] == "GET"
    assert environ["PATH_INFO"] == "/env/some/where"
    assert environ["QUERY_STRING"] == "a=1&b=two"
    assert environ["REQUEST_URI"] == "/env/some/where?a=1&b=two"
    assert environ.get("CONTENT_LENGTH", "") == ""
    assert seen["body_length"] == 0


def test_data_is_the_body_and_makes_it_a_post(server: FastFPMServer) -> None:
    seen = echoed(fastfpm_request(server.address, "/env", "-d", "hello=world&x=1"))
    assert seen["environ"]["REQUEST_METHOD"] == "POST"
    assert seen["environ"]["CONTENT_LENGTH"] == "15"
    assert seen["body_length"] == 15
    assert seen["body_head"] == "hello=world&x=1"


def test_method_option_with_data(server: FastFPMServer) -> None:
    posted = echoed(fastfpm_request(server.address, "/env", "-X", "POST", "-d", "payload"))
    assert posted["environ"]["REQUEST_METHOD"] == "POST"
    assert posted["body_head"] == "payload"
    put = echoed(fastfpm_request(server.address, "/env", "-X", "PUT", "-d", "replacement"))
    assert put["environ"]["REQUEST_METHOD"] == "PUT"
    assert put["environ"]["CONTENT_LENGTH"] == "11"
    assert put["body_head"] == "replacement"
    deleted = echoed(fastfpm_request(server.address, "/env", "-X", "DELETE"))
    assert deleted["environ"]["REQUEST_METHOD"] == "DELETE"
    assert deleted["body_length"] == 0


def test_data_from_a_file(server: FastFPMServer, tmp_path: Path) -> None:
    body = os.urandom(700 * 1024)  # binary, and larger than one FastCGI record
    source = tmp_path / "body.bin"
    source.write_bytes(body)
    result = fastfpm_request(server.address, "/upload", "-d", f"@{source}")
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["bytes"] == len(body)
    assert seen["sha256"] == hashlib.sha256(body).hexdigest()
    assert seen["content_length"] == str(len(body))


def test_data_from_a_missing_file_fails_with_a_message(server: FastFPMServer, tmp_path: Path) -> None:
    """As every other failure of the command: one `fastfpm: ...` line and a non-zero status."""
    result = fastfpm_request(server.address, "/upload", "-d", f"@{tmp_path / 'missing.bin'}")
    assert result.returncode in (1, 2)
    assert b"missing.bin" in result.stderr
    assert b"Traceback" not in result.stderr, result.stderr.decode(errors="replace")
    assert result.stdout == b""


def test_headers_become_http_variables(server: FastFPMServer) -> None:
    seen = echoed(fastfpm_request(server.address, "/env", "-H", "X-Test: one two",
                                  "-H", "Accept: text/html", "-H", "Content-Type: application/json",
                                  "-d", "{}"))
    environ = seen["environ"]
    assert environ["HTTP_X_TEST"] == "one two"
    assert environ["HTTP_ACCEPT"] == "text/html"
    assert environ["CONTENT_TYPE"] == "application/json"
    assert "HTTP_CONTENT_TYPE" not in environ and "HTTP_CONTENT_LENGTH" not in environ


def test_params_are_sent_as_they_are(server: FastFPMServer) -> None:
    seen = echoed(fastfpm_request(server.address, "/env", "--param", "SCRIPT_FILENAME=/srv/app.py",
                                  "--param", "CUSTOM_PARAM=a=b", "--param", "REMOTE_ADDR=10.1.2.3"))
    environ = seen["environ"]
    assert environ["SCRIPT_FILENAME"] == "/srv/app.py"
    assert environ["CUSTOM_PARAM"] == "a=b"  # split at the first "=" only
    assert environ["REMOTE_ADDR"] == "10.1.2.3"


def test_include_prints_status_and_headers(server: FastFPMServer) -> None:
    result = fastfpm_request(server.address, "/headers", "-i")
    assert result.returncode == 0, result.stderr
    head, sep, body = result.stdout.partition(b"\r\n\r\n")
    assert sep, result.stdout
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0] == "Status: 200 OK"
    assert "Content-Type: application/json" in lines
    assert "X-Custom: custom value" in lines
    assert [line for line in lines if line.startswith("Set-Cookie: ")] == [
        "Set-Cookie: a=1; Path=/", "Set-Cookie: b=two; HttpOnly", "Set-Cookie: c=3; Max-Age=60; SameSite=Lax"]
    length = [line for line in lines if line.startswith("Content-Length: ")]
    assert length == [f"Content-Length: {len(body)}"]
    json.loads(body)


def test_without_include_only_the_body_is_printed(server: FastFPMServer) -> None:
    result = fastfpm_request(server.address, "/status?code=200")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"status 200\n"


@pytest.mark.parametrize(("code", "reason", "status"), [
    (201, "Created", 0), (302, "Found", 0), (404, "Not Found", 1), (503, "Service Unavailable", 1)])
def test_exit_status_follows_the_response_status(server: FastFPMServer, code: int, reason: str,
                                                 status: int) -> None:
    result = fastfpm_request(server.address, f"/status?code={code}&reason={reason.replace(' ', '+')}", "-i")
    assert result.returncode == status, result.stderr
    assert result.stdout.startswith(f"Status: {code} {reason}\r\n".encode())
    assert result.stdout.endswith(f"status {code}\n".encode())


def test_application_error_is_a_500_and_status_1(server: FastFPMServer) -> None:
    result = fastfpm_request(server.address, "/raise-before", "-i")
    assert result.returncode == 1
    assert result.stdout.startswith(b"Status: 500 ")


@pytest.mark.parametrize(("option", "value"), [("-H", "no colon here"), ("--param", "NOEQUALS")])
def test_malformed_header_or_param_is_a_usage_error(server: FastFPMServer, option: str, value: str) -> None:
    result = fastfpm_request(server.address, "/env", option, value)
    assert result.returncode == 2
    assert option.encode() in result.stderr and value.encode() in result.stderr
    assert result.stdout == b""


def test_no_server_is_status_1(tmp_path: Path) -> None:
    result = fastfpm_request(str(tmp_path / "nobody.sock"), "/", "--timeout", "5")
    assert result.returncode == 1
    assert b"failed" in result.stderr
    assert result.stdout == b""


def test_request_command_prints_the_response(launcher: Launcher) -> None:
    server = launcher.fastfpm(ROUTER, max_children=1)
    result = run_cli("request", server.address, "/env?x=1", "-H", "X-Probe: yes", "-d", "hello",
                     "--param", "SCRIPT_FILENAME=/srv/app.py")
    assert result.returncode == 0, result.stderr
    assert '"QUERY_STRING": "x=1"' in result.stdout
    assert '"HTTP_X_PROBE": "yes"' in result.stdout
    assert '"SCRIPT_FILENAME": "/srv/app.py"' in result.stdout
    assert '"REQUEST_METHOD": "POST"' in result.stdout and '"body_length": 5' in result.stdout


def test_request_command_fails_on_5xx_and_on_no_server(launcher: Launcher, tmp_path) -> None:
    server = launcher.fastfpm(ROUTER, max_children=1)
    assert run_cli("request", server.address, "/raise-before").returncode == 1
    failed = run_cli("request", str(tmp_path / "nobody.sock"), "/")
    assert failed.returncode == 1 and "failed" in failed.stderr


def test_version_and_help() -> None:
    assert run_cli("--version").stdout.strip() == f"fastfpm {__version__}"
    helptext = run_cli("serve", "--help").stdout
    for option in ("--listen", "--max-children", "--chdir", "--log-level", "--pm", "MODULE:CALLABLE"):
        assert option in helptext


def test_serve_with_an_error_log_that_cannot_be_opened_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "fpm.log"
    result = run_cli("serve", "tests.apps.router:app", "-R", "--listen", str(tmp_path / "s.sock"),
                     "--error-log", str(missing))
    assert result.returncode == 1
    assert f"failed to open error_log ({missing}): No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s.sock").exists()  # nothing started
