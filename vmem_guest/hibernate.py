"""Hibernation: every device's memory given back before it, grown again after it.

A hibernation image holds the guest's RAM, but the devices come back from the
power-off empty: QEMU starts again with nothing plugged, so memory plugged and
online at hibernation time would be restored into unplugged device memory. The
in-kernel driver therefore refuses hibernation outright (Linux 6.12,
``virtio_mem_pm_notifier_cb``: NOTIFY_BAD on PM_HIBERNATION_PREPARE and
PM_RESTORE_PREPARE; 6.1 refuses every freeze). The agent can do better: before
the hibernation it offlines every online block of every device and sends
UNPLUG_ALL (:meth:`DeviceDriver.unplug_everything`: all or nothing per device),
then holds every device empty until the guest resumes, and grows again to
``requested_size`` after it. With every device block offline the image holds no
page of device memory (the kernel saves only online pages: ``saveable_page`` ->
``pfn_to_online_page``), and the restoring kernel, which has no device memory,
counts as many pages as the image (``check_image_kernel``, "Image mismatch:
memory size" otherwise).

The request comes from ``vmem-guest hibernate-prepare``, run by
``vmem-guest-hibernate@hibernate.service`` before systemd's
``systemd-hibernate.service`` (and ``@hybrid-sleep`` before
``systemd-hybrid-sleep.service``), which requires it: when the memory cannot be
given back within the time allowed, the command fails and systemd does not start
the hibernation. ``@suspend-then-hibernate`` always fails (:func:`prepare`).
See docs/lifecycle.md "Hibernation".
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from vmem_guest import control
from vmem_guest.device import InterruptingChannel
from vmem_guest.driver import DeviceDriver
from vmem_guest.errors import HibernationRefused, VmemError
from vmem_guest.units import format_size

log = logging.getLogger("vmem_guest.hibernate")

#: How long the devices stay empty waiting for the hibernation that asked for it; a
#: hibernation that fails after the memory was given back (systemd-sleep, the kernel)
#: leaves the agent growing again after this long.
HOLD_SECONDS = 300.0
#: How long ``hibernate-prepare`` lets the agent take by default (below the unit's
#: TimeoutStartSec, so the command says why before systemd kills it).
DEFAULT_SECONDS = 60.0
#: What the command adds to the agent's time before it gives up on the answer.
ANSWER_SLACK = 5.0


class Hold:
    """Devices held empty for a hibernation, until it resumes or :data:`HOLD_SECONDS` pass."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.until: float | None = None

    def start(self, seconds: float = HOLD_SECONDS) -> None:
        self.until = self.clock() + seconds

    def seconds_left(self) -> float | None:
        """Until the hold ends by itself; None when there is none (it ends here when due)."""
        if self.until is None:
            return None
        left = self.until - self.clock()
        if left > 0:
            return left
        self.until = None
        log.warning(
            "no hibernation came within %.0f s of giving the memory back: following"
            " requested_size again",
            HOLD_SECONDS,
        )
        return None

    def end(self, why: str) -> None:
        """The hibernation is over (the guest resumed) or was refused: grow again."""
        if self.until is not None:
            self.until = None
            log.info("hibernation hold ended (%s): following requested_size again", why)


