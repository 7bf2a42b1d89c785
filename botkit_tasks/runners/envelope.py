"""Celery task messages as ``SqlBroker`` rows, and back.

The :mod:`~botkit_tasks.runners.kombu_sql` transport stores each kombu
message in a row's Dramatiq message (options ``"kombu"``); the Celery
runner's retries and dead letters are rows whose options carry the job
(``"celery"``: task id and retries), turned into a message of Celery's task
protocol 2 when delivered.  A job's ordering key travels as the header
:data:`ORDERING_HEADER` and is the row's ``ordering_key``.
"""

from __future__ import annotations

import base64
import copy
import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from dramatiq.message import Message

__all__ = [
    "ORDERING_DEFERS_HEADER",
    "ORDERING_HEADER",
    "ORDERING_SEQ_HEADER",
    "decoded_arguments",
    "eta_delay_ms",
    "ordering_headers",
    "ordering_key_of",
    "row_payload",
    "task_envelope",
]

#: The message header that carries a job's ordering key on Celery.
ORDERING_HEADER = "botkit_ordering_key"
#: Its number under the key, where the runner orders (Celery's Redis transport).
ORDERING_SEQ_HEADER = "botkit_ordering_seq"
#: How often the job found its key busy.
ORDERING_DEFERS_HEADER = "botkit_ordering_defers"


def ordering_headers(key: str | None, seq: int | None, defers: int = 0) -> dict[str, Any]:
    """The headers that carry an ordering key (and number, and defers) on a task message."""
    headers: dict[str, Any] = {}
    if key is not None:
        headers[ORDERING_HEADER] = key
        if seq is not None:
            headers[ORDERING_SEQ_HEADER] = seq
            if defers:
                headers[ORDERING_DEFERS_HEADER] = defers
    return headers


def task_envelope(
    name: str,
    args: list[Any],
    kwargs: dict[str, Any],
    task_id: str,
    retries: int,
    queue: str,
    ordering_key: str | None = None,
) -> dict[str, Any]:
    """A kombu message of Celery's task protocol 2, JSON-serialised, for ``queue``."""
    extra = {} if ordering_key is None else {ORDERING_HEADER: ordering_key}
    body = json.dumps(
        [args, kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    )
    return {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": name,
            "id": task_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": retries,
            "timelimit": [None, None],
            "root_id": task_id,
            "parent_id": None,
            "argsrepr": repr(args)[:1024],
            "kwargsrepr": repr(kwargs)[:1024],
            "origin": "botkit-tasks",
            "ignore_result": False,
            **extra,
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
        },
    }


def ordering_key_of(value: object) -> str | None:
    return value if isinstance(value, str) else None


def eta_delay_ms(eta: object) -> int | None:
    """Milliseconds until Celery's ``eta`` header (ISO 8601), or ``None`` when due."""
    if not isinstance(eta, str):
        return None
    try:
        when = datetime.fromisoformat(eta)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    delay = int((when.timestamp() - time.time()) * 1000)
    return delay if delay > 0 else None


def decoded_arguments(message: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """The task's args and kwargs when the body is JSON (for monitoring), else empty."""
    if message.get("content-type") != "application/json":
        return [], {}
    try:
        body = message["body"]
        if message["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        decoded = json.loads(body)
        args, kwargs = decoded[0], decoded[1]
    except (KeyError, IndexError, TypeError, ValueError):
        return [], {}
    if isinstance(args, list) and isinstance(kwargs, dict):
        return args, kwargs
    return [], {}


def row_payload(message: Message[Any], queue: str) -> dict[str, Any]:
    """The kombu message a row holds, with a fresh delivery tag."""
    options = message.options
    raw = options.get("kombu")
    if isinstance(raw, dict):
        payload = copy.deepcopy(raw)
    else:
        found = options.get("celery")
        job: dict[str, Any] = found if isinstance(found, dict) else {}
        retries = job.get("retries", options.get("retries", 0))
        payload = task_envelope(
            message.actor_name,
            list(message.args),
            dict(message.kwargs),
            str(job.get("task_id") or message.message_id),
            retries if isinstance(retries, int) else 0,
            queue,
            ordering_key_of(options.get("ordering_key")),
        )
    props = payload.setdefault("properties", {})
    props["delivery_tag"] = uuid.uuid4().hex
    props.setdefault("delivery_info", {}).setdefault("routing_key", queue)
    return payload
