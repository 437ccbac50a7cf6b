"""The shared-memory state tracker (DESIGN.md section 4).

One file per device, ``<state_dir>/<name>.state``, mmap'd and laid out as
little-endian ctypes structures declared once, below, as data::

    +---------------------------+  offset 0
    | TrackerHeader (256 bytes) |  magic, version, sizes, identity, generation,
    |                           |  owner, device info, counters, pending intent
    +---------------------------+  offset HEADER_SIZE (8-byte aligned)
    | BlockRecordLayout[n]      |  one 16-byte record per memory block of the region
    +---------------------------+  8-byte aligned
    | subblock bitmap           |  bit i (byte i // 8, bit i % 8) = device block i
    |                           |  plugged; nr_subblocks bits rounded up to 8 bytes
    +---------------------------+  total_size

Concurrency: exactly one owner (:class:`Tracker`) writes, holding an exclusive
``flock`` on ``<name>.lock`` next to the state file. Readers
(:class:`TrackerReader`) map the file read-only and never lock: every write
happens inside one *write section* that makes ``generation`` odd before the
first byte changes and even again after the last, so a reader that sees the
same even generation before and after copying the file holds a consistent
snapshot (a seqlock). Ordering relies on the CPU keeping stores in program
order as seen by another CPU (x86-64 TSO); each field store is one C-level
copy made by ctypes.

Invariants the owner keeps (checked when a file is reused, raised as
:class:`~vmem_guest.errors.SafetyError` before any change when a transition
would break them):

* ``plugged_subblocks`` of every record equals the bits set over that block;
  its state is UNPLUGGED (no bit), PARTIAL (some), PLUGGED or ONLINE (all).
* An ONLINE block is fully plugged (DESIGN.md 5.1) and nothing under an ONLINE
  block is unplugged (5.2); only ONLINE blocks carry a zone.
* ``plugged_bytes == popcount(bitmap) * block_size`` and
  ``online_bytes == count(ONLINE) * memory_block_size``.

Only :meth:`Tracker._set_block_state` changes a block record (and with it
``online_bytes``); only :meth:`Tracker._write_subblocks` (a range) and
:meth:`Tracker._replace_bitmap` (all of it, on rebuild) change the bitmap, and
with it ``plugged_bytes``.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import enum
import errno
import fcntl
import glob
import logging
import mmap
import os
import re
import stat
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self, TypeVar

from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.errors import SafetyError, TrackerError, TrackerLocked
from vmem_guest.spec import RequestType

#: Where the agent keeps its trackers by default (tmpfs: a reboot clears it).
DEFAULT_STATE_DIR = Path("/run/vmem-guest")
#: The first bytes of every tracker file.
MAGIC = b"VMEMTRK\0"
#: Set-aside (``.bad-*``) files kept per device, the newest ones.
KEEP_SET_ASIDE = 5
#: Bumped whenever the layout changes; a file of another version is set aside.
VERSION = 1
#: ``intent_op`` when no request is pending.
NO_INTENT = 0xFFFF
#: Suffix of state files; the lock file beside each uses LOCK_SUFFIX.
STATE_SUFFIX = ".state"
LOCK_SUFFIX = ".lock"
#: Permissions (DESIGN.md section 4).
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

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")
_E = TypeVar("_E", bound=enum.IntEnum)


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
        return _BROKEN_TEXT[self]


_BROKEN_TEXT: dict[BrokenReason, str] = {
    BrokenReason.NONE: "",
    BrokenReason.DEVICE_ERROR: "device answered ERROR",
    BrokenReason.BAD_RESPONSE: "malformed response",
    BrokenReason.TIMEOUT: "device timeout",
    BrokenReason.BAD_CONFIG: "invalid device config",
    BrokenReason.SAFETY: "safety invariant",
    BrokenReason.OTHER: "other",
}


class _LayoutCheck:
    """Mixin: each layout states its size and the tests pin it."""

    SPEC_SIZE: ClassVar[int]


class TrackerHeader(ctypes.LittleEndianStructure, _LayoutCheck):
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
        ("reserved0", ctypes.c_uint32),
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
        ("reserved1", ctypes.c_uint16),
        ("broken_detail", ctypes.c_char * BROKEN_DETAIL_SIZE),
    )


class BlockRecordLayout(ctypes.LittleEndianStructure, _LayoutCheck):
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


LAYOUTS: tuple[type[_LayoutCheck], ...] = (TrackerHeader, BlockRecordLayout)
HEADER_SIZE = ctypes.sizeof(TrackerHeader)
RECORD_SIZE = ctypes.sizeof(BlockRecordLayout)
_GENERATION = struct.Struct("<Q")
_GENERATION_OFFSET: int = TrackerHeader.generation.offset


# ---------------------------------------------------------------------------
# Public value types


@dataclasses.dataclass(frozen=True)
class TrackerIdentity:
    """Which device a tracker belongs to: its name and its region geometry.

    ``name`` is a PCI address (``0000:00:03.0``) or a simulator name: printable,
    no ``/``, at most NAME_FIELD_SIZE - 1 bytes of UTF-8.
    """

    name: str
    geometry: Geometry

    def __post_init__(self) -> None:
        encoded = self.name.encode()
        if not self.name or len(encoded) >= NAME_FIELD_SIZE:
            raise ValueError(f"tracker name {self.name!r} must be 1..{NAME_FIELD_SIZE - 1} bytes")
        if "/" in self.name or not self.name.isprintable():
            raise ValueError(f"tracker name {self.name!r} must be printable, without '/'")


@dataclasses.dataclass(frozen=True)
class Intent:
    """The request about to be sent (written before it, cleared after its response)."""

    op: RequestType
    addr: int
    nb_blocks: int


@dataclasses.dataclass(frozen=True)
class BlockRecord:
    """One memory block as the tracker holds it; ``index`` is the kernel's."""

    index: int
    state: MemoryBlockState
    present: bool
    zone: Zone
    plugged_subblocks: int
    node: int


