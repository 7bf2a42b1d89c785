"""The inbox's HTTP plumbing: ASGI types, reading the body under its cap, answering.

Internal to :mod:`botkit_tasks.federation.inbox`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import httpx

__all__ = [
    "MAX_BODY_BYTES",
    "Receive",
    "Reject",
    "Scope",
    "Send",
    "lifespan",
    "parse_activity",
    "read_body",
    "respond",
]

#: Largest request body (bytes) the inbox reads; larger requests get 413.
MAX_BODY_BYTES = 1 << 20

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class Reject(Exception):
    """Ends request handling with an HTTP status and a short reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON and which the
    # key-value store refuses; reject them as malformed input.
    raise ValueError(f"{name} is not valid JSON")


def parse_activity(body: bytes) -> dict[str, Any]:
    """The body as a JSON object that the key-value store can hold, else a 400."""
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and over-long integers;
        # RecursionError a deeply nested body.
        raise Reject(400, "body is not valid JSON") from exc
    if not isinstance(value, dict):
        raise Reject(400, "body is not a JSON object")
    try:
        # Lone surrogates (from "\ud800" escapes) cannot be stored or re-encoded.
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError) as exc:
        raise Reject(400, "body contains invalid characters") from exc
    return value


async def read_body(headers: httpx.Headers, receive: Receive) -> bytes:
    """Read the whole request body, refusing more than :data:`MAX_BODY_BYTES` (413)."""
    length = headers.get("content-length")
    if length is not None:
        try:
            declared = int(length.strip())
        except ValueError:
            raise Reject(400, "invalid Content-Length") from None
        if declared < 0:
            raise Reject(400, "invalid Content-Length")
        if declared > MAX_BODY_BYTES:
            # Refuse before reading a byte of it.
            raise Reject(413, "body too large")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Reject(400, "client disconnected")
        chunk = message.get("body") or b""
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Reject(413, "body too large")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


async def respond(
    send: Send, status: int, reason: str, *, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """Answer ``status``: an empty 202, or a JSON ``{"error": reason}``."""
    if status == 202:
        body = b""
        headers = [(b"content-length", b"0")]
    else:
        body = json.dumps({"error": reason}).encode("utf-8")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
        ]
    headers.extend(extra or ())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge the ASGI lifespan events; the inbox has nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
