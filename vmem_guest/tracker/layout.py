"""The tracker file's binary layout, declared once as ctypes data (sizes pinned by tests).

One file per device, ``<state_dir>/<name>.state``, little-endian::

    +---------------------------+  offset 0
    | TrackerHeader (256 bytes) |  magic, version, sizes, identity, generation,
    |                           |  owner, device info, counters, pending intent
    +---------------------------+  offset HEADER_SIZE (8-byte aligned)
    | BlockRecordLayout[n]      |  one 16-byte record per memory block of the region
    +---------------------------+  8-byte aligned
    | subblock bitmap           |  bit i (byte i // 8, bit i % 8) = device block i
    |                           |  plugged; nr_subblocks bits rounded up to 8 bytes
    +---------------------------+  8-byte aligned
    | taken bitmap              |  bit i = the agent takes or took the pages of
    |                           |  subblock i out of use (soft offline): only
    |                           |  under ONLINE blocks; the same size
    +---------------------------+  total_size

Per subblock of an ONLINE block, (plugged, taken) is (1, 0) in use, (1, 1)
being taken or given back (some pages may be poisoned), (0, 1) a hole: every
page verified poisoned before it was unplugged. (0, 0) never happens under an
ONLINE block (docs/design.md, invariant 1).

Also here: the pure helpers every other module of the package shares (offsets
of a file, bit reads, the image of a fresh file). No I/O.
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import mmap
import re
import struct
from pathlib import Path
from typing import ClassVar

from vmem_guest.blocks import Geometry

DEFAULT_STATE_DIR = Path("/run/vmem-guest")
#: The first bytes of every tracker file.
MAGIC = b"VMEMTRK\0"
#: Set-aside (``.bad-*``) files kept per device, the newest ones.
KEEP_SET_ASIDE = 5
#: Bumped whenever the layout changes; a file of another version is set aside.
#: 2: the taken bitmap (subblocks of online blocks taken out of use).
VERSION = 2
#: ``intent_op`` when no request is pending.
NO_INTENT = 0xFFFF
#: Suffix of state files; the lock file beside each uses LOCK_SUFFIX.
STATE_SUFFIX = ".state"
LOCK_SUFFIX = ".lock"
#: Permissions (docs/design.md section 4).
STATE_DIR_MODE = 0o755
STATE_FILE_MODE = 0o644
#: Arrays in the file start at multiples of this.
ARRAY_ALIGNMENT = 8
#: The bitmap is stored in whole 64-bit words.
BITMAP_WORD_BITS = 64
#: Bytes of the device name field (NUL-terminated, so one less is usable).
NAME_FIELD_SIZE = 32
#: Bytes of the free-text broken detail field (NUL-terminated).
BROKEN_DETAIL_SIZE = 40
#: ``BlockRecordLayout.node`` when the block's node is unknown.
NODE_UNKNOWN = -1
#: Block record ``flags`` bit: the block was probed/added in the kernel.
FLAG_PRESENT = 0x01
KNOWN_FLAGS = FLAG_PRESENT
#: Largest values of the unsigned header fields.
U16_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
#: Default number of attempts of a seqlock read before giving up.
READ_RETRIES = 1000

#: Seqlock read attempts made back to back before the reader starts sleeping.
READ_SPIN_ATTEMPTS = 16
#: Sleep between later attempts (a write section can take a millisecond or more).
READ_BACKOFF_SECONDS = 0.001

NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


class DeviceStatus(enum.IntEnum):
    """``TrackerHeader.device_status``."""

    OK = 0
    BROKEN = 1


class BrokenReason(enum.IntEnum):
    """``TrackerHeader.broken_code``: why the device was marked broken."""

    NONE = 0
    DEVICE_ERROR = 1  # the device answered ERROR
    BAD_RESPONSE = 2  # unknown response type, bad length or id
    TIMEOUT = 3  # no answer within the timeout
    BAD_CONFIG = 4  # config space violates the spec
    SAFETY = 5  # a safety invariant would have been broken
    OTHER = 255  # anything else; the text is in broken_detail

    @property
    def text(self) -> str:
        """One line for humans (``vmem-guest status``)."""
        return BROKEN_TEXT[self]


BROKEN_TEXT: dict[BrokenReason, str] = {
    BrokenReason.NONE: "",
    BrokenReason.DEVICE_ERROR: "device answered ERROR",
    BrokenReason.BAD_RESPONSE: "malformed response",
    BrokenReason.TIMEOUT: "device timeout",
    BrokenReason.BAD_CONFIG: "invalid device config",
    BrokenReason.SAFETY: "safety invariant",
    BrokenReason.OTHER: "other",
}


class LayoutCheck:
    """Mixin: each layout states its size and the tests pin it."""

    SPEC_SIZE: ClassVar[int]


class TrackerHeader(ctypes.LittleEndianStructure, LayoutCheck):
    """The header at offset 0; every multi-byte field is naturally aligned."""

    SPEC_SIZE = 256
    _pack_ = 1
    _fields_ = (
        ("magic", ctypes.c_uint8 * 8),
        ("version", ctypes.c_uint32),
        ("header_size", ctypes.c_uint32),
        ("total_size", ctypes.c_uint64),
        # identity
        ("name", ctypes.c_char * NAME_FIELD_SIZE),
        ("addr", ctypes.c_uint64),
        ("region_size", ctypes.c_uint64),
        ("block_size", ctypes.c_uint64),
        ("memory_block_size", ctypes.c_uint64),
        ("first_memory_block", ctypes.c_uint64),
        ("nr_memory_blocks", ctypes.c_uint32),
        ("nr_subblocks", ctypes.c_uint32),
        # seqlock and owner
        ("generation", ctypes.c_uint64),
        ("owner_pid", ctypes.c_uint32),
        ("device_status", ctypes.c_uint16),
        ("broken_code", ctypes.c_uint16),
        # device info, as the device reported it
        ("requested_size", ctypes.c_uint64),
        ("usable_region_size", ctypes.c_uint64),
        ("plugged_size", ctypes.c_uint64),
        ("node_id", ctypes.c_uint32),
        # The virtio-mem feature bits negotiated (bits 0-23, spec 5.15.3).
        ("device_features", ctypes.c_uint32),
        # counters
        ("plugged_bytes", ctypes.c_uint64),
        ("online_bytes", ctypes.c_uint64),
        ("remainder_bytes", ctypes.c_uint64),
        ("retries", ctypes.c_uint64),
        ("requests", ctypes.c_uint64),
        # pending intent
        ("intent_seq", ctypes.c_uint64),
        ("intent_addr", ctypes.c_uint64),
        ("intent_nb_blocks", ctypes.c_uint32),
        ("intent_op", ctypes.c_uint16),
        ("interrupt_mode", ctypes.c_uint16),  # InterruptMode
        ("broken_detail", ctypes.c_char * BROKEN_DETAIL_SIZE),
    )


class BlockRecordLayout(ctypes.LittleEndianStructure, LayoutCheck):
    """One memory block of the region (kernel index = first_memory_block + i)."""

    SPEC_SIZE = 16
    _pack_ = 1
    _fields_ = (
        ("state", ctypes.c_uint8),  # MemoryBlockState
        ("flags", ctypes.c_uint8),  # FLAG_PRESENT
        ("zone", ctypes.c_uint8),  # Zone
        ("pad", ctypes.c_uint8),
        ("plugged_subblocks", ctypes.c_uint32),
        ("node", ctypes.c_int32),  # node the block landed on, NODE_UNKNOWN
        ("reserved", ctypes.c_uint32),
    )


LAYOUTS: tuple[type[LayoutCheck], ...] = (TrackerHeader, BlockRecordLayout)
HEADER_SIZE = ctypes.sizeof(TrackerHeader)
RECORD_SIZE = ctypes.sizeof(BlockRecordLayout)
#: The bytes of a block record in a fresh file: UNPLUGGED, absent, no zone, node unknown.
DEFAULT_RECORD = bytes(BlockRecordLayout(node=NODE_UNKNOWN))
GENERATION = struct.Struct("<Q")
GENERATION_OFFSET: int = TrackerHeader.generation.offset


def write_in_progress(data: bytes) -> bool:
    """Whether a copy of a tracker file was taken inside one of the owner's write
    sections (the seqlock's generation is odd: docs/design.md section 4): a torn
    copy, to be read again. A copy too short to hold the generation is not torn
    but broken, and says False (decoding it raises TrackerError)."""
    if len(data) < GENERATION_OFFSET + GENERATION.size:
        return False
    return bool(GENERATION.unpack_from(data, GENERATION_OFFSET)[0] & 1)


def align(value: int, alignment: int = ARRAY_ALIGNMENT) -> int:
    return -(-value // alignment) * alignment


@dataclasses.dataclass(frozen=True)
class FileLayout:
    """Offsets and sizes of one tracker file, derived from the geometry only."""

    nr_memory_blocks: int
    nr_subblocks: int

    @classmethod
    def of(cls, geometry: Geometry) -> FileLayout:
        return cls(geometry.nr_memory_blocks, geometry.nr_subblocks)

    @property
    def records_offset(self) -> int:
        return align(HEADER_SIZE)

    @property
    def bitmap_offset(self) -> int:
        return align(self.records_offset + self.nr_memory_blocks * RECORD_SIZE)

    @property
    def bitmap_size(self) -> int:
        words = -(-self.nr_subblocks // BITMAP_WORD_BITS)
        return words * BITMAP_WORD_BITS // 8

    @property
    def taken_offset(self) -> int:
        """The taken bitmap: the same size as the plug bitmap, right after it."""
        return self.bitmap_offset + self.bitmap_size

    @property
    def total_size(self) -> int:
        return self.taken_offset + self.bitmap_size


def read_bits(bitmap: bytes | bytearray | mmap.mmap, first: int, count: int) -> int:
    """Bits ``first .. first+count-1`` of ``bitmap`` as an int (bit k = bit first+k)."""
    if count <= 0:
        return 0
    lo, hi = first // 8, (first + count + 7) // 8
    value = int.from_bytes(bitmap[lo:hi], "little") >> (first % 8)
    return value & ((1 << count) - 1)


def popcount(bitmap: bytes | bytearray | mmap.mmap, first: int, count: int) -> int:
    return read_bits(bitmap, first, count).bit_count()


def check_unsigned(what: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise ValueError(f"{what} {value} out of range 0..{limit}")


def broken_code_and_detail(reason: str | BrokenReason) -> tuple[BrokenReason, bytes]:
    if isinstance(reason, BrokenReason):
        return reason, b""
    for code in BrokenReason:
        if reason in (code.name, code.text) and code is not BrokenReason.NONE:
            return code, b""
    detail = reason.encode()[: BROKEN_DETAIL_SIZE - 1]
    return BrokenReason.OTHER, detail.decode(errors="ignore").encode()
