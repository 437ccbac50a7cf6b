"""When to try again: the device's backoff, and the kernel's refusals per block.

Two kinds of "not now" reach the driver core, and they are timed apart:

* the **device** answers BUSY, or NACKs again and again (spec 5.15.6.1): one
  :class:`Backoff` per device, doubling with each wait and reset by any success,
  like Linux's ``retry_timer`` (virtio_mem.c: ``virtio_mem_retry``);
* the **kernel** refuses one memory block's offline or one subblock's pages
  (EBUSY, EIO, a migration deadline). That is a fact about that block, not about
  the device: :class:`Refusals` keeps one window per block. It starts at the
  larger of the device backoff's first delay and a multiple of what the refused
  attempt cost, and doubles with each refusal of that block in a row. A success
  elsewhere does not shorten it.

Why the second kind is not the first: under memory pressure a refused offline
costs its whole migration deadline (seconds). With one shared, success-reset
backoff its window was 50 ms, so by the time the next candidate had been refused
the first was eligible again, and the loop went round the same pinned blocks
while the blocks it had already offlined waited for their UNPLUG.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

__all__ = ["DEFAULT_BACKOFF", "DEFAULT_REFUSAL_BACKOFF", "Backoff", "BackoffPolicy", "Refusals"]

#: A refused attempt's key is left alone for at least this many times what the
#: attempt cost: the others get their turn before it comes round again.
COST_FACTOR = 2.0


@dataclasses.dataclass(frozen=True)
class BackoffPolicy:
    """Bounded exponential backoff (Linux uses 50 s doubling to 300 s; we retry sooner)."""

    initial: float = 0.05
    maximum: float = 30.0
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """The delay after the ``attempt``-th (1-based) failure in a row."""
        return min(self.initial * self.factor ** (attempt - 1), self.maximum)


DEFAULT_BACKOFF = BackoffPolicy()
#: The kernel's refusals: a refused block or subblock is not tried again before a
#: pass over every other candidate is done (Linux tries each once per pass, then
#: waits for its retry timer), about 3 s for 256 pinned subblocks under TCG.
DEFAULT_REFUSAL_BACKOFF = BackoffPolicy(initial=5.0, maximum=30.0, factor=2.0)


class Backoff:
    """The current delay of one retry sequence; reset by any success."""

    def __init__(self, policy: BackoffPolicy) -> None:
        self.policy = policy
        self.delay = 0.0

    def next_delay(self) -> float:
        base = self.delay * self.policy.factor if self.delay else self.policy.initial
        self.delay = min(base, self.policy.maximum)
        return self.delay

    def reset(self) -> None:
        self.delay = 0.0


class Refusals:
    """Keys (memory blocks, or subblocks) the kernel refused, each until when.

    ``until`` holds the keys still to be left alone; ``in_a_row`` how many times
    each key was refused since it last succeeded (it outlives the window, so the
    next refusal waits twice as long). Both are cleared by a config change: the
    host asked for something else, so everything is worth another try.
    """

    def __init__(self, policy: BackoffPolicy) -> None:
        self.policy = policy
        self.until: dict[int, float] = {}
        self.in_a_row: dict[int, int] = {}

    def __contains__(self, key: int) -> bool:
        return key in self.until

    def __bool__(self) -> bool:
        return bool(self.until)

    def keys(self) -> frozenset[int]:
        return frozenset(self.until)

    def earliest(self) -> float | None:
        """When the first key becomes eligible again (None when none is avoided)."""
        return min(self.until.values(), default=None)

    def refuse(self, keys: Iterable[int], now: float, cost: float) -> float:
        """Record one refusal of ``keys`` (one attempt that took ``cost`` seconds);
        return until when they are avoided."""
        keys = list(keys)
        attempt = 1 + max((self.in_a_row.get(key, 0) for key in keys), default=0)
        first = max(self.policy.initial, COST_FACTOR * cost)
        # Doubling a costly first window may pass the policy's maximum: it is capped
        # there, but never below the first window itself.
        window = min(first * self.policy.factor ** (attempt - 1), max(self.policy.maximum, first))
        until = now + window
        for key in keys:
            self.in_a_row[key] = attempt
            self.until[key] = until
        return until

    def succeeded(self, keys: Iterable[int]) -> None:
        """The kernel did what was asked for ``keys``: forget their refusals."""
        for key in keys:
            self.in_a_row.pop(key, None)
            self.until.pop(key, None)

    def lift(self, keys: Iterable[int] | None = None) -> list[int]:
        """End the windows of ``keys`` (every window: None) before their time, because
        their cause is gone (relief.py); the counts stay, as at :meth:`expire`. The
        keys whose window was open."""
        ended = sorted(self.until if keys is None else (k for k in keys if k in self.until))
        for key in ended:
            del self.until[key]
        return ended

    def expire(self, now: float) -> None:
        """Drop the windows that have passed (their counts stay)."""
        if self.until:
            self.until = {key: t for key, t in self.until.items() if t > now}

    def clear(self) -> None:
        self.until.clear()
        self.in_a_row.clear()
