"""Exceptions of the VM harness. Every one that concerns a running VM carries the tail
of its serial console so a test failure shows what the guest kernel said."""

from __future__ import annotations


class HarnessError(Exception):
    """Root of the harness's exceptions."""


class HostUnavailable(HarnessError):
    """The host cannot run the test VM (no QEMU and no way to install it, or no kernel).

    tests/vm/conftest.py skips the pair's tests and fails the session, with this
    message as its one-line reason.
    """


class VMError(HarnessError):
    """Something went wrong with a running VM; ``console_tail`` is appended to the message."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        self.message = message
        self.console_tail = console_tail
        super().__init__(self._format())

    def _format(self) -> str:
        if not self.console_tail:
            return self.message
        return f"{self.message}\n--- guest console (tail) ---\n{self.console_tail}\n---"


class VMTimeout(VMError):
    """A wait on the VM (boot, command, predicate) ran out of time."""


class GuestCommandError(VMError):
    """A guest command failed (non-zero exit status or timeout)."""

    def __init__(self, cmd: str, rc: int, out: str, console_tail: str = "") -> None:
        self.cmd = cmd
        self.rc = rc
        self.out = out
        super().__init__(
            f"guest command failed (rc={rc}): {cmd}\n--- output ---\n{out}", console_tail
        )
