"""Script mode (`app = script:`): SCRIPT_FILENAME picks a .py file under script.root.

Through a real nginx with Debian's stock /etc/nginx/fastcgi_params, unchanged, in two php-style
locations: one adds only `fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;` (the
path info is then cut off SCRIPT_FILENAME by fastfpm, php's cgi.fix_pathinfo), the other is
snippets/fastcgi-php.conf's lines (fastcgi_split_path_info, try_files, PATH_INFO, the stock
fastcgi.conf) with `.py` for `.php`. Forged SCRIPT_FILENAMEs (what a misconfigured web server or a
client reaching the socket could send) go straight over FastCGI. The code cache's revalidation is
also driven by a fake clock.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfpm.client import FastCGIClient, build_params
from fastfpm.script import ScriptDispatcher
from tests.servers import (
    NGINX_MAIN,
    NGINX_TEMP_PATHS,
    ConfiguredServer,
    Nginx,
    http_connection,
    http_get,
    nginx_binary,
    run_cli,
)

FASTCGI_PARAMS = "/etc/nginx/fastcgi_params"
FASTCGI_CONF = "/etc/nginx/fastcgi.conf"  # fastcgi_params and the SCRIPT_FILENAME line, as the snippet has it

NGINX_SCRIPT_CONF = NGINX_MAIN + """\
events {{ worker_connections 512; }}
http {{
    access_log {prefix}/access.log;
""" + NGINX_TEMP_PATHS + """    upstream fastfpm_keepalive {{
        server {backend};
        keepalive 8;
    }}
    # php's stock location: the whole path goes to SCRIPT_FILENAME, fastfpm finds the script in it.
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location ~ \\.py(/|$) {{
            include {params};
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            fastcgi_pass {backend};
        }}
    }}
    # snippets/fastcgi-php.conf's lines, with .py for .php, over kept-alive connections.
    server {{
        listen 127.0.0.1:{keepalive_port};
        root {root};
        location ~ [^/]\\.py(/|$) {{
            fastcgi_split_path_info ^(.+?\\.py)(/.*)$;
            try_files $fastcgi_script_name =404;
            set $path_info $fastcgi_path_info;
            fastcgi_param PATH_INFO $path_info;
            include {params_conf};
            fastcgi_keep_conn on;
            fastcgi_pass fastfpm_keepalive;
        }}
    }}
}}
"""


class ScriptNginx(Nginx):
    """nginx with a document root and the two php-style locations above."""

    def __init__(self, binary: str, workdir: Path, backend: str, root: Path) -> None:
        super().__init__(binary, workdir, backend)
        self.root = root

    def config(self) -> str:
        user = "user root;\n" if os.geteuid() == 0 else ""
        return NGINX_SCRIPT_CONF.format(user=user, prefix=self.workdir, backend=self.backend,
                                        port=self.port, keepalive_port=self.keepalive_port,
                                        root=self.root, params=FASTCGI_PARAMS,
                                        params_conf=FASTCGI_CONF)


CONF = """\
[global]
error_log = {dir}/fastfpm.log

[www]
listen = {listen}
app = script:
script.root = {root}
script.revalidate_freq = {freq}
pm = static
pm.max_children = {children}
"""

HELLO = """\
def application(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"%s"]
"""

ENV = """\
import json
import os
import sys

def application(environ, start_response):
    keys = ("SCRIPT_NAME", "PATH_INFO", "SCRIPT_FILENAME", "ORIG_SCRIPT_FILENAME", "QUERY_STRING")
    out = {key: environ.get(key) for key in keys}
    out.update(pid=os.getpid(), name=__name__, file=__file__, json_module=sys.modules["json"].__file__)
    start_response("200 OK", [("Content-Type", "application/json")])
    return [json.dumps(out).encode()]
"""

COUNTER = """\
count = 0