@dataclasses.dataclass(frozen=True)
class TrackerSnapshot:
    """A consistent copy of a tracker (one generation). Sizes in bytes.

    ``plugged_size`` is what the device reported; ``plugged_bytes`` is what the
    bitmap holds. ``intent_seq`` counts the intents ever written.
    """

    identity: TrackerIdentity
    generation: int
    owner_pid: int
    requested_size: int
    usable_region_size: int
    plugged_size: int
    node_id: int
    broken: bool
    broken_reason: str
    plugged_bytes: int
    online_bytes: int
    remainder_bytes: int
    retries: int
    requests: int
    intent: Intent | None
    intent_seq: int
    blocks: tuple[BlockRecord, ...]
    bitmap: bytes

    @property
    def geometry(self) -> Geometry:
        return self.identity.geometry

    def is_plugged(self, sb_index: int) -> bool:
        """Whether device block ``sb_index`` (from the region start) is plugged."""
        if not 0 <= sb_index < self.geometry.nr_subblocks:
            raise IndexError(f"subblock {sb_index} outside the region")
        return bool(self.bitmap[sb_index // 8] >> (sb_index % 8) & 1)

    def state_counts(self) -> dict[MemoryBlockState, int]:
        """Memory blocks per state; every state is a key."""
        counts = dict.fromkeys(MemoryBlockState, 0)
        for record in self.blocks:
            counts[record.state] += 1
        return counts

    def block(self, index: int) -> BlockRecord:
        """The record of kernel memory block ``index`` (KeyError if not in the region)."""
        offset = index - self.geometry.first_memory_block
        if not 0 <= offset < len(self.blocks):
            raise KeyError(index)
        return self.blocks[offset]


# ---------------------------------------------------------------------------
# File layout and pure helpers


def _align(value: int, alignment: int = ARRAY_ALIGNMENT) -> int:
    return -(-value // alignment) * alignment


@dataclasses.dataclass(frozen=True)
class _FileLayout:
    """Offsets and sizes of one tracker file, derived from the geometry only."""

    nr_memory_blocks: int
    nr_subblocks: int

    @classmethod
    def of(cls, geometry: Geometry) -> _FileLayout:
        return cls(geometry.nr_memory_blocks, geometry.nr_subblocks)

    @property
    def records_offset(self) -> int:
        return _align(HEADER_SIZE)

    @property
    def bitmap_offset(self) -> int:
        return _align(self.records_offset + self.nr_memory_blocks * RECORD_SIZE)

    @property
    def bitmap_size(self) -> int:
        words = -(-self.nr_subblocks // BITMAP_WORD_BITS)
        return words * BITMAP_WORD_BITS // 8

    @property
    def total_size(self) -> int:
        return self.bitmap_offset + self.bitmap_size


def _read_bits(bitmap: bytes | bytearray | mmap.mmap, first: int, count: int) -> int:
    """Bits ``first .. first+count-1`` of ``bitmap`` as an int (bit k = bit first+k)."""
    if count <= 0:
        return 0
    lo, hi = first // 8, (first + count + 7) // 8
    value = int.from_bytes(bitmap[lo:hi], "little") >> (first % 8)
    return value & ((1 << count) - 1)


def _popcount(bitmap: bytes | bytearray | mmap.mmap, first: int, count: int) -> int:
    return _read_bits(bitmap, first, count).bit_count()


def tracker_path(state_dir: Path, name: str) -> Path:
    """``<state_dir>/<name>.state`` with ``name`` made safe for a file name.

    Letters, digits, ``.``, ``_``, ``:`` and ``-`` are kept; anything else
    (``/`` above all) becomes ``_``; a leading dot is replaced too.
    """
    safe = _NAME_UNSAFE.sub("_", name)
    if not safe or safe.startswith("."):
        safe = "_" + safe[1:] if safe else "_"
    return Path(state_dir) / f"{safe}{STATE_SUFFIX}"


def list_trackers(state_dir: Path = DEFAULT_STATE_DIR) -> list[Path]:
    """The state files in ``state_dir``, sorted; empty if it does not exist."""
    directory = Path(state_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"*{STATE_SUFFIX}") if p.is_file())


def _lock_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name[: -len(STATE_SUFFIX)] + LOCK_SUFFIX)


def _identity_of(header: TrackerHeader) -> TrackerIdentity:
    """The identity a header claims (TrackerError if it cannot be one)."""
    try:
        name = header.name.decode()
        geometry = Geometry(
            addr=header.addr,
            region_size=header.region_size,
            block_size=header.block_size,
            memory_block_size=header.memory_block_size,
        )
        identity = TrackerIdentity(name=name, geometry=geometry)
    except (UnicodeDecodeError, ValueError) as exc:
        raise TrackerError(f"header holds no valid identity: {exc}") from exc
    derived = (geometry.first_memory_block, geometry.nr_memory_blocks, geometry.nr_subblocks)
    stored = (header.first_memory_block, header.nr_memory_blocks, header.nr_subblocks)
    if derived != stored:
        raise TrackerError(f"header block counts {stored} do not match its geometry {derived}")
    return identity


def _check_header(buf: bytes, file_size: int) -> TrackerHeader:
    """The header of ``buf`` if magic, version and sizes hold; TrackerError otherwise."""
    if len(buf) < HEADER_SIZE:
        raise TrackerError(f"truncated: {len(buf)} bytes, header needs {HEADER_SIZE}")
    header = TrackerHeader.from_buffer_copy(buf, 0)
    if bytes(header.magic) != MAGIC:
        raise TrackerError(f"bad magic {bytes(header.magic)!r}")
    if header.version != VERSION:
        raise TrackerError(f"version {header.version}, expected {VERSION}")
    if header.header_size != HEADER_SIZE:
        raise TrackerError(f"header size {header.header_size}, expected {HEADER_SIZE}")
    expected = _FileLayout(header.nr_memory_blocks, header.nr_subblocks).total_size
    if header.total_size != expected or file_size != expected:
        raise TrackerError(
            f"size mismatch: header says {header.total_size}, file has {file_size}, "
            f"layout needs {expected}"
        )
    return header


def _check_name(path: Path, header: TrackerHeader) -> None:
    """TrackerError unless ``path`` is where the device named in ``header`` keeps its file."""
    name = bytes(header.name).split(b"\0", 1)[0].decode(errors="replace")
    if tracker_path(path.parent, name).name != path.name:
        raise TrackerError(f"holds the tracker of another device, {name!r} (copied or renamed)")


def _enum_or_error(kind: type[_E], value: int, what: str) -> _E:
    try:
        return kind(value)
    except ValueError as exc:
        raise TrackerError(f"{what}: {value} is not a {kind.__name__}") from exc


def _decode_records(buf: bytes, layout: _FileLayout, first_index: int) -> tuple[BlockRecord, ...]:
    array = (BlockRecordLayout * layout.nr_memory_blocks).from_buffer_copy(
        buf, layout.records_offset
    )
    records = []
    for offset, raw in enumerate(array):
        index = first_index + offset
        if raw.flags & ~KNOWN_FLAGS:
            raise TrackerError(f"memory{index}: unknown flags {raw.flags:#x}")
        records.append(
            BlockRecord(
                index=index,
                state=_enum_or_error(MemoryBlockState, raw.state, f"memory{index} state"),
                present=bool(raw.flags & FLAG_PRESENT),
                zone=_enum_or_error(Zone, raw.zone, f"memory{index} zone"),
                plugged_subblocks=raw.plugged_subblocks,
                node=raw.node,
            )
        )
    return tuple(records)


def _decode_intent(header: TrackerHeader) -> Intent | None:
    if header.intent_op == NO_INTENT:
        return None
    op = _enum_or_error(RequestType, header.intent_op, "intent op")
    return Intent(op=op, addr=header.intent_addr, nb_blocks=header.intent_nb_blocks)


def _broken_reason(header: TrackerHeader) -> str:
    if header.device_status != DeviceStatus.BROKEN:
        return ""
    detail = header.broken_detail.decode(errors="replace")
    code = _enum_or_error(BrokenReason, header.broken_code, "broken code")
    return detail or code.text


def _decode(buf: bytes) -> TrackerSnapshot:
    """A snapshot of a whole-file copy ``buf``; TrackerError if it does not decode."""
    header = _check_header(buf, len(buf))
    identity = _identity_of(header)
    layout = _FileLayout.of(identity.geometry)
    _enum_or_error(DeviceStatus, header.device_status, "device status")
    bitmap_end = layout.bitmap_offset + layout.bitmap_size
    return TrackerSnapshot(
        identity=identity,
        generation=header.generation,
        owner_pid=header.owner_pid,
        requested_size=header.requested_size,
        usable_region_size=header.usable_region_size,
        plugged_size=header.plugged_size,
        node_id=header.node_id,
        broken=header.device_status == DeviceStatus.BROKEN,
        broken_reason=_broken_reason(header),
        plugged_bytes=header.plugged_bytes,
        online_bytes=header.online_bytes,
        remainder_bytes=header.remainder_bytes,
        retries=header.retries,
        requests=header.requests,
        intent=_decode_intent(header),
        intent_seq=header.intent_seq,
        blocks=_decode_records(buf, layout, identity.geometry.first_memory_block),
        bitmap=bytes(buf[layout.bitmap_offset : bitmap_end]),
    )


def _expected_state(plugged: int, total: int) -> MemoryBlockState:
    """The state a non-ONLINE block with ``plugged`` of ``total`` subblocks has."""
    if plugged == 0:
        return MemoryBlockState.UNPLUGGED
    if plugged < total:
        return MemoryBlockState.PARTIAL
    return MemoryBlockState.PLUGGED


def consistency_problem(snap: TrackerSnapshot) -> str | None:
    """The first broken invariant of ``snap`` (module docstring), or None.

    Used to vet a file before reuse; tests and fuzzers call it too.
    """
    geometry = snap.geometry
    for record in snap.blocks:
        subblocks = geometry.subblocks_of(record.index)
        plugged = _popcount(snap.bitmap, subblocks.start, len(subblocks))
        if record.plugged_subblocks != plugged:
            return (
                f"memory{record.index}: record says {record.plugged_subblocks} subblocks "
                f"plugged, bitmap {plugged}"
            )
        if record.state is MemoryBlockState.ONLINE:
            if plugged != len(subblocks):
                return f"memory{record.index} is ONLINE but not fully plugged"
            if record.zone is Zone.NONE:
                return f"memory{record.index} is ONLINE without a zone"
        elif record.state is not _expected_state(plugged, len(subblocks)):
            return f"memory{record.index}: state {record.state.name} with {plugged} plugged"
        elif record.zone is not Zone.NONE:
            return f"memory{record.index} is {record.state.name} with zone {record.zone.name}"
    spare_bits = int.from_bytes(snap.bitmap, "little") >> geometry.nr_subblocks
    if spare_bits:
        return "bitmap has bits set beyond the region"
    plugged_bytes = int.from_bytes(snap.bitmap, "little").bit_count() * geometry.block_size
    if snap.plugged_bytes != plugged_bytes:
        return f"plugged_bytes {snap.plugged_bytes}, bitmap holds {plugged_bytes}"
    online = snap.state_counts()[MemoryBlockState.ONLINE] * geometry.memory_block_size
    if snap.online_bytes != online:
        return f"online_bytes {snap.online_bytes}, records hold {online}"
    return None


def _fresh_image(identity: TrackerIdentity) -> bytes:
    """The bytes of a new tracker: every block UNPLUGGED, nothing pending."""
    geometry = identity.geometry
    layout = _FileLayout.of(geometry)
    header = TrackerHeader(
        version=VERSION,
        header_size=HEADER_SIZE,
        total_size=layout.total_size,
        name=identity.name.encode(),
        addr=geometry.addr,
        region_size=geometry.region_size,
        block_size=geometry.block_size,
        memory_block_size=geometry.memory_block_size,
        first_memory_block=geometry.first_memory_block,
        nr_memory_blocks=geometry.nr_memory_blocks,
        nr_subblocks=geometry.nr_subblocks,
        intent_op=NO_INTENT,
    )
    header.magic[:] = MAGIC
    image = bytearray(layout.total_size)
    image[:HEADER_SIZE] = bytes(header)
    record = bytes(BlockRecordLayout(node=NODE_UNKNOWN))
    for i in range(layout.nr_memory_blocks):
        start = layout.records_offset + i * RECORD_SIZE
        image[start : start + RECORD_SIZE] = record
    return bytes(image)


def _untrusted_reason(st: os.stat_result) -> str | None:
    """Why a file with ``st`` must not be trusted, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if os.geteuid() == 0:
        if st.st_uid != 0:
            return f"owned by uid {st.st_uid}, not root"
        if st.st_mode & stat.S_IWOTH:
            return "world-writable"
    return None


def _read_all(fd: int, size: int) -> bytes:
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------
# The owner


class Tracker:
    """The owner of one tracker file: the only writer (exclusive flock).

    Every transition is one write section (generation odd during it, even
    after), keeps ``plugged_bytes`` and ``online_bytes`` exact, logs at debug,
    and raises SafetyError before changing anything when it would break an
    invariant of the module docstring.
    """

    path: Path
    identity: TrackerIdentity
    recovered: bool
    discarded_reason: str | None
    set_aside_path: Path | None

    def __init__(
        self,
        path: Path,
        identity: TrackerIdentity,
        lock_fd: int,
        mapping: mmap.mmap,
    ) -> None:
        """Use :meth:`open`; this wires an already locked and mapped file."""
        self.path = path
        self.identity = identity
        self.recovered = False
        self.discarded_reason = None
        self.set_aside_path = None
        self._log = logging.getLogger(f"vmem_guest.tracker.{identity.name}")
        self._layout = _FileLayout.of(identity.geometry)
        self._snapshot_cache: TrackerSnapshot | None = None
        self._lock_fd: int | None = lock_fd
        self._map: mmap.mmap | None = mapping
        self._header: TrackerHeader | None = TrackerHeader.from_buffer(mapping, 0)
        records_type = BlockRecordLayout * self._layout.nr_memory_blocks
        self._records: ctypes.Array[BlockRecordLayout] | None = records_type.from_buffer(
            mapping, self._layout.records_offset
        )

    # -- opening and closing ------------------------------------------------

    @classmethod
    def open(cls, state_dir: Path, identity: TrackerIdentity) -> Tracker:
        """Lock, then reuse a valid tracker file for ``identity`` or start a fresh one.

        A file that fails validation is renamed to ``<file>.bad-<timestamp>``
        (``set_aside_path``), the reason logged and kept in ``discarded_reason``,
        and a fresh tracker (all UNPLUGGED, no intent) replaces it. ``recovered``
        tells whether the old state was kept. TrackerLocked if another open
        tracker (in any process) holds the lock.
        """
        state_dir = Path(state_dir)
        _make_state_dir(state_dir)
        path = tracker_path(state_dir, identity.name)
        lock_fd = _take_lock(_lock_path(path))
        try:
            return cls._open_locked(path, identity, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(cls, path: Path, identity: TrackerIdentity, lock_fd: int) -> Tracker:
        log = logging.getLogger(f"vmem_guest.tracker.{identity.name}")
        mapping, reason = _map_existing(path, identity)
        aside: Path | None = None
        if mapping is None and reason is not None:
            aside = _set_aside(path)
            log.warning("tracker %s set aside as %s: %s", path, aside.name, reason)
        reused = mapping is not None
        if mapping is None:
            mapping = _create_fresh(path, identity)
        tracker = cls(path, identity, lock_fd, mapping)
        tracker.recovered = reused
        tracker.discarded_reason = reason
        tracker.set_aside_path = aside
        tracker._claim()
        return tracker

    def _claim(self) -> None:
        """Record this process as the owner (one write section)."""
        with self._write_section() as header:
            header.owner_pid = os.getpid()
        self._log.debug(
            "opened %s (recovered=%s, generation %d)", self.path, self.recovered, self.generation
        )

    def close(self) -> None:
        """Unmap and unlock; safe to call more than once."""
        self._header = None
        self._records = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                # A record view still lives (say in a traceback); the mapping goes
                # when it does. Nothing writes through it any more.
                self._log.debug("mapping of %s still referenced; unmapped later", self.path)
            self._map = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- reading ------------------------------------------------------------

    @property
    def geometry(self) -> Geometry:
        return self.identity.geometry

    @property
    def generation(self) -> int:
        return int(self._hdr.generation)

    def snapshot(self) -> TrackerSnapshot:
        """A copy of the current state (the owner needs no seqlock retry).

        Every change goes through this object and bumps the generation, so a
        snapshot of the same generation is still exact: decode once per change.
        """
        generation = self.generation
        cached = self._snapshot_cache
        if cached is None or cached.generation != generation:
            cached = self._snapshot_cache = _decode(self._mapped[:])
        return cached

    def block(self, index: int) -> BlockRecord:
        """The record of kernel memory block ``index`` without a full snapshot."""
        raw = self._record(index)
        return BlockRecord(
            index=index,
            state=MemoryBlockState(raw.state),
            present=bool(raw.flags & FLAG_PRESENT),
            zone=Zone(raw.zone),
            plugged_subblocks=raw.plugged_subblocks,
            node=raw.node,
        )

    # -- transitions: intent ------------------------------------------------

    def set_intent(self, op: RequestType, addr: int, nb_blocks: int) -> None:
        """Record the request about to be sent; bumps ``intent_seq``.

        PLUG/UNPLUG/STATE need an aligned range inside the region; UNPLUG_ALL
        takes addr 0 and nb_blocks 0. SafetyError for an UNPLUG over an ONLINE
        block or an UNPLUG_ALL while any block is ONLINE (DESIGN.md 5.2).
        """
        op = RequestType(op)
        if op is RequestType.UNPLUG_ALL:
            if addr or nb_blocks:
                raise SafetyError("UNPLUG_ALL intent takes no range", addr=addr)
            self._refuse_if_any_online("UNPLUG_ALL")
        else:
            first = self._check_range(addr, nb_blocks)
            if op is RequestType.UNPLUG:
                self._refuse_if_online_over(first, nb_blocks, "unplug")
        with self._write_section() as header:
            header.intent_seq += 1
            header.intent_addr = addr
            header.intent_nb_blocks = nb_blocks
            header.intent_op = op
        self._log.debug("intent %s addr=%#x nb_blocks=%d", op.name, addr, nb_blocks)

    def clear_intent(self) -> None:
        """No request pending any more (its response has been applied)."""
        with self._write_section() as header:
            header.intent_op = NO_INTENT
            header.intent_addr = 0
            header.intent_nb_blocks = 0
        self._log.debug("intent cleared")

    # -- transitions: plug state --------------------------------------------

    def record_plugged(self, addr: int, nb_blocks: int) -> None:
        """The device ACKed a PLUG of ``nb_blocks`` device blocks at ``addr``.

        SafetyError if the range leaves the region or any block in it is
        already plugged.
        """
        first = self._check_range(addr, nb_blocks)
        if _read_bits(self._mapped, self._bit(first), nb_blocks):
            raise SafetyError("plug over already plugged subblocks", addr=addr)
        with self._write_section():
            self._write_subblocks(first, nb_blocks, plugged=True)
            self._refresh_blocks(first, nb_blocks)
        self._log.debug("plugged addr=%#x nb_blocks=%d", addr, nb_blocks)

    def record_unplugged(self, addr: int, nb_blocks: int) -> None:
        """The device ACKed an UNPLUG of ``nb_blocks`` device blocks at ``addr``.

        SafetyError if the range leaves the region, any block in it is not
        plugged, or any memory block over it is ONLINE (DESIGN.md 5.2).
        """
        first = self._check_range(addr, nb_blocks)
        self._refuse_if_online_over(first, nb_blocks, "unplug")
        mask = (1 << nb_blocks) - 1
        if _read_bits(self._mapped, self._bit(first), nb_blocks) != mask:
            raise SafetyError("unplug over subblocks not plugged", addr=addr)
        with self._write_section():
            self._write_subblocks(first, nb_blocks, plugged=False)
            self._refresh_blocks(first, nb_blocks)
        self._log.debug("unplugged addr=%#x nb_blocks=%d", addr, nb_blocks)

    def record_unplug_all(self) -> None:
        """The device ACKed UNPLUG_ALL: nothing plugged; ``present`` flags stay.

        SafetyError if any block is ONLINE.
        """
        self._refuse_if_any_online("UNPLUG_ALL")
        nr_subblocks = self.geometry.nr_subblocks
        with self._write_section():
            self._write_subblocks(0, nr_subblocks, plugged=False)
            for index in self.geometry.memory_blocks():
                self._set_block_state(
                    index, MemoryBlockState.UNPLUGGED, plugged_subblocks=0, zone=Zone.NONE
                )
        self._log.debug("unplugged all")

    # -- transitions: kernel state ------------------------------------------

    def record_present(self, index: int) -> None:
        """Memory block ``index`` was probed (added) in the kernel.

        SafetyError unless it is fully plugged (PLUGGED or ONLINE): DESIGN.md
        5.5, ``probe`` only over fully plugged memory blocks.
        """
        state = self._state(index)
        if state not in (MemoryBlockState.PLUGGED, MemoryBlockState.ONLINE):
            raise SafetyError(
                f"memory{index} is {state.name}: probe needs it fully plugged", block=index
            )
        with self._write_section():
            self._set_block_state(index, state, present=True)

    def record_online(self, index: int, zone: Zone, node: int = NODE_UNKNOWN) -> None:
        """Memory block ``index`` was onlined into ``zone`` (and is present).

        SafetyError unless it is PLUGGED (fully plugged, not yet online).
        """
        zone = Zone(zone)
        if zone is Zone.NONE:
            raise ValueError("an online block needs a zone (AUTO if the kernel chose)")
        state = self._state(index)
        if state is not MemoryBlockState.PLUGGED:
            raise SafetyError(
                f"memory{index} is {state.name}: only a PLUGGED block goes online", block=index
            )
        with self._write_section():
            self._set_block_state(
                index, MemoryBlockState.ONLINE, zone=zone, present=True, node=node
            )

    def record_offline(self, index: int) -> None:
        """Memory block ``index`` was offlined: back to PLUGGED, no zone.

        SafetyError unless it is ONLINE.
        """
        state = self._state(index)
        if state is not MemoryBlockState.ONLINE:
            raise SafetyError(
                f"memory{index} is {state.name}, not ONLINE: cannot offline", block=index
            )
        with self._write_section():
            self._set_block_state(index, MemoryBlockState.PLUGGED, zone=Zone.NONE, present=True)

    def rebuild_from_states(
        self,
        plugged: Iterable[int],
        online: Mapping[int, Zone],
        present: Iterable[int],
    ) -> None:
        """Replace the bitmap and every record with observed truth, in one write section.

        ``plugged``: subblock indices the device reported plugged (STATE);
        ``online`` (block index -> zone) and ``present``: memory block indices
        from sysfs (online implies present). Nodes stay for blocks still present.
        The intent and the device info are left alone. SafetyError, before any
        change, if an index is outside the region or an online block is not
        fully plugged.
        """
        geometry = self.geometry
        bitmap = self._bitmap_of(plugged)
        online_zones = {index: Zone(zone) for index, zone in online.items()}
        present_set = set(present) | set(online_zones)
        for index in present_set:
            self._check_index(index)
        for index, zone in online_zones.items():
            subblocks = geometry.subblocks_of(index)
            if _popcount(bitmap, subblocks.start, len(subblocks)) != len(subblocks):
                raise SafetyError(f"memory{index} is online but not fully plugged", block=index)
            if zone is Zone.NONE:
                raise ValueError(f"memory{index} online without a zone (use AUTO)")
        with self._write_section():
            self._replace_bitmap(bitmap)
            for index in geometry.memory_blocks():
                self._rebuild_block(index, online_zones.get(index), index in present_set)
        self._log.debug(
            "rebuilt: %d subblocks plugged, %d blocks online, %d present",
            self._hdr.plugged_bytes // geometry.block_size,
            len(online_zones),
            len(present_set),
        )

    # -- transitions: device info and counters ------------------------------

    def set_device_info(
        self, *, requested_size: int, usable_region_size: int, plugged_size: int, node_id: int
    ) -> None:
        """Store the device's config as last read (sizes in bytes)."""
        for what, value, limit in (
            ("requested_size", requested_size, U64_MAX),
            ("usable_region_size", usable_region_size, U64_MAX),
            ("plugged_size", plugged_size, U64_MAX),
            ("node_id", node_id, U32_MAX),
        ):
            _check_unsigned(what, value, limit)
        with self._write_section() as header:
            header.requested_size = requested_size
            header.usable_region_size = usable_region_size
            header.plugged_size = plugged_size
            header.node_id = node_id
        self._log.debug(
            "device info requested=%#x usable=%#x plugged=%#x node=%d",
            requested_size,
            usable_region_size,
            plugged_size,
            node_id,
        )

    def set_broken(self, reason: str | BrokenReason) -> None:
        """Mark the device broken (stop touching it). ``reason`` is a BrokenReason
        or free text; text is kept (truncated to fit) with code OTHER unless it
        names a BrokenReason.
        """
        code, detail = _broken_code_and_detail(reason)
        with self._write_section() as header:
            header.device_status = DeviceStatus.BROKEN
            header.broken_code = code
            header.broken_detail = detail
        self._log.debug("device broken: %s", reason)

    def clear_broken(self) -> None:
        with self._write_section() as header:
            header.device_status = DeviceStatus.OK
            header.broken_code = BrokenReason.NONE
            header.broken_detail = b""
        self._log.debug("device no longer broken")

    def set_remainder(self, nbytes: int) -> None:
        """The part of ``requested_size`` the guest cannot use (not plugged)."""
        _check_unsigned("remainder", nbytes, U64_MAX)
        with self._write_section() as header:
            header.remainder_bytes = nbytes
        self._log.debug("remainder %#x", nbytes)

    def count_retry(self) -> None:
        with self._write_section() as header:
            header.retries += 1
        self._log.debug("retry")

    def count_requests(self, n: int) -> None:
        """Add ``n`` requests sent to the device."""
        _check_unsigned("request count", n, U64_MAX)
        with self._write_section() as header:
            header.requests += n
        self._log.debug("requests +%d", n)

    # -- the only places that change state ------------------------------------

    @contextlib.contextmanager
    def _write_section(self) -> Iterator[TrackerHeader]:
        """Make ``generation`` odd for the duration, even after: readers retry meanwhile."""
        header = self._hdr
        header.generation += 1
        try:
            yield header
        finally:
            header.generation += 1

    def _set_block_state(
        self,
        index: int,
        state: MemoryBlockState,
        *,
        plugged_subblocks: int | None = None,
        zone: Zone | None = None,
        present: bool | None = None,
        node: int | None = None,
    ) -> None:
        """The one function that writes a block record; it keeps ``online_bytes``.

        Called inside a write section, after the caller checked the invariants.
        A keyword left None keeps the record's current value.
        """
        header = self._hdr
        if not header.generation & 1:
            raise RuntimeError("block state changed outside a write section")
        raw = self._record(index)
        old_state = MemoryBlockState(raw.state)
        old_present = bool(raw.flags & FLAG_PRESENT)
        old_zone = Zone(raw.zone)
        plugged_subblocks = (
            raw.plugged_subblocks if plugged_subblocks is None else plugged_subblocks
        )
        zone = old_zone if zone is None else zone
        present = old_present if present is None else present
        was_online = old_state is MemoryBlockState.ONLINE
        is_online = state is MemoryBlockState.ONLINE
        if is_online and not was_online:
            header.online_bytes += self.geometry.memory_block_size
        elif was_online and not is_online:
            header.online_bytes -= self.geometry.memory_block_size
        raw.state = state
        raw.flags = (raw.flags & ~FLAG_PRESENT) | (FLAG_PRESENT if present else 0)
        raw.zone = zone
        raw.plugged_subblocks = plugged_subblocks
        if node is not None:
            raw.node = node
        if (old_state, old_present, old_zone) != (state, present, zone):
            self._log.debug(
                "memory%d %s -> %s (present=%s zone=%s plugged_subblocks=%d)",
                index,
                old_state.name,
                state.name,
                present,
                zone.name,
                plugged_subblocks,
            )

    def _write_subblocks(self, first: int, count: int, *, plugged: bool) -> None:
        """Set or clear bitmap bits ``first .. first+count-1``; keeps ``plugged_bytes``.

        Called inside a write section with bits the caller checked are all clear
        (plug) or may be in any state (clearing counts what was set).
        """
        if count <= 0:
            return
        mapping = self._mapped
        bit = self._bit(first)
        lo, hi = bit // 8, (bit + count + 7) // 8
        shift = bit % 8
        mask = ((1 << count) - 1) << shift
        word = int.from_bytes(mapping[lo:hi], "little")
        changed = (mask & ~word) if plugged else (mask & word)
        word = (word | mask) if plugged else (word & ~mask)
        mapping[lo:hi] = word.to_bytes(hi - lo, "little")
        delta = changed.bit_count() * self.geometry.block_size
        header = self._hdr
        header.plugged_bytes += delta if plugged else -delta

    def _replace_bitmap(self, bitmap: bytes) -> None:
        """Store a whole new bitmap (``bitmap_size`` bytes); sets ``plugged_bytes`` to match.

        Called inside a write section with a bitmap built by :meth:`_bitmap_of`.
        """
        start = self._layout.bitmap_offset
        self._mapped[start : start + len(bitmap)] = bitmap
        popcount = int.from_bytes(bitmap, "little").bit_count()
        self._hdr.plugged_bytes = popcount * self.geometry.block_size

    def _refresh_blocks(self, first: int, count: int) -> None:
        """Recompute plugged_subblocks and state of the blocks over subblocks
        ``first .. first+count-1`` (none of them ONLINE: checked by the caller)."""
        geometry = self.geometry
        touched = range(
            geometry.subblock_addr(first) // geometry.memory_block_size,
            -(-geometry.subblock_addr(first + count) // geometry.memory_block_size),
        )
        for index in touched:
            if geometry.contains_memory_block(index):
                plugged, total = self._count_plugged(index)
                self._set_block_state(
                    index,
                    _expected_state(plugged, total),
                    plugged_subblocks=plugged,
                    zone=Zone.NONE,
                )

    def _rebuild_block(self, index: int, zone: Zone | None, present: bool) -> None:
        """Set block ``index`` from the (already rebuilt) bitmap and the kernel's view."""
        plugged, total = self._count_plugged(index)
        if zone is not None:
            state = MemoryBlockState.ONLINE
        else:
            state, zone = _expected_state(plugged, total), Zone.NONE
        self._set_block_state(
            index,
            state,
            plugged_subblocks=plugged,
            zone=zone,
            present=present,
            node=None if present else NODE_UNKNOWN,
        )

    def _count_plugged(self, index: int) -> tuple[int, int]:
        """(plugged, total) subblocks of memory block ``index`` per the bitmap."""
        subblocks = self.geometry.subblocks_of(index)
        plugged = _popcount(self._mapped, self._bit(subblocks.start), len(subblocks))
        return plugged, len(subblocks)

    # -- checks and accessors -----------------------------------------------

    @property
    def _mapped(self) -> mmap.mmap:
        if self._map is None:
            raise TrackerError(f"tracker {self.path} is closed")
        return self._map

    @property
    def _hdr(self) -> TrackerHeader:
        if self._header is None:
            raise TrackerError(f"tracker {self.path} is closed")
        return self._header

    def _bit(self, sb_index: int) -> int:
        """Absolute bit offset in the mapping of subblock ``sb_index``."""
        return self._layout.bitmap_offset * 8 + sb_index

    def _check_index(self, index: int) -> None:
        if not self.geometry.contains_memory_block(index):
            raise SafetyError(f"memory{index} is not inside the device region", block=index)

    def _state(self, index: int) -> MemoryBlockState:
        return MemoryBlockState(self._record(index).state)

    def _record(self, index: int) -> BlockRecordLayout:
        self._check_index(index)
        if self._records is None:
            raise TrackerError(f"tracker {self.path} is closed")
        record: BlockRecordLayout = self._records[index - self.geometry.first_memory_block]
        return record

    def _check_range(self, addr: int, nb_blocks: int) -> int:
        """Index of the first subblock of an aligned, non-empty range inside the region."""
        geometry = self.geometry
        if addr % geometry.block_size:
            raise SafetyError(f"address {addr:#x} is not aligned to the block size", addr=addr)
        if not 0 < nb_blocks <= U32_MAX:
            raise SafetyError(f"bad block count {nb_blocks}", addr=addr)
        end = addr + nb_blocks * geometry.block_size
        if addr < geometry.addr or end > geometry.end:
            raise SafetyError(
                f"range {addr:#x}+{nb_blocks} blocks leaves the region "
                f"[{geometry.addr:#x}, {geometry.end:#x})",
                addr=addr,
            )
        return geometry.subblock_index(addr)

    def _bitmap_of(self, subblocks: Iterable[int]) -> bytes:
        """A bitmap image with exactly ``subblocks`` set; SafetyError for one outside."""
        nr_subblocks = self.geometry.nr_subblocks
        bitmap = bytearray(self._layout.bitmap_size)
        for sb_index in subblocks:
            if not 0 <= sb_index < nr_subblocks:
                raise SafetyError(f"subblock {sb_index} outside the region")
            bitmap[sb_index // 8] |= 1 << (sb_index % 8)
        return bytes(bitmap)

    def _refuse_if_online_over(self, first: int, count: int, what: str) -> None:
        """SafetyError if any memory block overlapping subblocks first..first+count-1 is ONLINE."""
        geometry = self.geometry
        lo = geometry.subblock_addr(first) // geometry.memory_block_size
        hi = -(-geometry.subblock_addr(first + count) // geometry.memory_block_size)
        for index in range(lo, hi):
            if not geometry.contains_memory_block(index):
                continue
            if self._state(index) is MemoryBlockState.ONLINE:
                raise SafetyError(
                    f"{what} over memory{index}, which is ONLINE",
                    block=index,
                    addr=geometry.subblock_addr(first),
                )

    def _refuse_if_any_online(self, what: str) -> None:
        if self._hdr.online_bytes:
            raise SafetyError(f"{what} while memory blocks are ONLINE")


# ---------------------------------------------------------------------------
# Opening helpers (owner side)


def _make_state_dir(state_dir: Path) -> None:
    """Create ``state_dir`` (mode STATE_DIR_MODE) unless it exists."""
    try:
        state_dir.mkdir(parents=True)
    except FileExistsError:
        if not state_dir.is_dir():
            raise TrackerError(f"{state_dir} exists and is not a directory") from None
        return
    os.chmod(state_dir, STATE_DIR_MODE)


def _take_lock(lock_path: Path) -> int:
    """An fd holding the exclusive flock of ``lock_path``; TrackerLocked if held."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(lock_path, flags, STATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f" by pid {holder}" if holder else ""
        raise TrackerLocked(
            f"tracker {lock_path.with_suffix(STATE_SUFFIX)} is locked{who}",
            path=str(lock_path),
            holder_pid=holder,
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _map_existing(path: Path, identity: TrackerIdentity) -> tuple[mmap.mmap | None, str | None]:
    """The mapping of a valid existing file, or (None, why it was rejected).

    (None, None) when there is no file at all.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "is a symbolic link"
        return None, f"cannot open: {exc.strerror}"
    try:
        st = os.fstat(fd)
        reason = _untrusted_reason(st) or _validation_problem(
            _read_all(fd, st.st_size), st.st_size, identity
        )
        if reason is not None:
            return None, reason
        return mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE), None
    finally:
        os.close(fd)


def _validation_problem(buf: bytes, file_size: int, identity: TrackerIdentity) -> str | None:
    """Why the file content ``buf`` cannot be reused for ``identity``, or None."""
    try:
        _check_header(buf, file_size)
        snap = _decode(buf)
    except TrackerError as exc:
        return exc.message
    if snap.identity != identity:
        return f"identity mismatch: file is for {snap.identity}, wanted {identity}"
    if snap.generation & 1:
        return f"interrupted write (generation {snap.generation} is odd)"
    return consistency_problem(snap)


def _set_aside(path: Path) -> Path:
    """Rename ``path`` to a fresh ``<name>.bad-<UTC timestamp>[-n]`` beside it.

    Only the newest :data:`KEEP_SET_ASIDE` of a device's set-aside files are
    kept (enough to look into a problem; a crash loop must not fill /run).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.bad-{stamp}")
    attempt = 1
    while aside.exists() or aside.is_symlink():
        attempt += 1
        aside = path.with_name(f"{path.name}.bad-{stamp}-{attempt}")
    os.rename(path, aside)
    _prune_set_aside(path, keep=aside)
    return aside


def _prune_set_aside(path: Path, keep: Path) -> None:
    """Remove all but the newest KEEP_SET_ASIDE ``<name>.bad-*`` files (``keep`` stays)."""
    older = [p for p in path.parent.glob(f"{glob.escape(path.name)}.bad-*") if p != keep]
    older.sort(key=lambda p: (p.lstat().st_mtime_ns, p.name))
    for stale in older[: max(0, len(older) - (KEEP_SET_ASIDE - 1))]:
        with contextlib.suppress(OSError):  # gone already, or not a file: leave it
            stale.unlink()


def _create_fresh(path: Path, identity: TrackerIdentity) -> mmap.mmap:
    """Write a fresh tracker under a temporary name, map it, then rename it into place.

    Readers therefore never see a half-initialised file.
    """
    image = _fresh_image(identity)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, STATE_FILE_MODE)
    try:
        os.fchmod(fd, STATE_FILE_MODE)
        os.ftruncate(fd, len(image))
        os.pwrite(fd, image, 0)
        mapping = mmap.mmap(fd, len(image), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        os.close(fd)
    return mapping


def _check_unsigned(what: str, value: int, limit: int) -> None:
    if not 0 <= value <= limit:
        raise ValueError(f"{what} {value} out of range 0..{limit}")


def _broken_code_and_detail(reason: str | BrokenReason) -> tuple[BrokenReason, bytes]:
    if isinstance(reason, BrokenReason):
        return reason, b""
    for code in BrokenReason:
        if reason in (code.name, code.text) and code is not BrokenReason.NONE:
            return code, b""
    detail = reason.encode()[: BROKEN_DETAIL_SIZE - 1]
    return BrokenReason.OTHER, detail.decode(errors="ignore").encode()


# ---------------------------------------------------------------------------
# Readers


class TrackerReader:
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
                untrusted = _untrusted_reason(st)
                if untrusted is not None:
                    raise TrackerError(f"not trusted: {untrusted}")
                header = _check_header(os.pread(fd, HEADER_SIZE, 0), size)
                _check_name(path, header)
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
            before = _GENERATION.unpack_from(mapping, _GENERATION_OFFSET)[0]
            if not before & 1:
                copy = mapping[:]
                after = _GENERATION.unpack_from(mapping, _GENERATION_OFFSET)[0]
                if before == after:
                    try:
                        return _decode(copy)
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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
