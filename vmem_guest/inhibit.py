"""Suspend protection: a systemd-logind ``sleep`` inhibitor while a suspend would lose memory.

Without VIRTIO_MEM_F_PERSISTENT_SUSPEND the driver must not let the guest
suspend (spec, device-types/mem, driver requirements): QEMU 7.2 unplugs every
block at S3 wake-up, under memory the guest is using. Linux's in-kernel driver
refuses the suspend from a PM notifier (``virtio_mem_pm_notifier_cb``, 6.12);
userspace has no such veto. What it has is logind's inhibitor locks:
``org.freedesktop.login1.Manager.Inhibit("sleep", who, why, "block")`` stops
every suspend and hibernation that goes through logind (``systemctl suspend``,
the lid switch, idle actions) for as long as the returned fd is open. Nothing
stops root writing ``mem`` to ``/sys/power/state``.

The lock is taken through ``systemd-inhibit``, which calls Inhibit and keeps
the fd open while its child runs: the child is ``cat`` reading a pipe the agent
holds, so the lock goes when the agent closes the pipe, or dies (no D-Bus
library needed, nothing to clean up after a SIGKILL). Where systemd is not PID 1
(the test VM) no child is started at all; where logind does not answer,
``systemd-inhibit`` fails at once. Either way the agent says so, once, and
carries on.

Taking the lock never holds up a plug: :func:`start_systemd_inhibit` starts the
program and returns a :class:`PendingLock` whose pipe the agent watches in its
selector with everything else; its first line (or its end) says whether the lock
is held (``make bench`` measured the synchronous wait: 0.23 s of a 0 -> 4 GiB
plug under TCG, in the middle of the plug).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

log = logging.getLogger("vmem_guest.inhibit")

#: Exists only while systemd runs as PID 1 (what ``sd_booted(3)`` checks).
SYSTEMD_RUNTIME_DIR = "/run/systemd/system"
#: How long a released ``systemd-inhibit`` child may take to exit before it is killed.
TAKE_TIMEOUT = 5.0
#: How long logind may take to answer Inhibit() before the lock is given up on
#: (D-Bus's own default reply timeout is 25 s; a logind that has not answered in this
#: long is stuck, and an unanswered lock blocks nothing).
ANSWER_TIMEOUT = 10.0
#: What the child prints once systemd-inhibit holds the lock and ran it.
_HELD = b"held\n"


class Lock(Protocol):
    """A held inhibitor lock."""

    def release(self) -> None: ...


@runtime_checkable
class Pending(Protocol):
    """A lock being taken: readable :meth:`fileno` means :meth:`finish` will not block."""

    def fileno(self) -> int: ...

    def finish(self) -> Lock | str: ...

    def cancel(self) -> None: ...


#: Take a ``sleep`` block lock with this reason: the lock, why it cannot be had, or a
#: lock being taken whose answer comes later.
Take = Callable[[str], "Lock | str | Pending"]


class ChildLock:
    """A lock held by a ``systemd-inhibit`` child for as long as its stdin stays open."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def release(self) -> None:
        """Close the pipe (``cat`` ends, systemd-inhibit closes the lock fd) and reap."""
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        try:
            self.proc.wait(TAKE_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its handle
            self.proc.wait()


class PendingLock:
    """``systemd-inhibit`` started: its first line says the lock is held, its end why not."""

    def __init__(self, proc: subprocess.Popen[bytes], name: str) -> None:
        self.proc = proc
        self.name = name

    def fileno(self) -> int:
        assert self.proc.stdout is not None
        return self.proc.stdout.fileno()

    def finish(self) -> Lock | str:
        """Once :meth:`fileno` is readable: the lock, or why it was not taken."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        if self.proc.stdout.readline() == _HELD:
            return ChildLock(self.proc)
        try:
            self.proc.wait(1.0)  # it failed: stdout is at its end, the exit follows
        except subprocess.TimeoutExpired:
            self.cancel()
            return f"{self.name} closed its output but did not exit"
        lines = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
        self.cancel()
        reason = lines[-1] if lines else "no reason given"
        return f"{self.name} exited {self.proc.returncode}: {reason}"

    def cancel(self) -> None:
        """No longer wanted (or failed): end the child and reap it."""
        ChildLock(self.proc).release()


def systemd_booted() -> bool:
    """systemd is PID 1 (``sd_booted(3)``: the directory exists only then)."""
    return os.path.isdir(SYSTEMD_RUNTIME_DIR)


def start_systemd_inhibit(
    why: str,
    *,
    program: Sequence[str] = ("systemd-inhibit",),
    booted: Callable[[], bool] = systemd_booted,
) -> PendingLock | str:
    """Start taking logind's ``sleep`` inhibitor in block mode; or say why it cannot run.
    Without systemd there is no logind to ask: nothing is started (a child per plug
    cost the plug time, measured with ``make bench`` in the test VM, which has none)."""
    if not booted():
        return f"systemd is not running ({SYSTEMD_RUNTIME_DIR} is absent)"
    argv = [
        *program,
        "--what=sleep",
        "--mode=block",
        "--who=vmem-guest",
        f"--why={why}",
        "sh",
        "-c",
        "echo held; exec cat",
    ]
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except OSError as exc:
        return f"{argv[0]} cannot run: {exc.strerror}"
    return PendingLock(proc, argv[0])


class SuspendGuard:
    """Holds the inhibitor while some device would lose plugged memory in a suspend.

    :meth:`update` is called with the devices at risk (no PERSISTENT_SUSPEND,
    something plugged) after every turn of the agent's loop; it starts taking or
    releases the lock on a change and logs each decision once. A lock being taken
    (:attr:`pending`) is finished by :meth:`on_readable` when :meth:`fileno` is
    readable in the caller's selector, or given up on by :meth:`update` once
    ``answer_timeout`` has passed without an answer (:meth:`seconds_left` says when,
    for the caller's select timeout).
    """

    def __init__(
        self,
        take: Take = start_systemd_inhibit,
        *,
        clock: Callable[[], float] = time.monotonic,
        answer_timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        self.take = take
        self.clock = clock
        self.answer_timeout = answer_timeout
        self.lock: Lock | None = None
        #: A lock being taken, whose answer has not come yet.
        self.pending: Pending | None = None
        self._answer_by = 0.0  # the clock's time the pending lock is given up at
        #: Why the lock could not be had (the last attempt), None if it could.
        self.unavailable: str | None = None
        self._at_risk: tuple[str, ...] | None = None  # None: never updated
        self._warned = False

    @property
    def description(self) -> str:
        """One phrase for users (the control socket's ping answer)."""
        if self.lock is not None:
            return "suspend blocked: logind sleep inhibitor held"
        if self.pending is not None:
            return "suspend block being taken: logind sleep inhibitor asked for"
        if self._at_risk and self.unavailable is not None:
            return f"suspend NOT blocked ({self.unavailable}); root can still suspend"
        return "suspend allowed: nothing plugged would be lost"

    def fileno(self) -> int | None:
        """The pipe of the lock being taken, for the caller's selector; None if none is."""
        return None if self.pending is None else self.pending.fileno()

    def seconds_left(self) -> float | None:
        """Until the lock being taken is given up on; None if none is being taken."""
        if self.pending is None:
            return None
        return max(0.0, self._answer_by - self.clock())

    def update(self, at_risk: Sequence[str]) -> None:
        """``at_risk``: the devices (bdfs) without PERSISTENT_SUSPEND holding plugged memory."""
        self._give_up_if_unanswered()
        current = tuple(at_risk)
        if current == self._at_risk:
            return
        first, self._at_risk = self._at_risk is None, current
        if current and self.lock is None and self.pending is None:
            self._acquire()
        elif not current and self.pending is not None:
            self.pending.cancel()
            self.pending = None
            log.info("suspend allowed: the inhibitor being taken is no longer needed")
        elif not current and self.lock is not None:
            self.lock.release()
            self.lock = None
            log.info(
                "suspend allowed again: inhibitor released (nothing plugged on a device"
                " without PERSISTENT_SUSPEND)"
            )
        elif not current and first:
            log.info("suspend allowed: no device without PERSISTENT_SUSPEND holds plugged memory")

    def on_readable(self) -> None:
        """The pending lock's pipe is readable: it is held now, or it says why not."""
        pending, self.pending = self.pending, None
        if pending is not None:
            self._settle(pending.finish())

    def _give_up_if_unanswered(self) -> None:
        """A lock logind has not answered in ``answer_timeout``: cancel it and say so
        (tried again when the devices at risk change, as after any failure)."""
        if self.pending is None or self.clock() < self._answer_by:
            return
        self.pending.cancel()
        self.pending = None
        self._settle(f"no answer to the inhibitor request in {self.answer_timeout:g} s")

    def _names(self) -> str:
        return ", ".join(self._at_risk or ())

    def _acquire(self) -> None:
        got = self.take(
            f"virtio-mem memory plugged on {self._names()} would be lost in a suspend"
            " (no PERSISTENT_SUSPEND)"
        )
        if isinstance(got, Pending):
            self.pending = got
            self._answer_by = self.clock() + self.answer_timeout
        else:
            self._settle(got)

    def _settle(self, got: Lock | str) -> None:
        if isinstance(got, str):
            self.unavailable = got
            if not self._warned:
                self._warned = True
                log.warning(
                    "no sleep inhibitor (%s): cannot block suspend; root can still suspend"
                    " (echo mem > /sys/power/state), and %s would lose its plugged memory",
                    got,
                    self._names(),
                )
            return
        self.lock, self.unavailable = got, None
        log.info(
            "suspend blocked: logind sleep inhibitor held (block mode) while %s hold(s)"
            " plugged memory without PERSISTENT_SUSPEND; a root write to /sys/power/state"
            " still bypasses it",
            self._names(),
        )

    def close(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
