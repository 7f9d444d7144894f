"""Stream `?mb=N` MiB from a generator in 64 KiB chunks of deterministic content.

Each chunk is a fixed 64 KiB block whose first 8 bytes are replaced by the chunk's index, so a
chunk that is lost, repeated or reordered changes the hash. `expected_sha256(n)` gives the hash
the client must see. `?length=0` leaves out Content-Length (nginx then sends it chunked).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

CHUNK = 64 * 1024
MIB = 1024 * 1024
BLOCK = (hashlib.sha256(b"fastfpm download test").digest() * (CHUNK // 32))[:CHUNK]


def chunks(mib: int) -> Iterator[bytes]:
    """The body for `mib` MiB, chunk by chunk."""
    for index in range(mib * MIB // CHUNK):
        yield index.to_bytes(8, "big") + BLOCK[8:]


def expected_sha256(mib: int) -> str:
    """sha256 hex digest of the body for `mib` MiB."""
    digest = hashlib.sha256()
    for chunk in chunks(mib):
        digest.update(chunk)
    return digest.hexdigest()


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Stream the body from a generator, never building it whole."""
    query = parse_qs(environ.get("QUERY_STRING", ""))
    mib = int(query.get("mb", ["1"])[0])
    headers = [("Content-Type", "application/octet-stream")]
    if query.get("length", ["1"])[0] != "0":
        headers.append(("Content-Length", str(mib * MIB)))
    start_response("200 OK", headers)
    return chunks(mib)
