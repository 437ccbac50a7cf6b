"""How long a device took to follow the host: one record per converged resize.

The agent (``agent.py``) tells a device's :class:`ResizeTimer` when a config change
arrives (:meth:`ResizeTimer.config_changed`), when it takes a step
(:meth:`ResizeTimer.stepping`, :meth:`ResizeTimer.stepped`) and when the driver
core says it has converged (:meth:`ResizeTimer.converged`). The last converged
resize stays in :attr:`ResizeTimer.last` (a :class:`Resize`) for whoever reports
on the agent, and is logged once at info.

A resize runs from the first config change after the previous convergence (or,
without one, from the first step after the agent took the device up or after a
resume) to the next convergence: a host that changes ``requested_size`` again
mid-way extends the same resize. A convergence with neither a config change nor a
request in between (a device already where the host wants it, at start) is not a
resize and is not logged.
"""

from __future__ import annotations

import dataclasses
import logging

from vmem_guest.planner import Done
from vmem_guest.units import format_size

log = logging.getLogger("vmem_guest.resizes")


@dataclasses.dataclass(frozen=True)
class Resize:
    """One converged resize of one device."""

    device: str
    requested_bytes: int  # the target: requested_size at convergence
    plugged_bytes: int  # what the guest holds plugged then
    remainder_bytes: int  # what the guest could not reach (the planner's Done)
    seconds: float  # from the config change that started it to convergence
    config_change: bool  # False: started by the agent's start or a resume


@dataclasses.dataclass
class ResizeTimer:
    """The resize in progress on one device, if any, and the last one converged."""

    device: str
    since: float | None = None  # when the resize in progress began
    config_change: bool = False  # ... and whether a config change began it
    steps: int = 0  # steps that changed something since then
    last: Resize | None = None

    def config_changed(self, now: float) -> None:
        """A config-change interrupt: a resize begins unless one begun by a config
        change is in progress (one begun by the start or a resume is timed anew)."""
        if not self.config_change:
            self.since = now
            self.config_change = True

    def stepping(self, now: float) -> None:
        """A step is about to be taken: the clock starts if nothing started it."""
        if self.since is None:
            self.since = now

    def stepped(self) -> None:
        """The step changed something (plug, unplug, online, offline, take, give back)."""
        self.steps += 1

    def converged(self, now: float, done: Done) -> Resize | None:
        """The driver core has nothing left to do (``done``, not blocked): the resize
        that ends here (logged), or None when nothing was resized.

        The planner's Done says it all: ``target_bytes`` is what the guest keeps
        plugged, and holds plugged once the planner is done (planner.next_step:
        not blocked means every kept block plugged and online); ``remainder_bytes``
        is what it cannot reach of ``requested_size`` (their sum).
        """
        since, changed, steps = self.since, self.config_change, self.steps
        self.abandon()
        if since is None or not (changed or steps):
            return None
        requested = done.target_bytes + done.remainder_bytes
        finished = Resize(
            self.device, requested, done.target_bytes, done.remainder_bytes, now - since, changed
        )
        self.last = finished
        log.info(
            "%s: resize done: requested %s, plugged %s, remainder %s, %.3f s after %s",
            self.device,
            format_size(requested),
            format_size(done.target_bytes),
            format_size(done.remainder_bytes),
            finished.seconds,
            "the config change" if changed else "the agent took the device up (start, resume)",
        )
        return finished

    def abandon(self) -> None:
        """No resize in progress any more (converged, or the device broke)."""
        self.since = None
        self.config_change = False
        self.steps = 0
