#!/usr/bin/env python3
"""The guest half of ``make chaos`` (``scripts/chaos.py``): checks run as root in the VM.

``chaos.py`` runs this with the checkout's ``.venv`` python and ``-S``: under TCG
the venv's site start-up alone costs seconds per call, and nothing here needs more
than the standard library and ``vmem_guest`` from the checkout (``vmem_guest.pci``
falls back to reading sysfs without pyudev). Each mode prints one JSON line:

``dead``
    The agent is dead (SIGKILLed). With raw STATE requests and reads of sysfs,
    the tracker files and ``/proc/kpageflags`` only (nothing plugged, onlined,
    offlined, poisoned or unpoisoned), per device: every page of every online
    memory block of the region lies in a subblock STATE finds plugged, or is
    HWPOISON (invariant 1 with subblocks taken out of online blocks); the
    tracker's plug bitmap equals the device's outside the pending intent
    (invariant 3); a taken bit lies only under an online block, every hole
    (an unplugged subblock of an online block) is held taken, and no page of a
    subblock in use is poisoned; the tracker and sysfs differ in at most the
    one memory block being onlined or offlined; the device's ``plugged_size``
    is what STATE finds. It also reports what the phase of the kill is judged
    from: the pending intent, subblocks taken but still plugged and how many of
    their pages are poisoned.

``converged``
    The agent runs and has converged. From its tracker files: STATE (asked
    through the agent's control socket) over every run of subblocks in use in
    online blocks answers PLUGGED and over every run of holes UNPLUGGED; every
    page of a hole is HWPOISON and no page of a subblock in use is; no subblock
    is left taken but plugged.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
KPAGEFLAGS = "/proc/kpageflags"
#: Bit of a /proc/kpageflags entry set for a poisoned page (uapi kernel-page-flags.h).
KPF_HWPOISON = 19
#: Bytes per page frame in /proc/kpageflags: one u64 in the kernel's byte order.
KPAGEFLAGS_ENTRY = 8
#: The byte of an entry that holds KPF_HWPOISON: the poison bits of a whole memory
#: block are then one slice and one translate, at C speed (32,768 pages a block).
_POISON_BYTE = (
    KPF_HWPOISON // 8 if sys.byteorder == "little" else KPAGEFLAGS_ENTRY - 1 - KPF_HWPOISON // 8
)
_POISON_TABLE = bytes(byte >> (KPF_HWPOISON % 8) & 1 for byte in range(256))


def _import_checkout() -> None:
    """Under ``-S`` the editable install's finder is not loaded: import from the checkout."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


class PageFlags:
    """HWPOISON counts per subblock, read from /proc/kpageflags one memory block a pread."""

    def __init__(self, block_size: int) -> None:
        self.fd = os.open(KPAGEFLAGS, os.O_RDONLY | os.O_CLOEXEC)
        self.pages_per_subblock = block_size // mmap.PAGESIZE

    def close(self) -> None:
        os.close(self.fd)

    def poisoned(self, addr: int, subblocks: int) -> list[int]:
        """Poisoned pages in each of ``subblocks`` subblocks from physical ``addr``."""
        per = self.pages_per_subblock
        first_pfn, count = addr // mmap.PAGESIZE, subblocks * per
        size = count * KPAGEFLAGS_ENTRY
        data = os.pread(self.fd, size, first_pfn * KPAGEFLAGS_ENTRY)
        if len(data) != size:
            raise OSError(f"{KPAGEFLAGS}: read {len(data)} of {size} bytes at pfn {first_pfn:#x}")
        bits = data[_POISON_BYTE::KPAGEFLAGS_ENTRY].translate(_POISON_TABLE)
        return [bits.count(1, i * per, (i + 1) * per) for i in range(subblocks)]


def _runs(indices: list[int]) -> Iterator[tuple[int, int]]:
    """Contiguous runs (first, count) of sorted ``indices``."""
    start = prev = None
    for index in indices:
        if prev is not None and index == prev + 1:
            prev = index
            continue
        if start is not None and prev is not None:
            yield start, prev - start + 1
        start = prev = index
    if start is not None and prev is not None:
        yield start, prev - start + 1


# --------------------------------------------------------------------------------------
# dead: the agent is dead; raw STATE requests.


