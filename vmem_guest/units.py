"""Parse and format sizes ("512M", "4GiB", "0x8000000") and addresses."""

from __future__ import annotations

import re

from vmem_guest.errors import UsageError

_SUFFIXES = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}
# ASCII only: ``\d`` would otherwise take any Unicode digit (Arabic-Indic,
# fullwidth). "iB"/"B" follow a unit letter; a bare "B" means bytes.
_SIZE_RE = re.compile(
    r"^\s*(?P<num>\d+)\s*(?:(?P<unit>[KMGT])(?:I?B)?|B)?\s*$", re.IGNORECASE | re.ASCII
)
_HEX_RE = re.compile(r"^\s*0x(?P<hex>[0-9a-f]+)\s*$", re.IGNORECASE | re.ASCII)
#: Largest size or address accepted: the 64-bit physical address space.
MAX_VALUE = (1 << 64) - 1


def parse_size(text: str, what: str = "size") -> int:
    """Bytes from ``"128M"``, ``"4GiB"``, ``"1g"``, ``"4096"`` or ``"0x8000000"``.

    Units are binary (K = 1024). Raises UsageError with one line on anything else,
    naming the value as ``what``.
    """
    match = _HEX_RE.match(text)
    if match:
        value = int(match["hex"], 16)
    else:
        match = _SIZE_RE.match(text)
        if not match:
            raise UsageError(
                f"invalid {what} {text!r}: use a number with K/M/G/T (optionally iB) or 0x hex",
                value=text,
            )
        digits = match["num"].lstrip("0")
        # 2**64 has 20 digits; longer numbers do not fit, and int() refuses > 4300 digits.
        if len(digits) > 20:
            raise UsageError(f"{what} {text[:40]!r} does not fit in 64 bits", value=text)
        value = int(match["num"]) << _SUFFIXES[(match["unit"] or "").upper()]
    if value > MAX_VALUE:
        raise UsageError(f"{what} {text[:40]!r} does not fit in 64 bits", value=text)
    return value


def parse_address(text: str) -> int:
    """A physical address: hex with ``0x`` or a size-like value; bounded to 64 bits."""
    return parse_size(text, "address")


def parse_size_list(text: str) -> list[int]:
    """``"1G,3G,512M,0"`` -> sizes in bytes; empty items are errors."""
    items = text.split(",")
    if any(not item.strip() for item in items):
        raise UsageError(f"invalid size list {text!r}: empty item", value=text)
    return [parse_size(item) for item in items]


def format_size(value: int) -> str:
    """Shortest exact binary form: 1073741824 -> "1GiB", 1000 MiB -> "1000MiB"."""
    if value == 0:
        return "0"
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if value % (1 << shift) == 0:
            return f"{value >> shift}{unit}"
    return f"{value}B"
