"""The agent's status as it changes, from the host: ``vmem-guest status --follow --json``.

One ``status --follow`` process is started in the guest, once; it prints a JSON line
each time a tracker or the guest's MemTotal changes, into a file in /run. The host
reads what was added to that file since its last look through the guest runner's
``read`` (no process is started per look), so a look costs one channel round trip
instead of a ``vmem-guest status`` start (interpreter and imports: seconds under TCG).

A line is the document ``status --json`` prints: a bare list of devices, each with the
guest's figures (``guest_mem_total``, ``guest_hardware_corrupted``), or an object with
``devices`` and the figures under ``guest`` (``mem_total``, ``hardware_corrupted``);
:func:`parse_status` reads both.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from .errors import GuestCommandError, HarnessError
from .guest_agent import VMEM_GUEST
from .vm import TestVM

STREAM_FILE = "/run/vmem-status.jsonl"
STREAM_ERR = "/run/vmem-status.err"
STREAM_PID = "/run/vmem-status.pid"
#: Seconds between two looks at the trackers in the guest (``status --interval``).
FOLLOW_INTERVAL = 0.2
#: A stream silent this long is checked for being alive (it is silent while nothing
#: changes, so silence alone says nothing).
LIVENESS_SECONDS = 2.0


@dataclasses.dataclass(frozen=True)
class GuestStatus:
    """One ``status --json`` document: the devices by PCI address, and the guest's
    MemTotal and HardwareCorrupted (bytes; 0 when unreadable) at the same look."""

    devices: dict[str, dict[str, Any]]
    mem_total: int
    hardware_corrupted: int


def parse_status(document: Any) -> GuestStatus:
    """A ``status --json`` document of either shape (see the module's docstring);
    ValueError for anything else."""
    devices = document.get("devices") if isinstance(document, dict) else document
    if not isinstance(devices, list):
        raise ValueError(f"not a vmem-guest status document: {str(document)[:200]}")
    if isinstance(document, dict):
        guest = document.get("guest") or {}
        figures = (guest.get("mem_total"), guest.get("hardware_corrupted"))
    else:
        first = devices[0] if devices else {}
        figures = (first.get("guest_mem_total"), first.get("guest_hardware_corrupted"))
    return GuestStatus(
        devices={dev["device"]: dev for dev in devices},
        mem_total=int(figures[0] or 0),
        hardware_corrupted=int(figures[1] or 0),
    )


def bdfs_by_device_id(vm: TestVM, status: GuestStatus) -> dict[str, str]:
    """QEMU device id -> guest PCI address, matched by region address."""
    regions = {int(info["memaddr"]): dev_id for dev_id, info in vm.query().items()}
    return {regions[dev["addr"]]: bdf for bdf, dev in status.devices.items()}


class StatusStream:
    """``vmem-guest status --follow --json`` running in the guest, followed from here.

    :meth:`poll` returns the latest status, ``received`` says when its line arrived on
    this side (``time.perf_counter()``).
    """

    def __init__(self, vm: TestVM, interval: float = FOLLOW_INTERVAL) -> None:
        self.vm = vm
        self.interval = interval
        self.latest: GuestStatus | None = None
        self.received = 0.0  #: perf_counter() when the latest line was read
        self.lines = 0
        self._offset = 0
        self._partial = ""
        self._checked = time.perf_counter()  #: when the follower was last seen alive

    def start(self, timeout: float = 120.0) -> GuestStatus:
        """Start the follower; wait for its first line (the status at its start)."""
        self.vm.sh(
            f"setsid {VMEM_GUEST} status --follow --json --interval {self.interval}"
            f" >{STREAM_FILE} 2>{STREAM_ERR} </dev/null & echo $! >{STREAM_PID}"
        )
        first = self.vm.wait_until(self.poll, timeout, 0.1, "status --follow")
        assert first is not None  # wait_until returns a truthy value
        return first

    def poll(self) -> GuestStatus | None:
        """Read the lines added since the last poll; the latest status, or None before
        the first line. HarnessError when the follower has died."""
        text, size = self.vm.read_from(STREAM_FILE, self._offset)
        self._offset += size
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        now = time.perf_counter()
        for line in filter(None, lines):
            self.latest = parse_status(json.loads(line))
            self.received = now
            self.lines += 1
        if not lines and now - max(self.received, self._checked) > LIVENESS_SECONDS:
            self._checked = now
            self._check_alive()
        return self.latest

    def _check_alive(self) -> None:
        """HarnessError, with what it printed on stderr, unless the follower runs (its
        /proc stat read by the runner: no process started; a zombie has state Z)."""
        pid = self.vm.read(STREAM_PID).strip()
        try:
            stat = self.vm.read(f"/proc/{pid}/stat")
        except GuestCommandError:
            stat = ""
        if stat.rpartition(")")[2].split()[:1] in ([], ["Z"]):
            err = self.vm.read(STREAM_ERR).strip()
            raise HarnessError(f"vmem-guest status --follow ended: {err or 'no message'}")

    def stop(self) -> None:
        """End the follower (SIGTERM)."""
        self.vm.guest(f"kill $(cat {STREAM_PID})")