def dead_check() -> dict[str, Any]:
    """Check every virtio-mem device with raw STATE requests; change nothing."""
    _import_checkout()
    from vmem_guest import pci
    from vmem_guest.device import VirtioMemDevice
    from vmem_guest.errors import TrackerError
    from vmem_guest.tracker import (
        DEFAULT_STATE_DIR,
        TrackerReader,
        device_locked,
        tracker_path,
        write_in_progress,
    )
    from vmem_guest.transport.channel import PciChannel
    from vmem_guest.transport.dma import no_unevictable_compaction

    report: list[dict[str, Any]] = []
    for dev in pci.list_devices():
        path = tracker_path(DEFAULT_STATE_DIR, dev.bdf)
        snap, torn = None, ""
        if path.exists():
            try:
                with TrackerReader.open(path) as reader:
                    snap = reader.snapshot()
            except TrackerError as exc:
                if not write_in_progress(path.read_bytes()):
                    raise  # not a torn file: unreadable or corrupt, a finding
                # Killed inside a write section (odd generation): the restarted agent
                # sets the file aside and rebuilds from STATE, sysfs and kpageflags.
                torn = exc.message
        # The agent's lock: nobody may own the device while we look (the agent is dead).
        with device_locked(DEFAULT_STATE_DIR, dev.bdf):
            mode = dev.vfio_mode
            with (
                no_unevictable_compaction(DEFAULT_STATE_DIR),
                PciChannel.open(dev.bdf, mode=mode) as channel,
            ):
                result = DeadCheck(dev.bdf, VirtioMemDevice(channel, dev.bdf), snap).run()
                result["tracker_torn"] = torn
                report.append(result)
    return {"devices": report}


