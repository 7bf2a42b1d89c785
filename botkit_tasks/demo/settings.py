"""The demo's fixed numbers: its delivery policy, smallest audience and phase timeout."""

from __future__ import annotations

from ..federation.delivery import DeliveryOptions

__all__ = ["DEMO_DELIVERY", "MIN_FOLLOWERS", "PHASE_TIMEOUT"]

#: Delivery policy of the demo: four retries, 0.25 s doubling to at most 2 s, 1 s timeouts.
DEMO_DELIVERY = DeliveryOptions(
    max_retries=4,
    min_backoff=0.25,
    max_backoff=2.0,
    connect_timeout=1.0,
    read_timeout=1.0,
    total_timeout=2.0,
)
#: Smallest number of followers the script works with.
MIN_FOLLOWERS = 20
#: Seconds each phase may take before the demo gives up.
PHASE_TIMEOUT = 45.0
