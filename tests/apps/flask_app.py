"""A small Flask application for the end-to-end tests: routing, url_for, JSON, redirects, sessions."""

from __future__ import annotations

from typing import Any

from flask import Flask, abort, jsonify, redirect, request, session, url_for

app = Flask(__name__)
app.secret_key = "only-for-the-tests"


@app.get("/")
def index() -> Any:
    """Links built with url_for, and what Flask thinks the request is."""
    return jsonify(
        index=url_for("index"),
        user=url_for("user", name="Zoë Smith"),
        item=url_for("item", item_id=7),
        search=url_for("search", q="a b", tag=["x", "y"]),
        external=url_for("index", _external=True),
        script_root=request.script_root,
        path=request.path,
        url=request.url,
    )


@app.get("/user/<name>")
def user(name: str) -> Any:
    """A string path parameter, with the URL that leads back to it."""
    return jsonify(name=name, url=url_for("user", name=name), path=request.path)


@app.get("/items/<int:item_id>")
def item(item_id: int) -> Any:
    """An int path parameter; /items/0 is a 404 raised by the view."""
    if item_id == 0:
        abort(404)
    return jsonify(item_id=item_id, double=item_id * 2)


@app.get("/search")
def search() -> Any:
    """Query arguments, one of them repeated."""
    return jsonify(q=request.args.get("q"), tags=request.args.getlist("tag"),
                   page=request.args.get("page", 1, type=int))


@app.post("/api/echo")
def api_echo() -> Any:
    """A JSON body echoed back with 201."""
    return jsonify(received=request.get_json(), content_type=request.content_type,
                   length=request.content_length), 201


@app.get("/old")
def old() -> Any:
    """A redirect built with url_for."""
    return redirect(url_for("user", name="redirected"))


@app.get("/headers")
def headers() -> Any:
    """Request headers as Flask sees them."""
    return jsonify(x_test=request.headers.get("X-Test"), user_agent=request.headers.get("User-Agent"),
                   accept=request.headers.get("Accept"), host=request.host,
                   content_type=request.headers.get("Content-Type"))


@app.post("/login")
def login() -> Any:
    """A form post that sets a session cookie and redirects."""
    session["user"] = request.form["user"]
    return redirect(url_for("whoami"))


@app.get("/whoami")
def whoami() -> Any:
    """Who the session cookie says is here."""
    return jsonify(user=session.get("user"))
