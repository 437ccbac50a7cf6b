#!/usr/bin/env python3
"""The guest half of ``make migrate`` (``scripts/migrate.py``): chaos's raw checks, with
the agent alive.

After a live migration the agent keeps running and owns every device, so
``chaos_guest.py dead`` (which opens the device itself) cannot run. This runs the same
:class:`chaos_guest.DeadCheck` per tracked device, with its STATE requests sent through
the agent's control socket (STATE changes nothing) and the device's sizes as its
tracker holds them: every plugged subblock found by STATE over the usable region (MIXED
ranges bisected); every page of every online memory block plugged or HWPOISON; the
tracker's plug bitmap equal to the device's; taken bits only under online blocks,
every hole held taken, no poisoned page in a subblock in use. On top of what a kill
allows, a converged agent must have no intent, no block plugged but not online, no
subblock taken but plugged and the tracker equal to sysfs on every memory block.

Run with the checkout's ``.venv`` python and ``-S``, like chaos_guest.py, after the
agent has converged; prints one JSON line ``{"devices": [...]}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import chaos_guest


class AgentDevice:
    """What :class:`chaos_guest.DeadCheck` asks of a device, answered by the agent: the
    config as its tracker holds it, STATE through its control socket."""

    def __init__(self, snap: Any, socket: Path) -> None:
        self.snap, self.socket = snap, socket

    def config(self) -> SimpleNamespace:
        """The device's config as the tracker holds it. ``plugged_size`` is the
        tracker's plugged bytes: its copy of the device's field is the value of the
        agent's last config read, which no UNPLUG refreshes (driver.py ``_publish``);
        the device's own size is QEMU's, which the host compares with the tracker."""
        snap, geo = self.snap, self.snap.identity.geometry
        return SimpleNamespace(
            addr=geo.addr,
            region_size=geo.region_size,
            block_size=geo.block_size,
            plugged_size=snap.plugged_bytes,
            requested_size=snap.requested_size,
            usable_region_size=snap.usable_region_size,
        )

    def state(self, addr: int, count: int) -> SimpleNamespace:
        """STATE of ``count`` blocks from ``addr``; not acked when the agent refused."""
        from vmem_guest import control
        from vmem_guest.errors import VmemError
        from vmem_guest.spec import BlockState

        request = control.QueryState(self.snap.identity.name, addr, count)
        try:
            answer = (control.call(self.socket, request, timeout=60) or {}).get("state")
        except VmemError:
            answer = None
        acked = answer in BlockState.__members__
        return SimpleNamespace(acked=acked, state=BlockState[answer] if acked else None)


def running_check() -> dict[str, Any]:
    """Every tracked device of the running, converged agent."""
    chaos_guest._import_checkout()
    from vmem_guest import control
    from vmem_guest.tracker import DEFAULT_STATE_DIR, TrackerReader, list_trackers

    socket = control.socket_path(DEFAULT_STATE_DIR)
    report = []
    for path in list_trackers(DEFAULT_STATE_DIR):
        with TrackerReader.open(path) as reader:
            snap = reader.snapshot()
        name = snap.identity.name
        result = chaos_guest.DeadCheck(name, AgentDevice(snap, socket), snap).run()
        result["violations"] += converged_violations(result)
        report.append(result)
    return {"devices": report}


def converged_violations(result: dict[str, Any]) -> list[str]:
    """What a kill may leave behind but a converged agent may not."""
    found = []
    if result["intent"] is not None:
        found.append(f"intent {result['intent']['op']} pending")
    if result["tracker_device_diff"]:
        found.append(f"tracker and device disagree on {result['tracker_device_diff']} subblocks")
    if result["tracker_sysfs_diff"]:
        found.append(f"tracker and sysfs disagree on memory blocks {result['tracker_sysfs_diff']}")
    if result["plugged_not_online_blocks"]:
        found.append(f"{result['plugged_not_online_blocks']} memory blocks plugged, not online")
    if result["taking"]:
        found.append(f"{len(result['taking'])} subblocks taken but plugged")
    if not result["tracker"]:
        found.append("no tracker file")
    return found


def main() -> int:
    if sys.argv[1:] != ["running"]:
        print(f"usage: {sys.argv[0]} running", file=sys.stderr)
        return 2
    print(json.dumps(running_check()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