def application(environ, start_response):
    global count
    count += 1
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(count).encode()]
"""

EVIL = HELLO % b"EVIL CODE RAN".decode()


def make_site(base: Path) -> tuple[Path, Path]:
    """The document root of the tests (and a directory beside it, outside the root)."""
    root, outside = base / "www", base / "outside"
    (root / "uploads").mkdir(parents=True)
    (root / "sub").mkdir()
    (root / "dir.py").mkdir()
    outside.mkdir()
    (root / "hello.py").write_text(HELLO % "hello")
    (root / "other.py").write_text(HELLO % "other")
    (root / "sub" / "inner.py").write_text(HELLO % "inner")
    (root / "env.py").write_text(ENV)
    (root / "counter.py").write_text(COUNTER)
    (root / "json.py").write_text(HELLO % "my json.py")  # named like a stdlib module
    (root / "noapp.py").write_text("APPLICATION = None\n")
    (root / "notcallable.py").write_text("application = 42\n")
    (root / "boom.py").write_text("raise RuntimeError('boom at import time')\n")
    (root / "uploads" / "avatar.jpg").write_text(EVIL)  # an "image" that is Python code
    (root / "run.txt").write_text(EVIL)
    (outside / "evil.py").write_text(EVIL)
    (root / "link.py").symlink_to(outside / "evil.py")  # a symlink out of the root
    (root / "inside-link.py").symlink_to(root / "hello.py")  # one that stays inside
    (root / "jpg-link.py").symlink_to(root / "uploads" / "avatar.jpg")  # .py name, .jpg file
    (root / "outdir").symlink_to(outside, target_is_directory=True)
    return root, outside


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ConfiguredServer, ScriptNginx, Path]]:
    """One script-mode master (one worker, so its cache is the one every request sees) and nginx."""
    binary = nginx_binary()
    base = tmp_path_factory.mktemp("site")
    root, _ = make_site(base)
    workdir = tmp_path_factory.mktemp("fpm")
    server = ConfiguredServer(workdir, workdir / "fastfpm.conf")
    server.rewrite(CONF.format(root=root, freq="0", children=1, dir="{dir}", listen="{listen}"))
    web = ScriptNginx(binary, tmp_path_factory.mktemp("nginx"), server.nginx_pass, root)
    server.start()
    web.start()
    yield server, web, root
    web.stop()
    server.stop()


def fastcgi(server: ConfiguredServer, script_filename: str, path: str = "/x.py") -> tuple[int, bytes]:
    """A request with a SCRIPT_FILENAME of the caller's choosing, straight to the worker."""
    params = build_params("GET", path, "", {}, None, {"SCRIPT_FILENAME": script_filename})
    with FastCGIClient(server.address, timeout=10) as client:
        response = client.request(params)
    return response.status, response.body


# ---------------------------------------------------------------------------------------------------
# serving

def test_two_scripts_served_by_one_pool(site) -> None:
    server, web, _ = site
    for port in (web.port, web.keepalive_port):
        assert http_get(port, "/hello.py").body == b"hello"
        assert http_get(port, "/other.py").body == b"other"
        assert http_get(port, "/sub/inner.py").body == b"inner"


@pytest.mark.parametrize("split_by", ["fastfpm", "nginx"])
def test_path_info_split(site, split_by: str) -> None:
    """php's semantics: SCRIPT_NAME is the script's URL path, PATH_INFO the rest; SCRIPT_FILENAME
    the script's file (whether nginx split the path or fastfpm cut it off SCRIPT_FILENAME)."""
    _, web, root = site
    port = web.port if split_by == "fastfpm" else web.keepalive_port
    env = http_get(port, "/env.py/users/7?page=2").json()
    assert (env["SCRIPT_NAME"], env["PATH_INFO"], env["QUERY_STRING"]) == ("/env.py", "/users/7", "page=2")
    assert env["SCRIPT_FILENAME"] == str(root / "env.py")
    env = http_get(port, "/env.py").json()
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/env.py", "")


def test_script_is_imported_once_and_kept(site) -> None:
    """The worker's cache keeps the module between requests (revalidated, not re-imported)."""
    _, web, _ = site
    first = int(http_get(web.port, "/counter.py").body)
    assert int(http_get(web.keepalive_port, "/counter.py").body) == first + 1


