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
    if backends.runner == "celery" and backends.celery_url is not None:
        # The Celery transport's own SqlBroker on the same tables.
        from ..runners.kombu_sql import broker_for

        options = dict(getattr(broker.conf, "broker_transport_options", None) or {})
        broker = broker_for(backends.celery_url.removeprefix("botkit+"), options)
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
