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
library needed, nothing to clean up after a SIGKILL). Where logind does not run
(the test VM has no systemd) ``systemd-inhibit`` fails at once and the agent
says so, once, and carries on.
"""

from __future__ import annotations

import logging
import selectors
import subprocess
from collections.abc import Callable, Sequence
from typing import IO, Protocol

log = logging.getLogger("vmem_guest.inhibit")

#: How long ``systemd-inhibit`` may take to say the lock is held (a D-Bus round trip).
TAKE_TIMEOUT = 5.0
#: What the child prints once systemd-inhibit holds the lock and ran it.
_HELD = b"held\n"


class Lock(Protocol):
    """A held inhibitor lock."""

    def release(self) -> None: ...


#: Take a ``sleep`` block lock with this reason: the lock, or why it cannot be had.
Take = Callable[[str], "Lock | str"]


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


def _first_line(stream: IO[bytes], timeout: float) -> bytes:
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            return b""
    return stream.readline()


def systemd_inhibit(
    why: str, *, program: Sequence[str] = ("systemd-inhibit",), timeout: float = TAKE_TIMEOUT
) -> Lock | str:
    """Hold logind's ``sleep`` inhibitor in block mode, or say why not (logind absent,
    no system bus, systemd-inhibit not installed, refused)."""
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
    assert proc.stdout is not None and proc.stderr is not None
    if _first_line(proc.stdout, timeout) == _HELD:
        return ChildLock(proc)
    try:
        proc.wait(1.0)  # it failed: stdout is at its end, the exit follows
    except subprocess.TimeoutExpired:
        ChildLock(proc).release()
        return f"{argv[0]} did not take the lock within {timeout:g} s"
    lines = proc.stderr.read().decode(errors="replace").strip().splitlines()
    ChildLock(proc).release()
    return f"{argv[0]} exited {proc.returncode}: {lines[-1] if lines else 'no reason given'}"


class SuspendGuard:
    """Holds the inhibitor while some device would lose plugged memory in a suspend.

    :meth:`update` is called with the devices at risk (no PERSISTENT_SUSPEND,
    something plugged) after every turn of the agent's loop; it takes or releases
    the lock on a change and logs each decision once.
    """

    def __init__(self, take: Take = systemd_inhibit) -> None:
        self.take = take
        self.lock: Lock | None = None
        #: Why the lock could not be had (the last attempt), None if it could.
        self.unavailable: str | None = None
        self._at_risk: tuple[str, ...] | None = None  # None: never updated
        self._warned = False

    @property
    def description(self) -> str:
        """One phrase for users (the control socket's ping answer)."""
        if self.lock is not None:
            return "suspend blocked: logind sleep inhibitor held"
        if self._at_risk and self.unavailable is not None:
            return f"suspend NOT blocked ({self.unavailable}); root can still suspend"
        return "suspend allowed: nothing plugged would be lost"

    def update(self, at_risk: Sequence[str]) -> None:
        """``at_risk``: the devices (bdfs) without PERSISTENT_SUSPEND holding plugged memory."""
        current = tuple(at_risk)
        if current == self._at_risk:
            return
        first, self._at_risk = self._at_risk is None, current
        if current and self.lock is None:
            self._acquire(current)
        elif not current and self.lock is not None:
            self.lock.release()
            self.lock = None
            log.info(
                "suspend allowed again: inhibitor released (nothing plugged on a device"
                " without PERSISTENT_SUSPEND)"
            )
        elif not current and first:
            log.info("suspend allowed: no device without PERSISTENT_SUSPEND holds plugged memory")

    def _acquire(self, at_risk: tuple[str, ...]) -> None:
        names = ", ".join(at_risk)
        got = self.take(
            f"virtio-mem memory plugged on {names} would be lost in a suspend"
            " (no PERSISTENT_SUSPEND)"
        )
        if isinstance(got, str):
            self.unavailable = got
            if not self._warned:
                self._warned = True
                log.warning(
                    "logind not running (%s): cannot block suspend; root can still suspend"
                    " (echo mem > /sys/power/state), and %s would lose its plugged memory",
                    got,
                    names,
                )
            return
        self.lock, self.unavailable = got, None
        log.info(
            "suspend blocked: logind sleep inhibitor held (block mode) while %s hold(s)"
            " plugged memory without PERSISTENT_SUSPEND; a root write to /sys/power/state"
            " still bypasses it",
            names,
        )

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