def test_each_script_is_its_own_module_and_shadows_nothing(site) -> None:
    """json.py under the root answers for itself; the stdlib json stays sys.modules["json"]."""
    _, web, root = site
    assert http_get(web.port, "/json.py").body == b"my json.py"
    env = http_get(web.port, "/env.py").json()
    assert env["name"].startswith("_fastfpm_script_") and env["file"] == str(root / "env.py")
    assert env["json_module"] != str(root / "json.py") and "json" in env["json_module"]


# ---------------------------------------------------------------------------------------------------
# what is refused, and how

def test_missing_script_is_404(site) -> None:
    server, web, root = site
    result = http_get(web.port, "/nope.py")
    assert (result.status, result.body) == (404, b"File not found.\n")
    assert fastcgi(server, str(root / "sub" / "nope.py"))[0] == 404


def test_uploaded_image_is_never_run(site) -> None:
    """php-fpm's famous hole: /uploads/avatar.jpg/x.py with the path info cut off finds avatar.jpg;
    security.limit_extensions answers 403 Access denied. and logs php-fpm's line."""
    server, web, root = site
    mark = server.log_size()
    result = http_get(web.port, "/uploads/avatar.jpg/x.py")
    assert (result.status, result.body) == (403, b"Access denied.\n")
    server.wait_for_log(f"Access to the script '{root}/uploads/avatar.jpg' has been denied "
                        f"(see security.limit_extensions)", mark)
    for name in ("uploads/avatar.jpg", "run.txt", "jpg-link.py"):  # jpg-link.py: a .py name, .jpg file
        status, body = fastcgi(server, str(root / name))
        assert status == 403 and b"EVIL" not in body, name


@pytest.mark.parametrize("name", [
    "{root}/../outside/evil.py",       # .. out of the root
    "{root}/link.py",                  # a symlink to a file outside
    "{root}/outdir/evil.py",           # a symlinked directory outside
    "{root}/hello.py\0.jpg",           # a NUL byte
    "{root}/dir.py",                   # a directory
    "{root}/sub/",                     # a directory, by its trailing slash
    "{root}",                          # the root itself
    "/etc/passwd",                     # not under the root at all
    "{root}x/evil.py",                 # a sibling directory whose name starts like the root
    "relative/hello.py",
])
def test_escapes_from_the_root_are_404(site, name: str) -> None:
    server, _, root = site
    status, body = fastcgi(server, name.format(root=root))
    assert (status, body) == (404, b"File not found.\n")


def test_escapes_through_nginx_are_404(site) -> None:
    _, web, _ = site
    for path in ("/link.py", "/outdir/evil.py", "/dir.py", "/link.py/more"):
        result = http_get(web.port, path)
        assert result.status == 404 and b"EVIL" not in result.body, path


def test_a_symlink_inside_the_root_is_served(site) -> None:
    _, web, _ = site
    assert http_get(web.port, "/inside-link.py").body == b"hello"


def test_file_without_application_is_500_with_a_clear_log_line(site) -> None:
    server, web, root = site
    mark = server.log_size()
    assert http_get(web.port, "/noapp.py").status == 500
    server.wait_for_log(f"script mode: {root}/noapp.py has no 'application'", mark)
    assert http_get(web.port, "/notcallable.py").status == 500
    server.wait_for_log(f"{root}/notcallable.py has an 'application' that is a int", mark)


def test_script_that_raises_at_import_is_500_and_the_worker_lives_on(site) -> None:
    server, web, root = site
    pid = http_get(web.port, "/env.py").json()["pid"]
    mark = server.log_size()
    assert http_get(web.port, "/boom.py").status == 500
    log = server.wait_for_log("RuntimeError: boom at import time", mark)
    assert f"script mode: importing {root}/boom.py failed" in log and "Traceback" in log
    assert http_get(web.port, "/env.py").json()["pid"] == pid  # the same worker, serving on


