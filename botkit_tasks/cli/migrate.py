"""``botkit-tasks migrate``: create the key-value and broker tables."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TextIO

from .common import EXIT_OK

if TYPE_CHECKING:
    from ..config import Backends

__all__ = ["migrate_command"]


def migrate_command(backends: Backends, out: TextIO) -> int:
    if backends.kind == "redis":
        print(f"Redis ({backends.url}) needs no tables: nothing to do.", file=out)
        return EXIT_OK
    broker: Any = backends.broker
    broker.create_tables()
    # SqlKvStore creates its table (idempotently) on first use.
    backends.kv.get(("botkit", "schema"))
    kv_table = getattr(backends.kv, "table_name", "?")
    print(
        f"Tables ready on {backends.url}: {kv_table}, "
        f"{broker.table_prefix}messages, {broker.table_prefix}workers",
        file=out,
    )
    return EXIT_OK
