"""What a consumer uses of its broker, as a protocol (so the two modules stay one-way)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import sqlalchemy as sa
    from sqlalchemy.engine import Engine

    from ._hub import Hub
    from ._maintenance import Maintenance
    from ._schema import Statements

__all__ = ["ConsumerHost"]


class ConsumerHost(Protocol):
    """The parts of a :class:`~botkit_tasks.brokers.SqlBroker` its consumers use."""

    engine: Engine
    messages: sa.Table
    workers: sa.Table
    is_postgres: bool
    listen: bool
    poll_interval: float
    heartbeat_timeout: float
    statements: Statements
    hub: Hub[Any]
    maintenance: Maintenance