# ---------------------------------------------------------------------------------------------------
# deploys: the code cache and its revalidation

def write_release(site_dir: Path, name: str) -> Path:
    release = site_dir / "releases" / name
    release.mkdir(parents=True)
    (release / "app.py").write_text(HELLO % name)
    return release


def switch(site_dir: Path, release: Path) -> None:
    """A deploy as deploy tools do it: a new symlink beside `current`, renamed over it (atomic)."""
    subprocess.run(["ln", "-sfn", str(release), str(site_dir / "current.new")], check=True)
    subprocess.run(["mv", "-T", str(site_dir / "current.new"), str(site_dir / "current")], check=True)


def test_symlink_switch_under_load(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Requests loop over kept-alive connections while `current` switches v1 -> v2 -> v3: none fails,
    and every request sent revalidate_freq after a switch gets the new release's code."""
    binary = nginx_binary()
    freq = 0.5
    site_dir = tmp_path_factory.mktemp("deploy")
    switch(site_dir, write_release(site_dir, "v1"))
    workdir = tmp_path_factory.mktemp("fpm")
    server = ConfiguredServer(workdir, workdir / "fastfpm.conf")
    server.rewrite(CONF.format(root=site_dir / "current", freq=f"{freq}s", children=2,
                               dir="{dir}", listen="{listen}"))
    web = ScriptNginx(binary, tmp_path_factory.mktemp("nginx"), server.nginx_pass, site_dir / "current")
    server.start()
    web.start()
    results: list[tuple[float, float, int, bytes]] = []  # sent, answered, status, body
    stop = threading.Event()

    def load(port: int) -> None:
        conn = http_connection(port, timeout=10)
        while not stop.is_set():
            started = time.monotonic()
            try:
                conn.request("GET", "/app.py")
                response = conn.getresponse()
                body = response.read()
                results.append((started, time.monotonic(), response.status, body))
            except OSError as exc:
                results.append((started, time.monotonic(), 0, repr(exc).encode()))
                conn.close()
                conn = http_connection(port, timeout=10)
        conn.close()

    threads = [threading.Thread(target=load, args=(port,)) for port in (web.port, web.keepalive_port)]
    try:
        for thread in threads:
            thread.start()
        switches = []
        for name in ("v2", "v3"):
            time.sleep(1.0)
            release = write_release(site_dir, name)  # written whole before the switch
            before = time.monotonic()
            switch(site_dir, release)
            switches.append((before, time.monotonic(), name.encode()))
        time.sleep(1.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=20)
        web.stop()
        server.stop()
    failed = [r for r in results if r[2] != 200]
    assert not failed, failed[:5]
    assert len(results) > 100
    # A request sent revalidate_freq after a switch ended, and answered before the next one began,
    # gets the release switched to.
    for index, (_, switched_at, name) in enumerate(switches):
        next_begins = switches[index + 1][0] if index + 1 < len(switches) else float("inf")
        late = [body for started, answered, _, body in results
                if started > switched_at + freq and answered < next_begins]
        assert late and set(late) == {name}, (name, set(late))
    assert {body for _, _, _, body in results} == {b"v1", b"v2", b"v3"}


def test_revalidate_freq_with_a_fake_clock(tmp_path: Path) -> None:
    """A changed file is imported again at the first request revalidate_freq after its last check,
    not before; a file that now fails to import is a 500, the old version is not served on."""
    now = [100.0]
    logged: list[str] = []
    app = ScriptDispatcher(str(tmp_path), 2.0, (".py",), lambda level, message: logged.append(message),
                           logged.append, clock=lambda: now[0])
    script = tmp_path / "app.py"
    script.write_text(HELLO % "one")

    def get() -> tuple[str, bytes]:
        status: list[str] = []
        body = b"".join(app({"SCRIPT_FILENAME": str(script), "PATH_INFO": ""},
                            lambda s, h, exc_info=None: status.append(s)))
        return status[0], body

    assert get() == ("200 OK", b"one")
    script.write_text(HELLO % "two!")  # another size, so the signature differs whatever the mtime
    now[0] += 1.9
    assert get() == ("200 OK", b"one")  # within revalidate_freq: the cached version
    now[0] += 0.2
    assert get() == ("200 OK", b"two!")
    script.write_text("def application(:\n")  # a broken deploy
    now[0] += 2.0
    assert get()[0] == "500 Internal Server Error"
    assert any("importing" in line and "app.py failed" in line for line in logged)
    script.write_text(HELLO % "three")
    assert get() == ("200 OK", b"three")  # a failed import is retried on the next request


def test_path_info_variants_share_one_import_and_routes_are_bounded(tmp_path: Path, monkeypatch) -> None:
    """Each distinct path info is a route of its own, but the script is imported once for all of
    them; a client sending endless distinct paths cannot grow the route map past MAX_ROUTES."""
    import sys

    from fastfpm import script as script_mode

    monkeypatch.setattr(script_mode, "MAX_ROUTES", 8)
    (tmp_path / "counter.py").write_text(COUNTER)
    app = ScriptDispatcher(str(tmp_path), 60.0, (".py",), print, print)
    counts = []
    for n in range(20):
        env = {"SCRIPT_FILENAME": f"{tmp_path}/counter.py/item/{n}", "SCRIPT_NAME": f"/counter.py/item/{n}",
               "PATH_INFO": ""}
        counts.append(int(b"".join(app(env, lambda s, h: None))))
        assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == ("/counter.py", f"/item/{n}")
        assert env["SCRIPT_FILENAME"] == f"{tmp_path}/counter.py"
    assert counts == list(range(1, 21))  # one module, one counter
    assert len(app.scripts) == 1 and len(app.routes) <= 8
    module_name = app.scripts[f"{tmp_path}/counter.py"].module.__name__
    assert sys.modules[module_name].__file__ == f"{tmp_path}/counter.py"
    (tmp_path / "counter.py").write_text(COUNTER + "# changed\n")
    app.freq = 0.0
    for route in app.routes.values():
        route.expires = 0.0
    app.scripts[f"{tmp_path}/counter.py"].expires = 0.0
    env = {"SCRIPT_FILENAME": f"{tmp_path}/counter.py", "SCRIPT_NAME": "/counter.py", "PATH_INFO": ""}
    assert b"".join(app(env, lambda s, h: None)) == b"1"  # imported again: a fresh counter
    assert module_name not in sys.modules  # the replaced module left sys.modules


# ---------------------------------------------------------------------------------------------------
# configuration

def check(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "fastfpm.conf"
    conf.write_text(textwrap.dedent(body).format(dir=tmp_path))
    return run_cli("check", "-c", str(conf), "-R")


POOL = """\
[www]
listen = {dir}/fpm.sock
app = script:
"""


@pytest.mark.parametrize(("lines", "line", "message"), [
    ("", 3, "app = script: (script mode) needs script.root, the directory of the scripts"),
    ("script.root = {dir}/missing\n", 4, "the script.root directory {dir}/missing does not exist "
                                         "or is not a directory"),
    ("script.root = {dir}/fastfpm.conf\n", 4, "the script.root directory {dir}/fastfpm.conf does not "
                                              "exist or is not a directory"),
    ("script.root = {dir}\nsecurity.limit_extensions = .py py\n", 5,
     "invalid value '.py py' for 'security.limit_extensions': 'py' is not an extension"),
    ("script.root = {dir}\nmount = /app\n", 5, "mount has no effect in script mode"),
    ("script.root = {dir}\nscript.revalidate_freq = soon\n", 5,
     "'script.revalidate_freq': expected a time such as 30, 30s, 5m, 1h or 1d"),
])
def test_config_errors_are_file_line_message(tmp_path: Path, lines: str, line: int, message: str) -> None:
    result = check(tmp_path, POOL + lines)
    assert result.returncode != 0
    conf = tmp_path / "fastfpm.conf"
    wanted = message.format(dir=tmp_path)
    assert any(text.startswith(f"{conf}:{line}: ") and wanted in text
               for text in result.stderr.splitlines()), result.stderr


def test_empty_limit_extensions_allows_all_with_a_warning(tmp_path: Path) -> None:
    result = check(tmp_path, POOL + "script.root = {dir}\nsecurity.limit_extensions =\n")
    assert result.returncode == 0, result.stderr
    assert "security.limit_extensions is empty: any file under script.root runs" in result.stderr
    now = [0.0]
    (tmp_path / "run.txt").write_text(HELLO % "ran")
    app = ScriptDispatcher(str(tmp_path), 0.0, (), print, print, clock=lambda: now[0])
    assert b"".join(app({"SCRIPT_FILENAME": str(tmp_path / "run.txt")}, lambda s, h: None)) == b"ran"


def test_script_directives_without_script_mode_are_warned(tmp_path: Path) -> None:
    result = check(tmp_path, "[www]\nlisten = {dir}/fpm.sock\napp = tests.apps.whoami:app\n"
                             "script.root = {dir}\n")
    assert result.returncode == 0, result.stderr
    assert f"{tmp_path / 'fastfpm.conf'}:4: " in result.stderr
    assert "script.root has no effect unless app = script:" in result.stderr


def test_environ_bytes_are_latin1_and_file_names_utf8(site) -> None:
    """A non-ASCII script name: nginx sends its UTF-8 bytes, the environ holds them as latin-1."""
    _, web, root = site
    (root / "café.py").write_text(HELLO % "cafe")
    assert http_get(web.port, "/caf%C3%A9.py").body == b"cafe"
    assert json.loads(http_get(web.port, "/env.py/%C3%A9").body)["PATH_INFO"] == "/\u00c3\u00a9"


@pytest.mark.parametrize(("extra", "expected"), [
    ({}, ("/app.py/users/7", "")),                                        # nginx's stock params
    ({"SCRIPT_NAME": "/app.py", "PATH_INFO": "/users/7"}, ("/app.py", "/users/7")),  # after a split
    ({"SCRIPT_NAME": None, "PATH_INFO": None}, ("/app.py/users/7", "")),  # neither: the request path
])
def test_script_path_policy_keeps_what_the_web_server_sent(extra: dict, expected: tuple[str, str]) -> None:
    """ScriptPathPolicy (Worker(script_paths=True)): SCRIPT_NAME and PATH_INFO as sent, not the
    mount policy's split of the request path (which would make SCRIPT_NAME empty)."""
    import socket

    from fastfpm import protocol
    from fastfpm._core import Worker
    from fastfpm.log import ErrorLog
    from fastfpm.worker import environ_template

    class Pool:
        name = "www"

    params = build_params("GET", "/app.py/users/7", "", {}, None, {})
    for key, value in extra.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    sock = socket.socket(socket.AF_UNIX)
    log = ErrorLog(None, "alert")
    try:
        for script_paths, want in ((True, expected), (False, ("", "/app.py/users/7"))):
            worker = Worker(sock.fileno(), lambda e, s: [], environ_template=environ_template(Pool),
                            log=log.log, log_exception=log.exception, script_paths=script_paths)
            env = worker.environ_for(protocol.encode_pairs(
                [(k.encode(), v.encode()) for k, v in params.items()]))
            assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == want
    finally:
        sock.close()


def test_serve_from_the_command_line(launcher, tmp_path: Path) -> None:
    """`serve script: --script-root DIR`, no configuration file."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.py").write_text(HELLO % "from the command line")
    server = launcher.fastfpm("script:", max_children=1, extra_args=["--script-root", str(root)])
    params = build_params("GET", "/hello.py", "", {}, None, {"SCRIPT_FILENAME": str(root / "hello.py")})
    with FastCGIClient(server.address, timeout=10) as client:
        response = client.request(params)
    assert (response.status, response.body) == (200, b"from the command line")
