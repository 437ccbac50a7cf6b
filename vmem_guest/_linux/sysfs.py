"""sysfs attributes: read a value, write a word, follow a link.

An attribute holds one value as text; its ``show()`` fills at most one page, so one
read(2) of a page gets all of it, and each write(2) to it is one ``store()`` call
(Linux ``Documentation/filesystems/sysfs.rst``). The same helpers read one-value
procfs files (``/proc/sys/...``).

Paths are arguments, and callers build them from a root they take as a parameter
(default :data:`SYSFS_ROOT`), so tests run the same code against a tree under a
temporary directory. Failures are the kernel's ``OSError``: each caller turns it into
its own error.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Where sysfs is mounted.
SYSFS_ROOT = Path("/sys")
#: The most one attribute holds: a page (what one read(2) asks for).
ATTRIBUTE_MAX_BYTES = 4096


def read_value(path: Path | str) -> str:
    """The value of the attribute at ``path``, surrounding whitespace stripped.

    One open and one read(2), no buffered I/O: cheap enough for the path of every
    memory block. OSError as the kernel raised it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, ATTRIBUTE_MAX_BYTES).decode().strip()
    finally:
        os.close(fd)


def read_value_or_none(path: Path | str) -> str | None:
    """:func:`read_value`, or None when the attribute cannot be read (absent, say)."""
    try:
        return read_value(path)
    except OSError:
        return None


def write_word(path: Path | str, word: str, *, truncate: bool = False) -> int:
    """Write ``word`` to the attribute at ``path`` with one write(2); the bytes written.

    One write of the whole word: a store acts on each write. ``truncate`` opens with
    O_TRUNC, as ``echo word > path`` does: sysfs ignores it, but a regular file (in a
    test's tree) then holds ``word`` alone, the way a replaced value reads back.
    OSError as the kernel raised it (EBUSY, EINVAL...).
    """
    flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_TRUNC if truncate else 0)
    fd = os.open(path, flags)
    try:
        return os.write(fd, word.encode())
    finally:
        os.close(fd)


def link_name(path: Path | str) -> str | None:
    """The last component of the target of the symlink at ``path`` (``driver``,
    ``iommu_group``); None when there is no such link."""
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None
