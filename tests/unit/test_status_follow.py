"""``vmem-guest status --follow``: a view at once, then one per change and none between.

Real tracker files in a temporary state directory, written by their owner
(:class:`Tracker`) between two looks of the follower; the guest's memory figures
come from a stand-in, and the follower's sleep is the hook that runs each change.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmem_guest.blocks import Geometry
from vmem_guest.errors import TrackerError
from vmem_guest.render import GuestMemory
from vmem_guest.status_follow import StatusView, TrackerWatch, follow
from vmem_guest.tracker import Tracker, TrackerIdentity

MIB, GIB = 1 << 20, 1 << 30
SBM = Geometry(addr=4 * GIB, region_size=1 * GIB, block_size=2 * MIB, memory_block_size=128 * MIB)
OTHER = Geometry(addr=8 * GIB, region_size=1 * GIB, block_size=2 * MIB, memory_block_size=128 * MIB)
NAME, SECOND = "0000:00:03.0", "0000:00:04.0"
CLI = [sys.executable, "-m", "vmem_guest.cli", "status"]


class Guest:
    """The guest's memory figures, as a test sets them."""

    def __init__(self) -> None:
        self.memory = GuestMemory(mem_total=1 * GIB, hardware_corrupted=0)

    def __call__(self) -> GuestMemory:
        return self.memory


def views(state_dir: Path, guest: Guest, changes: list[Callable[[], None]]) -> Iterator[StatusView]:
    """follow(), each sleep running the next change; the follow ends after the look
    that follows the last change (so a change that yields nothing is seen too)."""
    pending = list(changes)

    class Done(Exception):
        pass

    def sleep(seconds: float) -> None:
        assert seconds == 0.5
        if not pending:
            raise Done
        pending.pop(0)()

    try:
        yield from follow(state_dir, guest, interval=0.5, sleep=sleep)
    except Done:
        return


def plug_one_block(tracker: Tracker) -> None:
    """Plug every subblock of the region's first memory block."""
    subblocks = tracker.geometry.subblocks_of(tracker.geometry.first_memory_block)
    tracker.record_plugged(tracker.geometry.subblock_addr(subblocks.start), len(subblocks))


def plugged(view: StatusView) -> list[int]:
    return [snap.plugged_bytes for snap in view.snapshots]


def test_first_view_at_once_then_only_changes(tmp_path: Path) -> None:
    guest = Guest()
    with Tracker.open(tmp_path, TrackerIdentity(NAME, SBM)) as tracker:
        nothing = [lambda: None] * 3

        def shrink_memtotal() -> None:
            guest.memory = GuestMemory(
                mem_total=guest.memory.mem_total - 2 * MIB, hardware_corrupted=0
            )

        def poison() -> None:
            guest.memory = GuestMemory(guest.memory.mem_total, hardware_corrupted=2 * MIB)

        seen = list(
            views(
                tmp_path,
                guest,
                [*nothing, lambda: plug_one_block(tracker), *nothing, shrink_memtotal, poison],
            )
        )
    assert [plugged(v) for v in seen] == [[0], [128 * MIB], [128 * MIB], [128 * MIB]]
    assert seen[1].snapshots[0].generation > seen[0].snapshots[0].generation
    assert [v.guest.mem_total for v in seen] == [GIB, GIB, GIB - 2 * MIB, GIB - 2 * MIB]
    assert [v.guest.hardware_corrupted for v in seen] == [0, 0, 0, 2 * MIB]


def test_trackers_that_come_and_go(tmp_path: Path) -> None:
    guest = Guest()
    second_path = tmp_path / f"{SECOND}.state"
    with Tracker.open(tmp_path, TrackerIdentity(NAME, SBM)):

        def add_second() -> None:
            Tracker.open(tmp_path, TrackerIdentity(SECOND, OTHER)).close()

        seen = list(views(tmp_path, guest, [add_second, second_path.unlink]))
    assert [[snap.identity.name for snap in v.snapshots] for v in seen] == [
        [NAME],
        [NAME, SECOND],
        [NAME],
    ]


def test_an_empty_state_dir_is_one_view(tmp_path: Path) -> None:
    seen = list(views(tmp_path / "none yet", Guest(), [lambda: None, lambda: None]))
    assert [v.snapshots for v in seen] == [()]


def test_a_tracker_replaced_under_its_name_is_read_anew(tmp_path: Path) -> None:
    """A fresh file after the old one was set aside starts its generations over: the
    follower must read the new file, not keep the old mapping, whatever the generations."""
    guest = Guest()
    with Tracker.open(tmp_path, TrackerIdentity(NAME, SBM)) as tracker:
        plug_one_block(tracker)

    def replace() -> None:
        # Another geometry under the same name: the owner sets the file aside and
        # writes a fresh one (tracker/owner.py, Tracker.open).
        with Tracker.open(tmp_path, TrackerIdentity(NAME, OTHER)) as fresh:
            assert fresh.discarded_reason is not None

    seen = list(views(tmp_path, guest, [replace, lambda: None]))
    assert [v.snapshots[0].identity.geometry.addr for v in seen] == [SBM.addr, OTHER.addr]
    assert plugged(seen[1]) == [0]
    assert seen[0].files != seen[1].files


def test_a_corrupt_tracker_raises_as_status_does(tmp_path: Path) -> None:
    (tmp_path / "bad.state").write_bytes(b"\xde\xad" * 512)
    with TrackerWatch(tmp_path) as watch, pytest.raises(TrackerError):
        watch.look()


def test_the_command_prints_a_line_per_change_and_ends_quietly_on_interrupt(
    tmp_path: Path,
) -> None:
    """As a user runs it: the first line at once, the same document ``status --json``
    prints, then a line when the owner writes; Ctrl-C ends it with status 0."""
    with Tracker.open(tmp_path, TrackerIdentity(NAME, SBM)) as tracker:
        once = subprocess.run(
            [*CLI, "--json", "--state-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        proc = subprocess.Popen(
            [*CLI, "--follow", "--json", "--interval", "0.05", "--state-dir", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            assert json.loads(first) == json.loads(once.stdout)
            plug_one_block(tracker)
            second = json.loads(proc.stdout.readline())
        finally:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
    assert [dev["plugged_size"] for dev in second["devices"]] == [128 * MIB]
    assert second["status"] == "not_converged"  # 128 MiB plugged, none requested
    assert (proc.returncode, out, err) == (0, "", "")


def test_the_text_form_prints_a_time_line_per_view(tmp_path: Path) -> None:
    with Tracker.open(tmp_path, TrackerIdentity(NAME, SBM)):
        proc = subprocess.Popen(
            [*CLI, "--follow", "--state-dir", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "TZ": "UTC"},
        )
        assert proc.stdout is not None
        header = proc.stdout.readline()
        device = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert header.startswith("== ") and len(header.split()) == 2
    assert NAME in device
    assert proc.returncode == 0
