"""Byte sizes with binary suffixes ("512M", "2.5G", "4GiB") for configs and the CLI."""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: How far a new boot's MemTotal may lie from an earlier boot's of the same VM. The
#: kernel's own reservations differ a little from boot to boot (CI saw boots 4 KiB
#: apart: "Memory: 934272K/1048056K available" then 934276K after a system_reset);
#: device memory comes online in whole memory blocks (128 MiB and more on x86-64), so
#: a margin this far below one block cannot hide a single one.
REBOOT_MEMTOTAL_MARGIN = 4 * MiB

_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse "4G", "512MiB", "2.5G", "0x8000000" or a plain byte count."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().removesuffix("IB").removesuffix("B")
    if s.startswith("0X"):
        return int(s, 16)
    unit = s[-1] if s and s[-1] in _UNITS else ""
    number = s[:-1] if unit else s
    value = float(number) * _UNITS[unit]
    if value != int(value):
        raise ValueError(f"not a whole number of bytes: {text!r}")
    return int(value)


def fmt_size(n: int) -> str:
    """Format bytes compactly for QEMU options and messages ("4G", "2560M", "4096")."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)
