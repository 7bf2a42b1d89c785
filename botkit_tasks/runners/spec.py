"""The runner-neutral description of a job: what runs, where, and how it is retried.

A :class:`JobSpec` is written once; :mod:`botkit_tasks.runners.dramatiq` declares
it as a Dramatiq actor and :mod:`botkit_tasks.runners.celery` as a Celery task.
The body signals its outcome with plain Python: returning is success,
:class:`RetryLater` asks for a retry (after a given delay, e.g. a server's
``Retry-After``), :class:`PermanentJobError` fails at once without a retry, and
any other exception is retried with the policy's backoff.  Both runners take
their decisions from :func:`decide`, so a body behaves the same on either.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import random
from collections.abc import Callable
from typing import Any

from ..errors import BotkitError

__all__ = [
    "CHECKED",
    "DEFAULT_MAX_BACKOFF",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_MIN_BACKOFF",
    "Decision",
    "JobSpec",
    "PermanentJobError",
    "RetryLater",
    "RetryPolicy",
    "checked_arguments",
    "decide",
]

#: Retries after the first attempt: 9 retries make the 10 attempts of DESIGN §3.
DEFAULT_MAX_RETRIES = 9
#: Seconds before the first retry; doubled for each further one.
DEFAULT_MIN_BACKOFF = 1.0
#: Cap on one retry delay in seconds (12 h), ``Retry-After`` included.
DEFAULT_MAX_BACKOFF = 12 * 3600.0

# A private generator: jitter must not consume or reseed the application's
# global random state (tests and users may seed it).
_random = random.Random()


class PermanentJobError(BotkitError):
    """The job can never succeed: it is dead-lettered at once, never retried."""


class RetryLater(BotkitError):
    """Raised by a body to be retried after ``delay`` seconds (``None``: the backoff).

    The delay is capped at the policy's ``max_backoff``.  It still counts as
    an attempt: once the retries are used up the job is dead-lettered.
    """

    def __init__(self, reason: str, *, delay: float | None = None) -> None:
        if delay is not None and (isinstance(delay, bool) or not delay >= 0):
            raise ValueError(f"RetryLater delay must be >= 0 seconds, not {delay!r}")
        super().__init__(reason)
        self.reason = reason
        self.delay = delay


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How a failed job is retried.  Durations are in seconds.

    Attributes:
        max_retries: Retries after the first attempt before the job is dead.
        min_backoff: Delay before the first retry; doubled for each further
            retry, with jitter (each delay is drawn from ``[d, 2d)``).
        max_backoff: Cap on one retry delay, ``RetryLater(delay=…)`` included.
        permanent: Exception types that are never retried, beside
            :class:`PermanentJobError`.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    min_backoff: float = DEFAULT_MIN_BACKOFF
    max_backoff: float = DEFAULT_MAX_BACKOFF
    permanent: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise TypeError(f"max_retries must be an int, not {self.max_retries!r:.100}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {self.max_retries}")
        if not 0 < self.min_backoff <= self.max_backoff:
            raise ValueError(
                f"need 0 < min_backoff <= max_backoff, got {self.min_backoff!r} "
                f"and {self.max_backoff!r}"
            )

    def backoff(self, retries: int) -> float:
        """Seconds to wait before retry number ``retries + 1`` (``retries`` done so far)."""
        base = min(self.min_backoff * 2.0 ** min(retries, 64), self.max_backoff)
        return min(base * _random.uniform(1.0, 2.0), self.max_backoff)


@dataclasses.dataclass(frozen=True)
class Decision:
    """What a runner does after a failed attempt.

    Attributes:
        retry: Whether the job runs again.
        delay: Seconds until it does (when ``retry``).
        reason: One line for logs and the dead letter.
    """

    retry: bool
    delay: float
    reason: str


def decide(policy: RetryPolicy, exc: BaseException, retries: int) -> Decision:
    """The outcome of an attempt that raised ``exc`` after ``retries`` earlier retries."""
    reason = f"{type(exc).__name__}: {exc}"[:1000]
    if isinstance(exc, (PermanentJobError, *policy.permanent)):
        return Decision(False, 0.0, reason)
    if retries >= policy.max_retries:
        return Decision(False, 0.0, f"retries exhausted ({retries}); last error {reason}")
    if isinstance(exc, RetryLater) and exc.delay is not None:
        return Decision(True, min(exc.delay, policy.max_backoff), reason)
    return Decision(True, policy.backoff(retries), reason)


def checked_arguments(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, failing with :class:`PermanentJobError` on a call its signature refuses.

    A message with missing or unknown arguments can never succeed: retrying it
    would only delay its dead letter by hours.  A function already checked
    (marked with :data:`CHECKED`, e.g. by a caller raising its own
    :class:`PermanentJobError` subclass) is returned as it is.
    """
    if getattr(fn, CHECKED, False):
        return fn
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise PermanentJobError(
                f"{fn.__name__}: malformed job arguments {args!r:.200} {kwargs!r:.200}: {exc}"
            ) from None
        return fn(*args, **kwargs)

    setattr(checked, CHECKED, True)
    return checked


#: Attribute marking a job function whose arguments are already checked.
CHECKED = "_botkit_checked_arguments"


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One job, declared on either runner.

    Attributes:
        name: Actor / task name (unique per broker or app).
        queue: Queue name.
        body: The function run with the job's (JSON) arguments.
        policy: Retries and permanent errors.
        time_limit: Seconds one attempt may run (``None``: the runner's default).
    """

    name: str
    queue: str
    body: Callable[..., Any]
    policy: RetryPolicy = RetryPolicy()
    time_limit: float | None = None

    def __post_init__(self) -> None:
        for field in ("name", "queue"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"JobSpec {field} must be a non-empty string, not {value!r}")
        if not callable(self.body):
            raise TypeError(f"JobSpec body must be callable, not {self.body!r:.100}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"JobSpec time_limit must be positive, not {self.time_limit!r}")
