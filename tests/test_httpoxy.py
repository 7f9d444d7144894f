"""httpoxy (CVE-2016-5385): HTTP_PROXY never reaches the app unless the pool keeps it.

A `Proxy:` request header becomes the HTTP_PROXY param (nginx's stock fastcgi_params pass every
header as HTTP_*), and a FastCGI client can send the param itself. One master serves two pools of
the environ echo: `strict` (the default) and `keep` (security.keep_http_proxy = yes); each is
asked directly over FastCGI and through its own nginx.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastfpm.client import FastCGIClient, build_params
from tests.servers import ConfiguredServer, Nginx, http_get, nginx_binary

CONF = """\
[global]
error_log = {dir}/fastfpm.log

[strict]
app = tests.apps.environ_echo:app
listen = {dir}/strict.sock
pm.max_children = 1

[keep]
app = tests.apps.environ_echo:app
listen = {dir}/keep.sock
pm.max_children = 1
security.keep_http_proxy = yes
"""

EVIL = "http://evil.test:3128"


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConfiguredServer]:
    """One master with the strict and the keep pool."""
    workdir = tmp_path_factory.mktemp("fpm")
    server = ConfiguredServer(workdir, workdir / "fastfpm.conf")
    server.rewrite(CONF)
    server.start()
    yield server
    server.stop()


def socket_of(master: ConfiguredServer, pool: str) -> Path:
    return master.workdir / f"{pool}.sock"


def environ_over_fastcgi(master: ConfiguredServer, pool: str, headers: dict[str, str],
                         extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environ the pool's app saw for a GET with these headers (and extra raw params)."""
    params = build_params("GET", "/env", "", headers, None, extra or {})
    with FastCGIClient(str(socket_of(master, pool)), timeout=10) as client:
        response = client.request(params)
    assert response.status == 200, response.body
    return json.loads(response.body)["environ"]


def test_proxy_header_is_dropped_by_default(master: ConfiguredServer) -> None:
    env = environ_over_fastcgi(master, "strict", {"Proxy": EVIL, "Proxy-Authorization": "Basic eA=="})
    assert "HTTP_PROXY" not in env
    assert env["HTTP_PROXY_AUTHORIZATION"] == "Basic eA=="  # a different header, left alone


def test_raw_http_proxy_param_is_dropped_by_default(master: ConfiguredServer) -> None:
    """A client speaking FastCGI itself sends the param, not a header: dropped all the same."""
    env = environ_over_fastcgi(master, "strict", {}, extra={"HTTP_PROXY": EVIL, "HTTP_X_MARK": "1"})
    assert "HTTP_PROXY" not in env and env["HTTP_X_MARK"] == "1"


def test_keep_http_proxy_keeps_the_param(master: ConfiguredServer) -> None:
    assert environ_over_fastcgi(master, "keep", {"Proxy": EVIL})["HTTP_PROXY"] == EVIL
    assert environ_over_fastcgi(master, "keep", {}, extra={"HTTP_PROXY": EVIL})["HTTP_PROXY"] == EVIL


@pytest.fixture(scope="module")
def nginx_for(master: ConfiguredServer,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Nginx]]:
    """An nginx with stock fastcgi_params in front of each pool."""
    binary = nginx_binary()  # skips (or fails under CI) when nginx is missing
    started: dict[str, Nginx] = {}
    try:
        for pool in ("strict", "keep"):
            started[pool] = Nginx(binary, tmp_path_factory.mktemp("nginx"),
                                  f"unix:{socket_of(master, pool)}").start()
        yield started
    finally:
        for web in started.values():
            web.stop()


@pytest.mark.nginx
@pytest.mark.parametrize("keep_alive", [False, True], ids=["per-request", "keepalive"])
def test_proxy_header_through_nginx(nginx_for: dict[str, Nginx], keep_alive: bool) -> None:
    """nginx passes `Proxy:` as HTTP_PROXY: gone from the strict pool's environ, kept by the other."""
    def seen(pool: str) -> dict[str, str]:
        web = nginx_for[pool]
        reply = http_get(web.keepalive_port if keep_alive else web.port, "/env/proxy",
                         headers={"Proxy": EVIL, "X-Mark": "m"})
        assert reply.status == 200, reply.body
        return reply.json()["environ"]

    strict = seen("strict")
    assert "HTTP_PROXY" not in strict and strict["HTTP_X_MARK"] == "m"
    assert seen("keep")["HTTP_PROXY"] == EVIL
