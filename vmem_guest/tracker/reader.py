"""Readers of a tracker: a read-only mapping and the seqlock read (see owner.py)."""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

from vmem_guest._linux.lifetime import Closing
from vmem_guest.errors import TrackerError
from vmem_guest.tracker.files import check_name, untrusted_reason
from vmem_guest.tracker.layout import (
    GENERATION,
    GENERATION_OFFSET,
    HEADER_SIZE,
    READ_BACKOFF_SECONDS,
    READ_RETRIES,
    READ_SPIN_ATTEMPTS,
)
from vmem_guest.tracker.snapshot import TrackerSnapshot, check_header, decode


class TrackerReader(Closing):
    """A read-only view of a tracker file; never locks, works while the owner runs."""

    path: Path

    def __init__(self, path: Path, mapping: mmap.mmap) -> None:
        """Use :meth:`open`."""
        self.path = path
        self._map: mmap.mmap | None = mapping

    @classmethod
    def open(cls, path: Path) -> TrackerReader:
        """Map ``path`` read-only after checking it (TrackerError otherwise).

        Checked: what the owner would not trust either (not a regular file; for
        root, owned by another user or world-writable), magic, version and
        sizes, and that the device named inside is the one the file name says
        (a tracker copied or renamed from another device is not this one's).
        """
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise TrackerError(f"cannot open {path}: {exc.strerror}", path=str(path)) from exc
        try:
            st = os.fstat(fd)
            size = st.st_size
            try:
                untrusted = untrusted_reason(st)
                if untrusted is not None:
                    raise TrackerError(f"not trusted: {untrusted}")
                header = check_header(os.pread(fd, HEADER_SIZE, 0), size)
                check_name(path, header)
            except TrackerError as exc:
                raise TrackerError(f"{path}: {exc.message}", path=str(path)) from None
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        return cls(path, mapping)

    def snapshot(self, retries: int = READ_RETRIES) -> TrackerSnapshot:
        """A consistent snapshot (seqlock read).

        Read the generation; if even, copy the file and read it again; accept
        when both reads agree. The first READ_SPIN_ATTEMPTS attempts follow
        each other at once, later ones READ_BACKOFF_SECONDS apart, so the
        default gives up after about a second: TrackerError (the owner died
        inside a write section, or never pauses).
        """
        mapping = self._mapped
        for attempt in range(max(1, retries)):
            before = GENERATION.unpack_from(mapping, GENERATION_OFFSET)[0]
            if not before & 1:
                copy = mapping[:]
                after = GENERATION.unpack_from(mapping, GENERATION_OFFSET)[0]
                if before == after:
                    try:
                        return decode(copy)
                    except TrackerError as exc:
                        raise TrackerError(f"{self.path}: {exc.message}") from None
            if attempt >= READ_SPIN_ATTEMPTS:
                time.sleep(READ_BACKOFF_SECONDS)
        raise TrackerError(
            f"{self.path}: no stable snapshot after {retries} attempts", path=str(self.path)
        )

    @property
    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            raise TrackerError(f"reader of {self.path} is closed")
        return self._map

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