def give_back_all(
    drivers: Mapping[str, DeviceDriver],
    *,
    broken: Mapping[str, str],
    seconds: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Offline and UNPLUG_ALL every device of ``drivers`` within ``seconds``; the answer
    says what each held. HibernationRefused when one cannot be emptied (the kernel
    refused an offline, the device said no, a broken device holds memory, or time ran
    out): devices emptied before then stay empty until the caller lets them grow."""
    started = clock()
    _refuse_what_cannot_be_emptied(drivers, broken)
    given: dict[str, int] = {}
    for bdf, driver in drivers.items():
        spent = clock() - started
        if spent > seconds:
            raise HibernationRefused(
                f"giving memory back took over {seconds:g} s ({spent:.1f} s); {bdf} still"
                " holds its memory",
                device=bdf,
                seconds=round(spent, 3),
            )
        given[bdf] = driver.tracker.state.plugged_bytes
        try:
            driver.unplug_everything(sleep)
        except VmemError as exc:
            raise HibernationRefused(
                f"{bdf}: {exc.message}", device=bdf, cause=type(exc).__name__
            ) from exc
    spent = clock() - started
    log.warning(
        "memory given back for hibernation: %s in %.1f s; the devices stay empty until the resume",
        ", ".join(f"{bdf} {format_size(size)}" for bdf, size in given.items()) or "no device",
        spent,
    )
    return {"given_back": given, "seconds": round(spent, 3)}


def leave_secret_memory(channels: Mapping[str, InterruptingChannel]) -> list[str]:
    """Move every ring out of memfd_secret memory (Linux offers no hibernation while
    any exists: ``hibernation_available`` in kernel/power/hibernate.c); the devices
    whose ring moved. HibernationRefused when one cannot be moved."""
    moved = []
    for bdf, channel in channels.items():
        try:
            if channel.leave_secret_memory():
                moved.append(bdf)
        except VmemError as exc:
            raise HibernationRefused(
                f"{bdf}: cannot move the ring out of memfd_secret memory: {exc.message}",
                device=bdf,
            ) from exc
    return moved


def _refuse_what_cannot_be_emptied(
    drivers: Mapping[str, DeviceDriver], broken: Mapping[str, str]
) -> None:
    """Before any device is touched: a broken device holding memory cannot be emptied
    (the agent no longer talks to it), nor can an online block with subblocks taken
    out of use (poisoned pages): offlining it would lose it for good (from Linux 6.2 a
    block offlined with poisoned pages is never onlined again; docs/safety.md), and
    left online it would be resumed over unplugged memory."""
    for bdf, reason in broken.items():
        raise HibernationRefused(
            f"device {bdf} is broken ({reason}); its memory cannot be given back", device=bdf
        )
    for bdf, driver in drivers.items():
        taken = driver.tracker.state.taken_subblocks
        if taken:
            raise HibernationRefused(
                f"{bdf}: {taken} subblocks of online blocks are taken out of use (holes);"
                " those blocks can be neither offlined nor kept online across a hibernation:"
                " grow the device to fill them first",
                device=bdf,
                taken_subblocks=taken,
            )


def prepare(verb: str, state_dir: Path, seconds: float = DEFAULT_SECONDS) -> dict[str, Any]:
    """``vmem-guest hibernate-prepare --sleep VERB``: :func:`ask_agent` for ``hibernate``
    and ``hybrid-sleep`` (the image is written, then the guest powers off or suspends;
    either way nothing runs before the resume). ``suspend-then-hibernate`` is refused:
    systemd-sleep suspends, thaws every process when the suspend ends, then writes
    the image with no unit started in between, so the agent, seeing a resume, would
    grow again just before the hibernation (docs/lifecycle.md "Hibernation")."""
    if verb == "suspend-then-hibernate":
        raise HibernationRefused(
            "suspend-then-hibernate is refused: the agent would grow again between the"
            " suspend and the hibernation; use hibernate",
            sleep=verb,
        )
    return ask_agent(state_dir, seconds)


def ask_agent(state_dir: Path, seconds: float = DEFAULT_SECONDS) -> dict[str, Any]:
    """``vmem-guest hibernate-prepare``: ask the running agent to give every device's
    memory back within ``seconds``. HibernationRefused (or the agent's own refusal)
    when it cannot: no agent runs (an agent stopped with memory plugged leaves it
    plugged, and only an agent can give it back), or it does not answer in time."""
    path = control.socket_path(state_dir)
    waited = seconds + ANSWER_SLACK
    try:
        answer = control.call(path, control.Hibernate(seconds), timeout=waited)
    except TimeoutError:
        raise HibernationRefused(
            f"the agent did not answer within {waited:g} s", seconds=waited
        ) from None
    if answer is None:
        raise HibernationRefused(
            f"no agent runs (nothing listens at {path}) to give device memory back:"
            " start vmem-guest.service, or empty each device with vmem-guest unplug-all",
            path=str(path),
        )
    return answer
