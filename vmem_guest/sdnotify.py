"""sd_notify(3) without libsystemd: a datagram to the service manager's socket.

A service of ``Type=notify`` tells systemd that it is ready (``READY=1``), what it
is doing (``STATUS=...``, shown by ``systemctl status``) and that it is stopping
(``STOPPING=1``) by sending newline-separated ``KEY=VALUE`` assignments in one
datagram to the ``AF_UNIX`` ``SOCK_DGRAM`` socket named by ``$NOTIFY_SOCKET``
(sd_notify(3), "NOTES"; systemd's docs/NOTIFY.md). A name starting with ``@`` is
in the abstract namespace (the ``@`` stands for the leading NUL byte); one starting
with ``/`` is a path. Anything else (``vsock:``, systemd >= 253) is not handled:
the notifier stays silent, as sd_notify does when the variable is unset.

The variable is taken out of the environment when it is read, as
``sd_notify(unset_environment=1)`` does, so children (``systemd-inhibit``,
``modprobe``) do not send on the agent's behalf: with ``NotifyAccess=main`` their
messages would be dropped with a warning in the journal anyway.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

from vmem_guest._linux.lifetime import Closing

log = logging.getLogger("vmem_guest.sdnotify")

#: The environment variable the service manager sets for a ``Type=notify`` service.
NOTIFY_SOCKET = "NOTIFY_SOCKET"


def socket_address(name: str) -> bytes | None:
    """The ``sockaddr_un`` path for ``$NOTIFY_SOCKET``; None for a kind not handled."""
    if name.startswith("@") and len(name) > 1:
        return b"\0" + os.fsencode(name[1:])
    if name.startswith("/"):
        return os.fsencode(name)
    return None


class Notifier(Closing):
    """Sends state to the service manager; every method is a no-op without one."""

    def __init__(self, address: bytes | None) -> None:
        """``address``: the socket's ``sockaddr_un`` path (:func:`socket_address`),
        None for no service manager."""
        self.address = address
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> Notifier:
        """The notifier ``$NOTIFY_SOCKET`` names, the variable removed from ``environ``
        (``os.environ`` by default) so children do not inherit it."""
        env = os.environ if environ is None else environ
        name = env.pop(NOTIFY_SOCKET, "")
        address = socket_address(name) if name else None
        if name and address is None:
            log.debug("%s=%r is not a path or an abstract name: not notifying", NOTIFY_SOCKET, name)
        return cls(address)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments in one datagram; True when it was sent.

        Never blocks (MSG_DONTWAIT): a manager that does not read (its queue full,
        EAGAIN) must not stop the agent's loop. A failure is logged (a warning the
        first time) and otherwise ignored, as sd_notify's callers do: the service
        works on, and systemd, if it waits for READY=1, says so itself when its
        start timeout expires.
        """
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "cannot notify the service manager: %s", exc.strerror or exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={one_line(status)}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={one_line(status)}")

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", f"STATUS={one_line(status)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def one_line(text: str) -> str:
    """``text`` with newlines turned into spaces: a newline would end the assignment."""
    return " ".join(text.splitlines())
