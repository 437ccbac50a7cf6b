"""procfs: where it is mounted, and the one parser of ``/proc/meminfo``.

``/proc/meminfo`` has one field a line, ``Name:   value kB`` (Linux
``Documentation/filesystems/proc.rst``, section meminfo); the fields read here
(MemTotal, MemAvailable, HardwareCorrupted) are all in kB. The file is a parameter
with :data:`MEMINFO` as default, so tests read a file of their own.
"""

from __future__ import annotations

from pathlib import Path

#: Where procfs is mounted.
PROC_ROOT = Path("/proc")
MEMINFO = PROC_ROOT / "meminfo"


def meminfo_bytes(field: str, meminfo: Path = MEMINFO) -> int | None:
    """``field`` of ``meminfo`` (``MemAvailable``...) in bytes; None when the file
    cannot be read, has no such field, or its value is not a number."""
    try:
        text = meminfo.read_text()
    except (OSError, ValueError):
        return None
    prefix = f"{field}:"
    for line in text.splitlines():
        if line.startswith(prefix):
            return _kib_in_bytes(line)
    return None


def memtotal_bytes(meminfo: Path = MEMINFO) -> int:
    """MemTotal in bytes (0 if unreadable)."""
    return meminfo_bytes("MemTotal", meminfo) or 0


def _kib_in_bytes(line: str) -> int | None:
    """The kB value of one meminfo line in bytes (None: no number there)."""
    try:
        return int(line.split()[1]) * 1024
    except (IndexError, ValueError):
        return None
