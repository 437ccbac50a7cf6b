"""Host side of the guest command channel: JSON lines over QEMU's unix-socket chardev,
which is wired to the virtio-serial port the guest runner serves (see guest_runner.py)."""

from __future__ import annotations

import json
import select
import socket
import time
from pathlib import Path
from typing import Any

from .errors import HarnessError


class ChannelTimeout(HarnessError):
    """No answer from the guest runner in time."""


class GuestChannel:
    """One connection to the guest runner; requests carry ids so stale answers (from
    before a reboot, or after a timeout) are ignored."""

    def __init__(self, sock_path: Path, connect_timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + connect_timeout
        while True:
            try:
                self._sock.connect(str(sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    self._sock.close()
                    raise
                time.sleep(0.05)
        self._buf = b""
        self._next_id = 1

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()

    def request(self, req: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send req and wait up to timeout seconds for the answer with the same id."""
        rid = self._next_id
        self._next_id += 1
        self._sock.sendall(json.dumps({**req, "id": rid}).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                try:
                    reply: dict[str, Any] = json.loads(line)
                except ValueError:
                    continue
                if reply.get("id") == rid:
                    return reply
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChannelTimeout(f"no answer from the guest runner in {timeout:.0f} s")
            ready, _, _ = select.select([self._sock], [], [], min(left, 0.5))
            if ready:
                chunk = self._sock.recv(1 << 20)
                if not chunk:
                    raise HarnessError("guest command channel closed (QEMU exited?)")
                self._buf += chunk
