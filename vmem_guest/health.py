"""Is a device broken, has it converged: the verdicts of ``vmem-guest status``.

Read from a tracker snapshot alone, so ``status``, its JSON and the Prometheus
metrics (of ``status`` and of the agent) say the same thing. The exit status of
``vmem-guest status`` is the worst verdict over the devices
(docs/operations.md, "Exit status").
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from vmem_guest.tracker import TrackerSnapshot
from vmem_guest.units import format_size


class StatusExit(enum.IntEnum):
    """Exit status of ``vmem-guest status``."""

    OK = 0  # every device converged (or no device tracked)
    ERROR = 1  # status itself failed: a tracker unreadable, untrusted, corrupt
    USAGE = 2  # what was typed is wrong
    BROKEN = 3  # a device is marked broken: the agent no longer touches it
    NOT_CONVERGED = 4  # a device does not hold what the host requested (yet, or at all)


def not_converged(snap: TrackerSnapshot) -> list[str]:
    """Why ``snap``'s device does not hold exactly what the host requested, all of it in
    use by the guest; empty when it does. A broken device is judged the same way (its
    flag is :func:`exit_status`'s business)."""
    reasons = []
    if snap.plugged_bytes != snap.requested_size:
        reasons.append(
            f"plugged {format_size(snap.plugged_bytes)} of requested"
            f" {format_size(snap.requested_size)}"
            + (f" (remainder {format_size(snap.remainder_bytes)})" if snap.remainder_bytes else "")
        )
    if snap.intent is not None:
        reasons.append(f"{snap.intent.op.name} in flight")
    in_use = snap.online_bytes - snap.hole_bytes
    if snap.plugged_bytes > in_use:
        reasons.append(f"{format_size(snap.plugged_bytes - in_use)} plugged, not online")
    if being_taken(snap):
        reasons.append("subblocks being taken out of use or given back")
    return reasons


def being_taken(snap: TrackerSnapshot) -> bool:
    """Some subblock is taken out of use but still plugged (a take or give-back half done)."""
    taken = int.from_bytes(snap.taken, "little")
    return bool(taken & int.from_bytes(snap.bitmap, "little"))


def converged(snap: TrackerSnapshot) -> bool:
    return not snap.broken and not not_converged(snap)


def verdict(snap: TrackerSnapshot) -> StatusExit:
    """BROKEN, NOT_CONVERGED or OK for one device."""
    if snap.broken:
        return StatusExit.BROKEN
    return StatusExit.NOT_CONVERGED if not_converged(snap) else StatusExit.OK


def exit_status(snaps: Iterable[TrackerSnapshot]) -> StatusExit:
    """BROKEN if any device is, else NOT_CONVERGED if any device is, else OK: a
    broken device needs a person, one still converging may only need time."""
    verdicts = {verdict(snap) for snap in snaps}
    for worst in (StatusExit.BROKEN, StatusExit.NOT_CONVERGED):
        if worst in verdicts:
            return worst
    return StatusExit.OK
