"""A Flask hello for the preload measurement (benchmarks/preload.py): the smallest real Flask app.

Its own module, so importing benchmarks.apps (the bare hello) never loads Flask.
"""

from __future__ import annotations

from flask import Flask

app = Flask(__name__)


@app.get("/")
def hello() -> str:
    """Answer ``Hello, world!``."""
    return "Hello, world!"
