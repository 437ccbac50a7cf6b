"""A cpio archive in the "newc" format, the one Linux unpacks as an initramfs.

Written here rather than with cpio(1) so that every entry is owned by root, the
console device node exists (the kernel opens ``/dev/console`` for init before
anything mounts devtmpfs: init/main.c ``console_on_rootfs``) and no staging copy of
the files is made, all without privileges. Format: Documentation/driver-api/
early-userspace/buffer-format.rst (a 110-byte ASCII header of 13 hexadecimal
fields, the name with its NUL padded to 4 bytes, the data padded to 4 bytes, and a
``TRAILER!!!`` entry at the end).
"""

from __future__ import annotations

import stat
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


class NewcWriter:
    """Entries appended to ``out`` in order: a directory before what it holds."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self._ino = 0
        self._dirs: set[str] = set()

    def _entry(
        self,
        name: str,
        mode: int,
        data: bytes = b"",
        mtime: int = 0,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        self._ino += 1
        encoded = name.lstrip("/").encode() or b"."
        fields = (
            self._ino, mode, 0, 0,  # ino, mode, uid, gid
            2 if stat.S_ISDIR(mode) else 1, mtime, len(data),  # nlink, mtime, filesize
            0, 0, *rdev,  # devmajor, devminor, rdevmajor, rdevminor
            len(encoded) + 1, 0,  # namesize (with its NUL), check
        )  # fmt: skip
        header = MAGIC + b"".join(b"%08x" % field for field in fields)
        self.out.write(header + encoded + b"\0" + _pad(len(header) + len(encoded) + 1))
        self.out.write(data + _pad(len(data)))

    def directory(self, path: str, mode: int = 0o755) -> None:
        """``path`` and every parent not written yet."""
        parts = [p for p in path.split("/") if p]
        for depth in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:depth])
            if sub not in self._dirs:
                self._dirs.add(sub)
                self._entry(sub, stat.S_IFDIR | (mode if depth == len(parts) else 0o755))

    def _parent(self, path: str) -> None:
        parent = path.rsplit("/", 1)[0]
        if parent:
            self.directory(parent)

    def file(self, path: str, data: bytes, mode: int = 0o644, mtime: int = 0) -> None:
        """A regular file (``mtime`` kept: Python checks a .pyc against its source's)."""
        self._parent(path)
        self._entry(path, stat.S_IFREG | (mode & 0o7777), data, mtime)

    def symlink(self, path: str, target: str) -> None:
        self._parent(path)
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parent(path)
        self._entry(path, stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self) -> None:
        """The trailer; the archive is complete."""
        self._entry(TRAILER, 0)
