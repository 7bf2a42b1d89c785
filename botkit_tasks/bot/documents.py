"""The JSON-LD a bot writes: contexts, its actor document, and note text as HTML."""

from __future__ import annotations

import datetime as dt
import html
import secrets
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ._protocols import BotCore

__all__ = [
    "AS_CONTEXT",
    "NOTE_TYPES",
    "SECURITY_CONTEXT",
    "actor_document",
    "mention_name",
    "now_iso",
    "paragraphs",
    "prepend",
    "sortable_id",
]

#: The ActivityStreams JSON-LD context.
AS_CONTEXT = "https://www.w3.org/ns/activitystreams"
#: The security vocabulary (``publicKey``).
SECURITY_CONTEXT = "https://w3id.org/security/v1"
#: Object types handled as notes (``on_message`` / ``on_mention``).
NOTE_TYPES = ("Note", "Article", "Question")


def actor_document(bot: BotCore) -> dict[str, Any]:
    """``bot``'s actor document (a ``Service``), with its public key.

    Reads (and on first use creates) the key pair in the key-value store.
    """
    from ..federation.keys import public_key_pem

    actor = bot.actor_id
    federation = bot.federation
    return {
        "@context": [AS_CONTEXT, SECURITY_CONTEXT],
        "id": actor,
        "type": "Service",
        "preferredUsername": bot.username,
        "name": bot.name,
        "summary": paragraphs(bot.summary),
        "url": actor,
        "inbox": federation.inbox_url,
        "outbox": f"{actor}/outbox",
        "followers": bot.followers_url,
        "following": f"{actor}/following",
        "endpoints": {"sharedInbox": federation.shared_inbox_url},
        "manuallyApprovesFollowers": False,
        "discoverable": True,
        "publicKey": {
            "id": federation.key_id,
            "owner": actor,
            "publicKeyPem": public_key_pem(federation.private_key),
        },
    }


def now_iso() -> str:
    """The current UTC time as ``xsd:dateTime`` to the second (``…Z``)."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def sortable_id() -> str:
    """A URL-safe id that sorts by creation time (milliseconds, then 64 random bits)."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(8)}"


def paragraphs(text: str) -> str:
    """Plain text as HTML: escaped, blank lines separate paragraphs, newlines become <br>."""
    if not text:
        return ""
    parts = [p for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    return "".join(f"<p>{html.escape(p.strip()).replace(chr(10), '<br>')}</p>" for p in parts)


def prepend(prefix: str, content: str) -> str:
    """``content`` (HTML paragraphs) with the HTML ``prefix`` at the start of the first one."""
    if content.startswith("<p>"):
        return f"<p>{prefix} {content[3:]}"
    return f"<p>{prefix}</p>{content}"


def mention_name(actor: Mapping[str, Any]) -> str:
    """``@user@host`` for an actor document, or its id when it has no username."""
    username = actor.get("preferredUsername")
    host = urlsplit(str(actor["id"])).netloc
    if isinstance(username, str) and username:
        return f"@{username}@{host}"
    return str(actor["id"])
