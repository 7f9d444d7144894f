"""A real Flask application served end to end: HTTP client -> nginx (stock fastcgi_params) -> fastfpm.

Run twice: with the app at / and with `--mount /sub`, where every URL Flask builds must carry the
prefix. (Debian's fastcgi_params send HTTP_HOST as nginx's $host, without the port, so absolute
URLs carry no port; that is nginx's configuration, not fastfpm's doing.)
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.servers import Launcher, Stack, http_get, http_request, missing_requirement

try:
    import flask
except ImportError:
    flask = None
if flask is None:
    # flask is a test dependency: as with nginx, missing it fails under CI.
    missing_requirement("flask is not installed (pip install -e '.[test]')", module_level=True)

pytestmark = pytest.mark.nginx

FLASK_APP = "tests.apps.flask_app:app"


@dataclass
class Site:
    """The Flask app behind nginx, and the prefix it is mounted under ('' or '/sub')."""

    stack: Stack
    prefix: str

    @property
    def port(self) -> int:
        """nginx's port."""
        return self.stack.port

    def url(self, path: str) -> str:
        """The request target for an app-relative path."""
        return self.prefix + path


@pytest.fixture(scope="module", params=["", "/sub"], ids=["root", "mounted"])
def site(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """nginx -> fastfpm -> the Flask app, mounted at / or at /sub."""
    prefix: str = request.param
    extra = ["--mount", prefix] if prefix else []
    with Launcher(tmp_path_factory.mktemp) as launcher:
        yield Site(launcher.stack(FLASK_APP, "unix", max_children=2, extra_args=extra), prefix)


def test_url_for(site: Site) -> None:
    """url_for builds URLs that lead back through nginx, prefix included."""
    reply = http_get(site.port, site.url("/"))
    assert reply.status == 200, reply.body
    seen = reply.json()
    p = site.prefix
    assert seen["index"] == f"{p}/"
    assert seen["user"] == f"{p}/user/Zo%C3%AB%20Smith"
    assert seen["item"] == f"{p}/items/7"
    assert seen["search"] == f"{p}/search?q=a+b&tag=x&tag=y"
    assert seen["script_root"] == p
    assert seen["path"] == "/"
    assert seen["external"] in (f"http://127.0.0.1{p}/", f"http://127.0.0.1:{site.port}{p}/")
    # The links work.
    user = http_get(site.port, seen["user"])
    assert user.status == 200
    assert user.json() == {"name": "Zoë Smith", "url": seen["user"], "path": "/user/Zo\u00eb Smith"}
    assert http_get(site.port, seen["item"]).json() == {"item_id": 7, "double": 14}


def test_path_parameters(site: Site) -> None:
    """String and int converters see decoded path segments; a bad int is Flask's 404."""
    reply = http_get(site.port, site.url("/user/J%C3%BCrgen%20O%27Neil%2Bx"))
    assert reply.status == 200
    assert reply.json()["name"] == "Jürgen O'Neil+x"
    assert http_get(site.port, site.url("/items/42")).json() == {"item_id": 42, "double": 84}
    assert http_get(site.port, site.url("/items/abc")).status == 404
    assert http_get(site.port, site.url("/items/0")).status == 404  # abort(404) in the view


def test_query_arguments(site: Site) -> None:
    """request.args decodes the query string, repeated keys included."""
    reply = http_get(site.port, site.url("/search?q=hello+world%21&tag=a&tag=b%2Fc&page=3"))
    assert reply.json() == {"q": "hello world!", "tags": ["a", "b/c"], "page": 3}
    assert http_get(site.port, site.url("/search")).json() == {"q": None, "tags": [], "page": 1}


def test_json_post(site: Site) -> None:
    """A JSON body is parsed by Flask and echoed with 201."""
    payload = {"a": [1, 2, {"b": "ü"}], "n": None, "text": "x" * 5000}
    body = json.dumps(payload).encode()
    reply = http_request(site.port, "POST", site.url("/api/echo"), body=body,
                         headers={"Content-Type": "application/json"})
    assert reply.status == 201, reply.body[:500]
    seen = reply.json()
    assert seen["received"] == payload
    assert seen["content_type"] == "application/json"
    assert seen["length"] == len(body)


def test_redirect(site: Site) -> None:
    """A redirect built with url_for points inside the mount."""
    reply = http_get(site.port, site.url("/old"))
    assert reply.status == 302
    location = reply.header("Location")
    assert location is not None
    target = urllib.parse.urlsplit(location)
    assert target.path == f"{site.prefix}/user/redirected"
    followed = http_get(site.port, target.path)
    assert followed.status == 200
    assert followed.json()["name"] == "redirected"


def test_not_found(site: Site) -> None:
    """An unknown route is Flask's own 404 page."""
    reply = http_get(site.port, site.url("/no/such/page"))
    assert reply.status == 404
    assert b"Not Found" in reply.body


def test_request_headers(site: Site) -> None:
    """request.headers sees what the client sent."""
    reply = http_get(site.port, site.url("/headers"), headers={
        "X-Test": "yes please", "User-Agent": "flask-e2e/2.0", "Accept": "application/json"})
    seen = reply.json()
    assert seen["x_test"] == "yes please"
    assert seen["user_agent"] == "flask-e2e/2.0"
    assert seen["accept"] == "application/json"
    assert seen["host"].startswith("127.0.0.1")
    assert seen["content_type"] is None


def test_session_cookie(site: Site) -> None:
    """A form login sets a session cookie that a later request carries back."""
    reply = http_request(site.port, "POST", site.url("/login"), body=b"user=ada+lovelace",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert reply.status == 302
    assert urllib.parse.urlsplit(reply.header("Location") or "").path == f"{site.prefix}/whoami"
    cookie = reply.header("Set-Cookie")
    assert cookie is not None and cookie.startswith("session=")
    session = cookie.split(";", 1)[0]
    assert http_get(site.port, site.url("/whoami"), headers={"Cookie": session}).json() == {
        "user": "ada lovelace"}
    assert http_get(site.port, site.url("/whoami")).json() == {"user": None}
