"""Value types of a tracker, decoding a whole-file copy, and the consistency check.

A :class:`TrackerSnapshot` is one generation of a file, decoded whole: what
readers (``vmem-guest status``), recovery and the tests use. The owner never
decodes per step; it keeps a :class:`~vmem_guest.tracker.state.RegionState`.

Invariants of a file (checked by :func:`consistency_problem` when a file is
reused, and by the fuzzers after every step):

* ``plugged_subblocks`` of every record equals the bits set over that block;
  a block that is not ONLINE is UNPLUGGED (no bit), PARTIAL (some) or PLUGGED (all).
* Every subblock of an ONLINE block is plugged or taken (docs/design.md,
  invariant 1: an unplugged one is a hole whose pages were verified poisoned);
  only ONLINE blocks carry a zone and taken bits.
* ``plugged_bytes == popcount(bitmap) * block_size`` and
  ``online_bytes == count(ONLINE) * memory_block_size``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TypeVar

from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.device import Binding, InterruptMode
from vmem_guest.errors import TrackerError
from vmem_guest.spec import RequestType
from vmem_guest.tracker.layout import (
    DEFAULT_RECORD,
    FLAG_PRESENT,
    HEADER_SIZE,
    KNOWN_FLAGS,
    MAGIC,
    NAME_FIELD_SIZE,
    NO_INTENT,
    NODE_UNKNOWN,
    RECORD_SIZE,
    VERSION,
    BlockRecordLayout,
    BrokenReason,
    DeviceStatus,
    FileLayout,
    TrackerHeader,
    popcount,
    read_bits,
)
from vmem_guest.tracker.state import RegionState, nonzero_bit_spans

_E = TypeVar("_E", bound=enum.IntEnum)


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
    #: The virtio-mem feature bits negotiated, and how interrupts arrive.
    device_features: int
    interrupt_mode: InterruptMode
    #: Which driver handed the function over (vfio type1, vfio noiommu, uio).
    binding: Binding
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
    #: The taken bitmap (layout.py): subblocks of online blocks taken out of use.
    taken: bytes

    @property
    def geometry(self) -> Geometry:
        return self.identity.geometry

    def is_plugged(self, sb_index: int) -> bool:
        """Whether device block ``sb_index`` (from the region start) is plugged."""
        if not 0 <= sb_index < self.geometry.nr_subblocks:
            raise IndexError(f"subblock {sb_index} outside the region")
        return bool(self.bitmap[sb_index // 8] >> (sb_index % 8) & 1)

    def is_taken(self, sb_index: int) -> bool:
        """Whether the pages of subblock ``sb_index`` are taken (or being taken) out of use."""
        if not 0 <= sb_index < self.geometry.nr_subblocks:
            raise IndexError(f"subblock {sb_index} outside the region")
        return bool(self.taken[sb_index // 8] >> (sb_index % 8) & 1)

    @property
    def hole_bytes(self) -> int:
        """Bytes of online blocks taken out of use and unplugged (holes)."""
        plugged = int.from_bytes(self.bitmap, "little")
        holes = int.from_bytes(self.taken, "little") & ~plugged
        return holes.bit_count() * self.geometry.block_size

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


def identity_of(header: TrackerHeader) -> TrackerIdentity:
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


def check_header(buf: bytes, file_size: int) -> TrackerHeader:
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
    expected = FileLayout(header.nr_memory_blocks, header.nr_subblocks).total_size
    if header.total_size != expected or file_size != expected:
        raise TrackerError(
            f"size mismatch: header says {header.total_size}, file has {file_size}, "
            f"layout needs {expected}"
        )
    return header


def enum_or_error(kind: type[_E], value: int, what: str) -> _E:
    try:
        return kind(value)
    except ValueError as exc:
        raise TrackerError(f"{what}: {value} is not a {kind.__name__}") from exc


def decode_records(buf: bytes, layout: FileLayout, first_index: int) -> tuple[BlockRecord, ...]:
    start = layout.records_offset
    raw_records = memoryview(buf)[start : start + layout.nr_memory_blocks * RECORD_SIZE]
    unplugged, no_zone = MemoryBlockState.UNPLUGGED, Zone.NONE
    records = []
    for offset in range(layout.nr_memory_blocks):
        index = first_index + offset
        at = offset * RECORD_SIZE
        if raw_records[at : at + RECORD_SIZE] == DEFAULT_RECORD:
            # Most records of a large region: no ctypes object, no enum lookups.
            records.append(BlockRecord(index, unplugged, False, no_zone, 0, NODE_UNKNOWN))
            continue
        raw = BlockRecordLayout.from_buffer_copy(buf, start + at)
        if raw.flags & ~KNOWN_FLAGS:
            raise TrackerError(f"memory{index}: unknown flags {raw.flags:#x}")
        records.append(
            BlockRecord(
                index=index,
                state=enum_or_error(MemoryBlockState, raw.state, f"memory{index} state"),
                present=bool(raw.flags & FLAG_PRESENT),
                zone=enum_or_error(Zone, raw.zone, f"memory{index} zone"),
                plugged_subblocks=raw.plugged_subblocks,
                node=raw.node,
            )
        )
    return tuple(records)


def decode_intent(header: TrackerHeader) -> Intent | None:
    if header.intent_op == NO_INTENT:
        return None
    op = enum_or_error(RequestType, header.intent_op, "intent op")
    return Intent(op=op, addr=header.intent_addr, nb_blocks=header.intent_nb_blocks)


def broken_reason(header: TrackerHeader) -> str:
    if header.device_status != DeviceStatus.BROKEN:
        return ""
    detail = header.broken_detail.decode(errors="replace")
    code = enum_or_error(BrokenReason, header.broken_code, "broken code")
    return detail or code.text


def decode(buf: bytes) -> TrackerSnapshot:
    """A snapshot of a whole-file copy ``buf``; TrackerError if it does not decode."""
    header = check_header(buf, len(buf))
    identity = identity_of(header)
    layout = FileLayout.of(identity.geometry)
    enum_or_error(DeviceStatus, header.device_status, "device status")
    bitmap_end = layout.bitmap_offset + layout.bitmap_size
    return TrackerSnapshot(
        identity=identity,
        generation=header.generation,
        owner_pid=header.owner_pid,
        requested_size=header.requested_size,
        usable_region_size=header.usable_region_size,
        plugged_size=header.plugged_size,
        node_id=header.node_id,
        device_features=header.device_features,
        interrupt_mode=enum_or_error(InterruptMode, header.interrupt_mode, "interrupt mode"),
        binding=enum_or_error(Binding, header.binding, "binding"),
        broken=header.device_status == DeviceStatus.BROKEN,
        broken_reason=broken_reason(header),
        plugged_bytes=header.plugged_bytes,
        online_bytes=header.online_bytes,
        remainder_bytes=header.remainder_bytes,
        retries=header.retries,
        requests=header.requests,
        intent=decode_intent(header),
        intent_seq=header.intent_seq,
        blocks=decode_records(buf, layout, identity.geometry.first_memory_block),
        bitmap=bytes(buf[layout.bitmap_offset : bitmap_end]),
        taken=bytes(buf[layout.taken_offset : layout.taken_offset + layout.bitmap_size]),
    )


def expected_state(plugged: int, total: int) -> MemoryBlockState:
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
    with_bits = blocks_with_bits(geometry, snap.bitmap, snap.taken)
    for record in snap.blocks:
        if (
            record.state is MemoryBlockState.UNPLUGGED
            and record.zone is Zone.NONE
            and not record.plugged_subblocks
            and record.index not in with_bits
        ):
            continue  # no bit over it, and a record that says so: nothing to check
        subblocks = geometry.subblocks_of(record.index)
        plugged = popcount(snap.bitmap, subblocks.start, len(subblocks))
        if record.plugged_subblocks != plugged:
            return (
                f"memory{record.index}: record says {record.plugged_subblocks} subblocks "
                f"plugged, bitmap {plugged}"
            )
        taken = popcount(snap.taken, subblocks.start, len(subblocks))
        if record.state is MemoryBlockState.ONLINE:
            covered = read_bits(snap.bitmap, subblocks.start, len(subblocks)) | read_bits(
                snap.taken, subblocks.start, len(subblocks)
            )
            if covered != (1 << len(subblocks)) - 1:
                return f"memory{record.index} is ONLINE over unplugged subblocks not taken"
            if record.zone is Zone.NONE:
                return f"memory{record.index} is ONLINE without a zone"
        elif taken:
            return f"memory{record.index} is {record.state.name} with taken subblocks"
        elif record.state is not expected_state(plugged, len(subblocks)):
            return f"memory{record.index}: state {record.state.name} with {plugged} plugged"
        elif record.zone is not Zone.NONE:
            return f"memory{record.index} is {record.state.name} with zone {record.zone.name}"
    spare_bits = int.from_bytes(snap.bitmap, "little") >> geometry.nr_subblocks
    if spare_bits:
        return "bitmap has bits set beyond the region"
    if taken_outside_blocks(snap):
        return "taken bits outside the region's memory blocks"
    plugged_bytes = int.from_bytes(snap.bitmap, "little").bit_count() * geometry.block_size
    if snap.plugged_bytes != plugged_bytes:
        return f"plugged_bytes {snap.plugged_bytes}, bitmap holds {plugged_bytes}"
    online = snap.state_counts()[MemoryBlockState.ONLINE] * geometry.memory_block_size
    if snap.online_bytes != online:
        return f"online_bytes {snap.online_bytes}, records hold {online}"
    return None


def blocks_with_bits(geometry: Geometry, *bitmaps: bytes) -> set[int]:
    """The region's memory blocks over a set bit of any of ``bitmaps`` (and maybe a
    neighbour: the spans are whole bytes). Python work in the bits set, not the region."""
    found: set[int] = set()
    size = geometry.memory_block_size
    for first, count in nonzero_bit_spans(*bitmaps):
        last = min(first + count, geometry.nr_subblocks) - 1
        if last < first:
            continue
        lo = geometry.subblock_addr(first) // size
        hi = (geometry.subblock_addr(last) + geometry.block_size - 1) // size
        found.update(mb for mb in range(lo, hi + 1) if geometry.contains_memory_block(mb))
    return found


def taken_outside_blocks(snap: TrackerSnapshot) -> bool:
    """Whether a taken bit lies outside every memory block of the region (an orphan)."""
    taken = int.from_bytes(snap.taken, "little")
    if not taken:
        return False
    geometry = snap.geometry
    blocks = geometry.memory_blocks()
    if not blocks:
        return True
    first = geometry.subblocks_of(blocks.start).start
    end = geometry.subblocks_of(blocks[-1]).stop
    inside = ((1 << (end - first)) - 1) << first
    return bool(taken & ~inside)


def state_of(snap: TrackerSnapshot) -> RegionState:
    """The in-memory state a snapshot holds (what a restarted owner starts from)."""
    return RegionState.load(
        snap.geometry,
        snap.bitmap,
        ((rec.index, rec.state, rec.zone, rec.present) for rec in snap.blocks),
        snap.taken,
    )


def state_disagreement(state: RegionState, snap: TrackerSnapshot) -> str | None:
    """Where the owner's in-memory ``state`` and the file's ``snap`` differ, or None.

    They must agree after every completed step; the fuzzers check it. Also
    checks the state's own indexes against a recount (:meth:`RegionState.problem`).
    """
    if bytes(state.bitmap) != snap.bitmap:
        return "bitmap differs from the file"
    if bytes(state.taken) != snap.taken:
        return "taken bitmap differs from the file"
    for rec in snap.blocks:
        held = (
            state.block_state(rec.index),
            state.block_zone(rec.index),
            state.is_present(rec.index),
        )
        if held != (rec.state, rec.zone, rec.present):
            return (
                f"memory{rec.index}: state holds {held}, file {(rec.state, rec.zone, rec.present)}"
            )
    if state.plugged_bytes != snap.plugged_bytes:
        return f"plugged bytes {state.plugged_bytes}, file {snap.plugged_bytes}"
    if state.online_bytes != snap.online_bytes:
        return f"online bytes {state.online_bytes}, file {snap.online_bytes}"
    return state.problem()