class DeadCheck:
    """One device, the agent dead: what the device, sysfs, kpageflags and tracker say."""

    def __init__(self, bdf: str, device: Any, snap: Any) -> None:
        from vmem_guest.blocks import Geometry
        from vmem_guest.hotplug import KernelBlockState, SysfsMemory

        self.bdf, self.device, self.snap = bdf, device, snap
        kernel = SysfsMemory()
        self.cfg = cfg = device.config()
        self.geo = Geometry(cfg.addr, cfg.region_size, cfg.block_size, kernel.block_size())
        self.online = [
            mb for mb in self.geo.memory_blocks() if kernel.state(mb) is KernelBlockState.ONLINE
        ]
        self.requests = 0
        self.violations: list[str] = []

    def run(self) -> dict[str, Any]:
        plugged = self.scan_plugged()
        poison = self.read_poison()
        self.check_online_backed(plugged, poison)
        cfg, geo = self.cfg, self.geo
        if len(plugged) * cfg.block_size != cfg.plugged_size:
            found = len(plugged) * cfg.block_size
            self.violations.append(f"plugged_size {cfg.plugged_size} but STATE finds {found}")
        online = set(self.online)
        unused = [
            mb
            for mb in geo.memory_blocks()
            if mb not in online and any(sb in plugged for sb in geo.subblocks_of(mb))
        ]
        holes = [sb for sb in poison if sb not in plugged]
        result: dict[str, Any] = {
            "device": self.bdf,
            "addr": cfg.addr,
            "requested_size": cfg.requested_size,
            "plugged_size": cfg.plugged_size,
            "usable_region_size": cfg.usable_region_size,
            "block_size": cfg.block_size,
            "online_blocks": len(self.online),
            "plugged_not_online_blocks": len(unused),
            "holes": len(holes),
            "poisoned_pages": sum(poison.values()),
            "kept_bytes": self.kept(plugged, online) * cfg.block_size,
            "intent": None,
            "intent_online": False,
            "taking": [],
            "tracker": self.snap is not None,
            "tracker_device_diff": 0,
            "tracker_sysfs_diff": [],
        }
        if self.snap is not None and self.snap.identity.geometry == geo:
            result.update(self.check_tracker(plugged, poison))
        result["state_requests"] = self.requests
        result["pages_per_subblock"] = cfg.block_size // mmap.PAGESIZE
        result["violations"] = self.violations
        return result

    def kept(self, plugged: set[int], online: set[int]) -> int:
        """Subblocks a restarted agent keeps in use at least (its planner's ``kept``):
        none when nothing is online (start-up then unplugs everything); else the
        plugged subblocks of online blocks not held taken, and whole plugged blocks."""
        if not online:
            return 0
        snap = self.snap if self.snap is not None and self.snap.geometry == self.geo else None
        total = 0
        for mb in self.geo.memory_blocks():
            subs = self.geo.subblocks_of(mb)
            if mb in online:
                total += sum(sb in plugged and not (snap and snap.is_taken(sb)) for sb in subs)
            elif all(sb in plugged for sb in subs):
                total += len(subs)
        return total

    def state(self, first: int, count: int) -> Any:
        """STATE of ``count`` subblocks from ``first``; None unless ACKed."""
        self.requests += 1
        response = self.device.state(self.geo.subblock_addr(first), count)
        return response.state if response.acked else None

    def scan_plugged(self) -> set[int]:
        """Every plugged subblock, by STATE over the usable region, bisecting MIXED ranges."""
        from vmem_guest.spec import MAX_BLOCKS_PER_REQUEST, BlockState

        usable = self.cfg.usable_region_size // self.cfg.block_size
        pending = [
            (first, min(MAX_BLOCKS_PER_REQUEST, usable - first))
            for first in range(0, usable, MAX_BLOCKS_PER_REQUEST)
        ]
        plugged: set[int] = set()
        while pending:
            first, count = pending.pop()
            answer = self.state(first, count)
            if answer is BlockState.PLUGGED:
                plugged.update(range(first, first + count))
            elif answer is BlockState.MIXED and count > 1:
                pending += [(first, count // 2), (first + count // 2, count - count // 2)]
            elif answer is not BlockState.UNPLUGGED:
                self.violations.append(f"STATE {first}+{count} answered {answer}")
        return plugged

    def read_poison(self) -> dict[int, int]:
        """Poisoned pages of every subblock of every online block (subblock -> count)."""
        flags = PageFlags(self.cfg.block_size)
        try:
            out: dict[int, int] = {}
            for mb in self.online:
                subs = self.geo.subblocks_of(mb)
                counts = flags.poisoned(self.geo.subblock_addr(subs.start), len(subs))
                out.update(zip(subs, counts, strict=True))
            return out
        finally:
            flags.close()

    def check_online_backed(self, plugged: set[int], poison: dict[int, int]) -> None:
        """Invariant 1: every page of an online block is plugged or HWPOISON."""
        per = self.cfg.block_size // mmap.PAGESIZE
        for mb in self.online:
            bad = [sb for sb in self.geo.subblocks_of(mb) if sb not in plugged and poison[sb] < per]
            if bad:
                self.violations.append(
                    f"memory{mb} is online over {len(bad)} unplugged subblocks with pages in"
                    f" use (first {self.geo.subblock_addr(bad[0]):#x}:"
                    f" {poison[bad[0]]} of {per} pages poisoned)"
                )

    def intent_window(self) -> range:
        """The subblocks the pending intent may have changed at the device."""
        intent, geo = self.snap.intent, self.geo
        if intent is None:
            return range(0)
        if intent.op.name == "UNPLUG_ALL":
            return range(geo.nr_subblocks)
        if intent.op.name in ("PLUG", "UNPLUG"):
            first = geo.subblock_index(intent.addr)
            return range(first, first + intent.nb_blocks)
        return range(0)

    def check_tracker(self, plugged: set[int], poison: dict[int, int]) -> dict[str, Any]:
        """The tracker against the device (invariant 3), sysfs and the page flags."""
        from vmem_guest.tracker import consistency_problem

        snap, geo = self.snap, self.geo
        out: dict[str, Any] = {}
        problem = consistency_problem(snap)
        if problem is not None:
            self.violations.append(f"tracker file inconsistent: {problem}")
        window = self.intent_window()
        if snap.intent is not None:
            intent = snap.intent
            out["intent"] = {"op": intent.op.name, "addr": intent.addr, "nb": intent.nb_blocks}
            out["intent_online"] = any(sb in poison for sb in window)
        diff = [sb for sb in range(geo.nr_subblocks) if snap.is_plugged(sb) != (sb in plugged)]
        out["tracker_device_diff"] = len(diff)
        outside = [sb for sb in diff if sb not in window]
        # Invariant 3: the tracker records every ACK before it clears the intent.
        if outside:
            self.violations.append(
                f"tracker and device disagree on {len(outside)} subblocks outside the pending"
                f" intent (first: {geo.subblock_addr(outside[0]):#x})"
            )
        self.check_taken(plugged, poison)
        out["taking"] = [
            [sb, poison.get(sb, 0)]
            for sb in range(geo.nr_subblocks)
            if snap.is_taken(sb) and snap.is_plugged(sb)
        ]
        tracked_online = {r.index for r in snap.blocks if r.state.name == "ONLINE"}
        sysfs_diff = sorted(tracked_online.symmetric_difference(self.online))
        out["tracker_sysfs_diff"] = sysfs_diff
        # A kill between the sysfs write and its record leaves one block behind.
        if len(sysfs_diff) > 1:
            self.violations.append(f"tracker and sysfs disagree on memory blocks {sysfs_diff}")
        return out

    def check_taken(self, plugged: set[int], poison: dict[int, int]) -> None:
        """Taken bits lie under online blocks only; every hole is held taken; and no page
        of a subblock in use is poisoned (the agent sets a taken bit before the first
        soft offline and clears it after the last unpoison, so one would be lost)."""
        snap, geo = self.snap, self.geo
        taken = [sb for sb in range(geo.nr_subblocks) if snap.is_taken(sb)]
        stray = [sb for sb in taken if sb not in poison]
        if stray:
            self.violations.append(
                f"{len(stray)} subblocks held taken outside online blocks"
                f" (first {geo.subblock_addr(stray[0]):#x})"
            )
        untracked = [sb for sb in poison if sb not in plugged and not snap.is_taken(sb)]
        if untracked:
            self.violations.append(
                f"{len(untracked)} holes not held taken"
                f" (first {geo.subblock_addr(untracked[0]):#x})"
            )
        leaked = [sb for sb, count in poison.items() if count and not snap.is_taken(sb)]
        if leaked:
            self.violations.append(
                f"{len(leaked)} subblocks in use hold poisoned pages"
                f" (first {geo.subblock_addr(leaked[0]):#x}: {poison[leaked[0]]} pages)"
            )


# --------------------------------------------------------------------------------------
# converged: the agent runs and has converged; STATE through its control socket.


def converged_check() -> dict[str, Any]:
    """Check every tracked device of the running agent (see the module docstring)."""
    _import_checkout()
    from vmem_guest import control
    from vmem_guest.tracker import DEFAULT_STATE_DIR, TrackerReader, list_trackers

    socket = control.socket_path(DEFAULT_STATE_DIR)
    report = []
    for path in list_trackers(DEFAULT_STATE_DIR):
        with TrackerReader.open(path) as reader:
            snap = reader.snapshot()
        report.append(ConvergedCheck(snap, socket).run())
    return {"devices": report}


class ConvergedCheck:
    """One device of a converged agent: STATE over its runs and the page flags."""

    def __init__(self, snap: Any, socket: Path) -> None:
        self.snap, self.socket = snap, socket
        self.geo = snap.identity.geometry
        self.requests = 0
        self.violations: list[str] = []

    def run(self) -> dict[str, Any]:
        snap, geo = self.snap, self.geo
        online = [r.index for r in snap.blocks if r.state.name == "ONLINE"]
        subs = [sb for mb in online for sb in geo.subblocks_of(mb)]
        in_use = [sb for sb in subs if snap.is_plugged(sb) and not snap.is_taken(sb)]
        holes = [sb for sb in subs if not snap.is_plugged(sb) and snap.is_taken(sb)]
        taking = [sb for sb in subs if snap.is_plugged(sb) and snap.is_taken(sb)]
        if taking:
            self.violations.append(f"{len(taking)} subblocks left taken but plugged")
        self.check_state(in_use, "PLUGGED")
        self.check_state(holes, "UNPLUGGED")
        self.check_pages(online, set(holes), set(in_use))
        return {
            "device": snap.identity.name,
            "online_blocks": len(online),
            "holes": len(holes),
            "state_requests": self.requests,
            "violations": self.violations,
        }

    def check_state(self, subblocks: list[int], expected: str) -> None:
        """STATE over each run of ``subblocks`` (one request's worth at a time)."""
        from vmem_guest import control
        from vmem_guest.spec import MAX_BLOCKS_PER_REQUEST

        for first, count in _runs(subblocks):
            for start in range(first, first + count, MAX_BLOCKS_PER_REQUEST):
                nb = min(MAX_BLOCKS_PER_REQUEST, first + count - start)
                addr = self.geo.subblock_addr(start)
                request = control.QueryState(self.snap.identity.name, addr, nb)
                self.requests += 1
                answer = (control.call(self.socket, request) or {}).get("state")
                if answer != expected:
                    self.violations.append(
                        f"STATE {addr:#x}+{nb} answered {answer}, not {expected}"
                    )

    def check_pages(self, online: list[int], holes: set[int], in_use: set[int]) -> None:
        """Every page of a hole HWPOISON; none of a subblock in use."""
        flags = PageFlags(self.geo.block_size)
        per = flags.pages_per_subblock
        try:
            for mb in online:
                subs = self.geo.subblocks_of(mb)
                counts = flags.poisoned(self.geo.subblock_addr(subs.start), len(subs))
                for sb, count in zip(subs, counts, strict=True):
                    if sb in holes and count != per:
                        self.violations.append(
                            f"hole {self.geo.subblock_addr(sb):#x}: {count} of {per} pages poisoned"
                        )
                    elif sb in in_use and count:
                        self.violations.append(
                            f"subblock {self.geo.subblock_addr(sb):#x} in use holds"
                            f" {count} poisoned pages"
                        )
        finally:
            flags.close()


def main() -> int:
    modes = {"dead": dead_check, "converged": converged_check}
    if len(sys.argv) != 2 or sys.argv[1] not in modes:
        print(f"usage: {sys.argv[0]} {'|'.join(modes)}", file=sys.stderr)
        return 2
    print(json.dumps(modes[sys.argv[1]]()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
