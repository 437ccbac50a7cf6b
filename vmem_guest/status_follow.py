"""``vmem-guest status --follow``: every device's status, each time it changes.

One long-lived process keeps a read-only mapping of each tracker in the state
directory, takes a seqlock snapshot of each (:class:`~vmem_guest.tracker.TrackerReader`)
and reads the guest's memory figures every ``interval`` seconds, and yields a
:class:`StatusView` whenever something a user sees may have changed: a tracker's
generation (the owner bumps it on entering and on leaving every write section,
tracker/owner.py, so an equal even generation is an unchanged file), the set of
trackers, a tracker file replaced under the same name (a fresh one after the old
was set aside), or the guest's MemTotal or HardwareCorrupted.

Starting a ``vmem-guest status`` per look costs the interpreter's and the imports'
start-up each time (seconds in a guest under TCG); following pays it once and then
costs one small file copy per tracker per interval.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from vmem_guest._linux.lifetime import Closing
from vmem_guest.errors import TrackerError
from vmem_guest.render import GuestMemory
from vmem_guest.tracker import TrackerReader, TrackerSnapshot, list_trackers

#: Seconds between two looks, by default: well under a second behind the agent, while
#: a look (a copy of a few KiB per tracker and /proc/meminfo) stays a small cost.
DEFAULT_INTERVAL = 0.25

FileId = tuple[int, int]  #: (st_dev, st_ino): which file a path names right now


@dataclasses.dataclass(frozen=True)
class StatusView:
    """What ``vmem-guest status`` would print at one moment: a snapshot per tracker,
    in path order, and the guest's memory figures."""

    snapshots: tuple[TrackerSnapshot, ...]
    guest: GuestMemory
    #: Which file each snapshot came from (a tracker replaced under the same name
    #: starts its generations over, so the generation alone cannot tell it apart).
    files: tuple[FileId, ...]

    def change_key(self) -> tuple[object, ...]:
        """Equal for two views a user could not tell apart."""
        trackers = tuple(
            (snap.identity.name, snap.generation, file_id)
            for snap, file_id in zip(self.snapshots, self.files, strict=True)
        )
        return (trackers, self.guest.mem_total, self.guest.hardware_corrupted)


class TrackerWatch(Closing):
    """The readers of one state directory's trackers, kept open between looks; a
    tracker that appears is opened, one that goes (or is replaced) is let go."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self._readers: dict[Path, tuple[FileId, TrackerReader]] = {}

    def look(self) -> list[tuple[TrackerSnapshot, FileId]]:
        """A consistent snapshot of every tracker there now, in path order, with the
        file each came from. TrackerError as ``vmem-guest status`` raises it (a file
        that is corrupt or not trusted, or whose owner never leaves a write section)."""
        paths = list_trackers(self.state_dir)
        for gone in set(self._readers) - set(paths):
            self._drop(gone)
        seen = []
        for path in paths:
            reader = self._reader(path)
            if reader is not None:
                seen.append((reader[1].snapshot(), reader[0]))
        return seen

    def _reader(self, path: Path) -> tuple[FileId, TrackerReader] | None:
        """The open reader of the file at ``path``; None if it vanished meanwhile."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._drop(path)
            return None
        file_id = (st.st_dev, st.st_ino)
        kept = self._readers.get(path)
        if kept is not None and kept[0] == file_id:
            return kept
        self._drop(path)
        try:
            reader = TrackerReader.open(path)
        except TrackerError:
            if not os.path.lexists(path):
                return None  # set aside between the stat and the open: next look
            raise
        # A file replaced between the stat and the open is seen at the next look:
        # its id then differs from the one kept here, and it is opened again.
        self._readers[path] = (file_id, reader)
        return self._readers[path]

    def _drop(self, path: Path) -> None:
        kept = self._readers.pop(path, None)
        if kept is not None:
            kept[1].close()

    def close(self) -> None:
        for path in list(self._readers):
            self._drop(path)


def follow(
    state_dir: Path,
    read_guest: Callable[[], GuestMemory],
    interval: float = DEFAULT_INTERVAL,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[StatusView]:
    """Yield the first view at once, then each view that differs from the one yielded
    before it (:meth:`StatusView.change_key`), looking every ``interval`` seconds;
    endless (the caller stops iterating). ``read_guest``: the guest's memory figures
    (``status_reads.guest_memory`` in the guest)."""
    with TrackerWatch(state_dir) as watch:
        last: tuple[object, ...] | None = None
        while True:
            seen = watch.look()
            view = StatusView(
                snapshots=tuple(snap for snap, _ in seen),
                guest=read_guest(),
                files=tuple(file_id for _, file_id in seen),
            )
            key = view.change_key()
            if key != last:
                last = key
                yield view
            sleep(interval)
