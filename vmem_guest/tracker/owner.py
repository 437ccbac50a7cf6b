"""The owner of a tracker: its only writer, with the in-memory state it plans from.

Concurrency: exactly one owner (:class:`Tracker`) writes, holding the device's
lock (``files.lock_device``). Readers map the file read-only and never lock:
every write happens inside one *write section* that makes ``generation`` odd
before the first byte changes and even again after the last, so a reader that
sees the same even generation before and after copying the file holds a
consistent snapshot (a seqlock). Ordering relies on the CPU keeping stores in
program order as seen by another CPU (x86-64 TSO); each field store is one
C-level copy made by ctypes.

Only :meth:`Tracker._set_block_state` changes a block record (and with it
``online_bytes``); only :meth:`Tracker._write_subblocks` (a range) and
:meth:`Tracker._replace_bitmap` (all of it, on rebuild) change the bitmap, and
with it ``plugged_bytes``; only :meth:`Tracker._write_taken` and
``_replace_bitmap`` change the taken bitmap. Each applies the same change to :attr:`Tracker.state`,
so the state stays what the file says at O(change) per transition; the file
is decoded whole only at open (and by :meth:`Tracker.snapshot`, for readers and tests).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

from vmem_guest._linux.lifetime import Closing
from vmem_guest.blocks import Geometry, MemoryBlockState, Zone
from vmem_guest.device import DEVICE_FEATURE_MASK, InterruptMode
from vmem_guest.errors import HolesKeepBlockOnline, SafetyError, TrackerError
from vmem_guest.spec import RequestType
from vmem_guest.tracker.files import (
    create_fresh,
    lock_device,
    map_existing,
    set_aside,
)
from vmem_guest.tracker.layout import (
    DEFAULT_RECORD,
    FLAG_PRESENT,
    NO_INTENT,
    NODE_UNKNOWN,
    RECORD_SIZE,
    U32_MAX,
    U64_MAX,
    BlockRecordLayout,
    BrokenReason,
    DeviceStatus,
    FileLayout,
    TrackerHeader,
    broken_code_and_detail,
    check_unsigned,
    popcount,
    read_bits,
)
from vmem_guest.tracker.snapshot import (
    BlockRecord,
    Intent,
    TrackerIdentity,
    TrackerSnapshot,
    blocks_with_bits,
    broken_reason,
    decode,
    decode_intent,
    expected_state,
    state_of,
)
from vmem_guest.tracker.state import RegionState


class Tracker(Closing):
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
        snapshot: TrackerSnapshot | None = None,
        *,
        fresh: bool = False,
    ) -> None:
        """Use :meth:`open`; this wires an already locked and mapped file.

        ``snapshot``: the file's content as :meth:`open` validated it (decoded
        here if not given); ``fresh``: the file is :func:`create_fresh`'s image,
        whose state (all UNPLUGGED) is built without decoding it."""
        self.path = path
        self.identity = identity
        self.recovered = False
        self.discarded_reason = None
        self.set_aside_path = None
        self._log = logging.getLogger(f"vmem_guest.tracker.{identity.name}")
        self._layout = FileLayout.of(identity.geometry)
        self._snapshot_cache: TrackerSnapshot | None = None
        self._lock_fd: int | None = lock_fd
        self._map: mmap.mmap | None = mapping
        self._header: TrackerHeader | None = TrackerHeader.from_buffer(mapping, 0)
        records_type = BlockRecordLayout * self._layout.nr_memory_blocks
        self._records: ctypes.Array[BlockRecordLayout] | None = records_type.from_buffer(
            mapping, self._layout.records_offset
        )
        #: What the file holds, indexed for the planner (derived: see state.py).
        #: Decoded once here; every transition below updates it in place.
        self.state: RegionState = (
            RegionState(identity.geometry, self._layout.bitmap_size)
            if fresh
            else state_of(snapshot or decode(mapping[:]))
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
        path, lock_fd = lock_device(state_dir, identity.name)
        try:
            return cls._open_locked(path, identity, lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise

    @classmethod
    def _open_locked(cls, path: Path, identity: TrackerIdentity, lock_fd: int) -> Tracker:
        log = logging.getLogger(f"vmem_guest.tracker.{identity.name}")
        mapping, reason, snapshot = map_existing(path, identity)
        aside: Path | None = None
        if mapping is None and reason is not None:
            aside = set_aside(path)
            log.warning("tracker %s set aside as %s: %s", path, aside.name, reason)
        reused = mapping is not None
        if mapping is None:
            mapping = create_fresh(path, identity)
        tracker = cls(path, identity, lock_fd, mapping, snapshot, fresh=not reused)
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

    # -- reading ------------------------------------------------------------

    @property
    def geometry(self) -> Geometry:
        return self.identity.geometry

    @property
    def generation(self) -> int:
        return int(self._hdr.generation)

    @property
    def requests(self) -> int:
        """Requests sent to the device (the header's counter; no decode)."""
        return int(self._hdr.requests)

    @property
    def retries(self) -> int:
        """Retries counted so far (BUSY, refused offlines)."""
        return int(self._hdr.retries)

    @property
    def remainder_bytes(self) -> int:
        """What the guest cannot use of ``requested_size`` (last Done)."""
        return int(self._hdr.remainder_bytes)

    @property
    def broken_reason(self) -> str | None:
        """Why the device is marked broken, None when it is not: the one flag every
        part of the agent reads (only the driver core sets it)."""
        header = self._hdr
        if header.device_status != DeviceStatus.BROKEN:
            return None
        return broken_reason(header)

    def snapshot(self) -> TrackerSnapshot:
        """A copy of the current state (the owner needs no seqlock retry).

        Decodes the whole file, O(region): for readers of the owner's process
        (manual operations, tests), never the step loop, which reads :attr:`state`.

        Every change goes through this object and bumps the generation, so a
        snapshot of the same generation is still exact: decode once per change.
        """
        generation = self.generation
        cached = self._snapshot_cache
        if cached is None or cached.generation != generation:
            cached = self._snapshot_cache = decode(self._mapped[:])
        return cached

    @property
    def intent(self) -> Intent | None:
        """The pending intent (None: no request pending), from the header alone."""
        return decode_intent(self._hdr)

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
        takes addr 0 and nb_blocks 0. SafetyError for an UNPLUG of a subblock
        of an ONLINE block that is not taken, or an UNPLUG_ALL while any block is
        ONLINE (docs/design.md 5.2).
        """
        op = RequestType(op)
        if op is RequestType.UNPLUG_ALL:
            if addr or nb_blocks:
                raise SafetyError("UNPLUG_ALL intent takes no range", addr=addr)
            self._refuse_if_any_online("UNPLUG_ALL")
        else:
            first = self._check_range(addr, nb_blocks)
            if op is RequestType.UNPLUG:
                self._refuse_unplug_in_use(first, nb_blocks)
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
        already plugged. Holes of an ONLINE block become plugged and stay
        taken: their pages are given back by :meth:`record_given_back`.
        """
        first = self._check_range(addr, nb_blocks)
        if read_bits(self._mapped, self._bit(first), nb_blocks):
            raise SafetyError("plug over already plugged subblocks", addr=addr)
        with self._write_section():
            self._write_subblocks(first, nb_blocks, plugged=True)
            self._refresh_blocks(first, nb_blocks)
        self._log.debug("plugged addr=%#x nb_blocks=%d", addr, nb_blocks)

    def record_unplugged(self, addr: int, nb_blocks: int) -> None:
        """The device ACKed an UNPLUG of ``nb_blocks`` device blocks at ``addr``.

        SafetyError if the range leaves the region, any block in it is not
        plugged, or a subblock of an ONLINE block in it is not taken
        (docs/design.md 5.2).
        """
        first = self._check_range(addr, nb_blocks)
        self._refuse_unplug_in_use(first, nb_blocks)
        mask = (1 << nb_blocks) - 1
        if read_bits(self._mapped, self._bit(first), nb_blocks) != mask:
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

    # -- transitions: subblocks of online blocks ----------------------------

    def record_taking(self, addr: int, nb_blocks: int) -> None:
        """The agent is about to take the pages of these subblocks out of use.

        Written before the first soft offline, so a crash at any point leaves a
        taken bit to resolve from (docs/design.md 5.3). SafetyError unless every
        subblock is plugged, not yet taken, and in an ONLINE block (only online
        memory has pages to take; Sub Block Mode only).
        """
        first = self._check_range(addr, nb_blocks)
        self._require_online_subblocks(first, nb_blocks, "take")
        state = self.state
        for sb in range(first, first + nb_blocks):
            if not state.is_plugged(sb) or state.is_taken(sb):
                raise SafetyError(f"take of subblock {sb}: not plugged and in use", addr=addr)
        with self._write_section():
            self._write_taken(first, nb_blocks, taken=True)
        self._log.debug("taking addr=%#x nb_blocks=%d", addr, nb_blocks)

    def record_given_back(self, addr: int, nb_blocks: int) -> None:
        """The pages of these subblocks are back in use (or were never taken).

        SafetyError unless every subblock is taken and plugged: a page goes back
        to the kernel only over memory the device ACKed (docs/design.md 5.1).
        """
        first = self._check_range(addr, nb_blocks)
        self.check_may_give_back(first, nb_blocks)
        with self._write_section():
            self._write_taken(first, nb_blocks, taken=False)
        self._log.debug("given back addr=%#x nb_blocks=%d", addr, nb_blocks)

    def check_may_give_back(self, first: int, count: int) -> None:
        """SafetyError unless subblocks ``first .. first+count-1`` are taken and plugged.

        The driver calls it before it unpoisons a single page of them."""
        state = self.state
        for sb in range(first, first + count):
            if not (state.is_plugged(sb) and state.is_taken(sb)):
                raise SafetyError(
                    f"give-back of subblock {sb}, which is not plugged and taken",
                    addr=self.geometry.subblock_addr(sb),
                )

    # -- transitions: kernel state ------------------------------------------

    def record_present(self, index: int) -> None:
        """Memory block ``index`` was probed (added) in the kernel.

        SafetyError unless it is fully plugged (PLUGGED or ONLINE): docs/design.md
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

    def check_may_offline(self, index: int) -> None:
        """Refuse, before anything is written to the kernel, an offline of memory block
        ``index`` that :meth:`record_offline` would refuse: SafetyError unless it is
        ONLINE; :class:`HolesKeepBlockOnline` when it holds taken subblocks (holes, or
        subblocks being taken), with plugged ones or without (docs/design.md 5.1 and
        section 2: a block of holes only stays online until growth gives them back).
        """
        state = self._state(index)
        if state is not MemoryBlockState.ONLINE:
            raise SafetyError(
                f"memory{index} is {state.name}, not ONLINE: cannot offline", block=index
            )
        subblocks = self.geometry.subblocks_of(index)
        taken = popcount(self.state.taken, subblocks.start, len(subblocks))
        if taken:
            plugged, _total = self._count_plugged(index)
            raise HolesKeepBlockOnline(index, taken, plugged)

    def record_offline(self, index: int) -> None:
        """Memory block ``index`` was offlined: back to PLUGGED, no zone.

        Refused as :meth:`check_may_offline` refuses (the driver asks that before it
        writes ``offline``), so no caller can record an offline the rules forbid.
        """
        self.check_may_offline(index)
        with self._write_section():
            self._set_block_state(index, MemoryBlockState.PLUGGED, zone=Zone.NONE, present=True)

    def rebuild_from_states(
        self,
        plugged: Iterable[int],
        online: Mapping[int, Zone],
        present: Iterable[int],
        taken: Iterable[int] = (),
    ) -> None:
        """Replace the bitmaps and every record with observed truth, in one write section.

        ``plugged``: subblock indices the device reported plugged (STATE);
        ``online`` (block index -> zone) and ``present``: memory block indices
        from sysfs (online implies present); ``taken``: subblocks of online
        blocks with pages taken out of use (kpageflags). Nodes stay for blocks
        still present. The intent and the device info are left alone.
        SafetyError, before any change, if an index is outside the region, an
        online block has a subblock neither plugged nor taken, or a taken
        subblock is not in an online block.
        """
        geometry = self.geometry
        bitmap = self._bitmap_of(plugged)
        taken_map = self._bitmap_of(taken)
        online_zones = {index: Zone(zone) for index, zone in online.items()}
        present_set = set(present) | set(online_zones)
        for index in present_set:
            self._check_index(index)
        everything = int.from_bytes(bitmap, "little") | int.from_bytes(taken_map, "little")
        for index, zone in online_zones.items():
            subblocks = geometry.subblocks_of(index)
            whole = (1 << len(subblocks)) - 1
            if (everything >> subblocks.start) & whole != whole:
                raise SafetyError(
                    f"memory{index} is online over subblocks neither plugged nor taken",
                    block=index,
                )
            if zone is Zone.NONE:
                raise ValueError(f"memory{index} online without a zone (use AUTO)")
        online_subblocks = {sb for mb in online_zones for sb in geometry.subblocks_of(mb)}
        for sb in taken:
            if sb not in online_subblocks:
                raise SafetyError(f"subblock {sb} taken outside an online block")
        # Blocks whose record is not the default (UNPLUGGED, absent, no node) before or
        # after: any other record is already exactly what _rebuild_block would write.
        touched = self._nondefault_blocks() | present_set
        touched.update(blocks_with_bits(geometry, bitmap, taken_map))
        with self._write_section():
            self._replace_bitmap(bitmap, taken_map)
            for index in sorted(touched):
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
            check_unsigned(what, value, limit)
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

    def set_transport_info(self, *, device_features: int, interrupt_mode: InterruptMode) -> None:
        """Store what the transport negotiated: the virtio-mem feature bits accepted and
        the interrupt mode (for ``status``; nothing is recovered from them)."""
        check_unsigned("device_features", device_features, DEVICE_FEATURE_MASK)
        with self._write_section() as header:
            header.device_features = device_features
            header.interrupt_mode = InterruptMode(interrupt_mode)
        self._log.info(
            "transport: features %#x, %s interrupts", device_features, interrupt_mode.text
        )

    def set_broken(self, reason: str | BrokenReason) -> None:
        """Mark the device broken (stop touching it). ``reason`` is a BrokenReason
        or free text; text is kept (truncated to fit) with code OTHER unless it
        names a BrokenReason.
        """
        code, detail = broken_code_and_detail(reason)
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
        check_unsigned("remainder", nbytes, U64_MAX)
        with self._write_section() as header:
            header.remainder_bytes = nbytes
        self._log.debug("remainder %#x", nbytes)

    def count_retry(self) -> None:
        with self._write_section() as header:
            header.retries += 1
        self._log.debug("retry")

    def count_requests(self, n: int) -> None:
        """Add ``n`` requests sent to the device."""
        check_unsigned("request count", n, U64_MAX)
        with self._write_section() as header:
            header.requests += n
        self._log.debug("requests +%d", n)

    # -- the only places that change state ------------------------------------

    def _write_section(self) -> _WriteSection:
        """Make ``generation`` odd for the duration, even after: readers retry meanwhile."""
        return _WriteSection(self._hdr)

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
        self.state.set_block(index, state, zone, present)
        changed = (old_state, old_present, old_zone) != (state, present, zone)
        if changed and self._log.isEnabledFor(logging.DEBUG):
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
        self.state.set_subblocks(first, count, plugged=plugged)

    def _replace_bitmap(self, bitmap: bytes, taken: bytes) -> None:
        """Store whole new plug and taken bitmaps (``bitmap_size`` bytes each); sets
        ``plugged_bytes`` to match.

        Called inside a write section with bitmaps built by :meth:`_bitmap_of`.
        """
        start = self._layout.bitmap_offset
        self._mapped[start : start + len(bitmap)] = bitmap
        start = self._layout.taken_offset
        self._mapped[start : start + len(taken)] = taken
        popcount = int.from_bytes(bitmap, "little").bit_count()
        self._hdr.plugged_bytes = popcount * self.geometry.block_size
        self.state.replace_bitmap(bitmap, taken)

    def _write_taken(self, first: int, count: int, *, taken: bool) -> None:
        """Set or clear taken bits ``first .. first+count-1`` (in a write section)."""
        mapping = self._mapped
        bit = self._layout.taken_offset * 8 + first
        lo, hi = bit // 8, (bit + count + 7) // 8
        mask = ((1 << count) - 1) << (bit % 8)
        word = int.from_bytes(mapping[lo:hi], "little")
        word = (word | mask) if taken else (word & ~mask)
        mapping[lo:hi] = word.to_bytes(hi - lo, "little")
        self.state.set_taken(first, count, taken=taken)

    def _refresh_blocks(self, first: int, count: int) -> None:
        """Recompute plugged_subblocks and state of the blocks over subblocks
        ``first .. first+count-1``. An ONLINE block stays ONLINE (its holes were
        plugged or unplugged: the caller checked they are taken)."""
        geometry = self.geometry
        touched = range(
            geometry.subblock_addr(first) // geometry.memory_block_size,
            -(-geometry.subblock_addr(first + count) // geometry.memory_block_size),
        )
        for index in touched:
            if not geometry.contains_memory_block(index):
                continue
            plugged, total = self._count_plugged(index)
            if self._state(index) is MemoryBlockState.ONLINE:
                self._set_block_state(index, MemoryBlockState.ONLINE, plugged_subblocks=plugged)
                continue
            self._set_block_state(
                index,
                expected_state(plugged, total),
                plugged_subblocks=plugged,
                zone=Zone.NONE,
            )

    def _rebuild_block(self, index: int, zone: Zone | None, present: bool) -> None:
        """Set block ``index`` from the (already rebuilt) bitmap and the kernel's view.

        A record that already holds exactly that is left alone: at start, nearly
        every block of a large region is absent and unplugged, as the file says.
        """
        plugged, total = self._count_plugged(index)
        if zone is not None:
            state = MemoryBlockState.ONLINE
        else:
            state, zone = expected_state(plugged, total), Zone.NONE
        raw = self._record(index)
        if (
            raw.state == state
            and raw.zone == zone
            and raw.plugged_subblocks == plugged
            and bool(raw.flags & FLAG_PRESENT) == present
            and (present or raw.node == NODE_UNKNOWN)
        ):
            return
        self._set_block_state(
            index,
            state,
            plugged_subblocks=plugged,
            zone=zone,
            present=present,
            node=None if present else NODE_UNKNOWN,
        )

    def _nondefault_blocks(self) -> set[int]:
        """Memory blocks whose record differs from a fresh file's: compared 256 records
        (4 KiB) at a time, so a large region that holds little costs a few memcmps."""
        first, count = self.geometry.first_memory_block, self._layout.nr_memory_blocks
        start = self._layout.records_offset
        raw = self._mapped[start : start + count * RECORD_SIZE]
        chunk = DEFAULT_RECORD * 256
        found: set[int] = set()
        for lo in range(0, len(raw), len(chunk)):
            if raw[lo : lo + len(chunk)] == chunk[: len(raw) - lo]:
                continue
            for at in range(lo, min(lo + len(chunk), len(raw)), RECORD_SIZE):
                if raw[at : at + RECORD_SIZE] != DEFAULT_RECORD:
                    found.add(first + at // RECORD_SIZE)
        return found

    def _count_plugged(self, index: int) -> tuple[int, int]:
        """(plugged, total) subblocks of memory block ``index`` per the bitmap."""
        subblocks = self.geometry.subblocks_of(index)
        plugged = popcount(self._mapped, self._bit(subblocks.start), len(subblocks))
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

    def _blocks_over(self, first: int, count: int) -> range:
        """Memory blocks overlapping subblocks ``first .. first+count-1`` (maybe outside)."""
        geometry = self.geometry
        lo = geometry.subblock_addr(first) // geometry.memory_block_size
        hi = -(-geometry.subblock_addr(first + count) // geometry.memory_block_size)
        return range(lo, hi)

    def _refuse_unplug_in_use(self, first: int, count: int) -> None:
        """SafetyError if a subblock of ``first .. first+count-1`` lies in an ONLINE
        block and is not taken (docs/design.md 5.2: nothing in use is unplugged)."""
        geometry = self.geometry
        for index in self._blocks_over(first, count):
            if not geometry.contains_memory_block(index):
                continue
            if self._state(index) is not MemoryBlockState.ONLINE:
                continue
            block_subblocks = geometry.subblocks_of(index)
            lo = max(first, block_subblocks.start)
            hi = min(first + count, block_subblocks.stop)
            if any(not self.state.is_taken(sb) for sb in range(lo, hi)):
                raise SafetyError(
                    f"unplug over memory{index}, which is ONLINE, of subblocks not taken",
                    block=index,
                    addr=geometry.subblock_addr(first),
                )

    def _require_online_subblocks(self, first: int, count: int, what: str) -> None:
        """SafetyError unless subblocks ``first .. first+count-1`` all lie in ONLINE
        memory blocks of a Sub Block Mode region."""
        geometry = self.geometry
        if geometry.big_block_mode:
            raise SafetyError(f"{what} of subblocks in Big Block Mode")
        for index in self._blocks_over(first, count):
            self._check_index(index)
            if self._state(index) is not MemoryBlockState.ONLINE:
                raise SafetyError(f"{what} of subblocks of memory{index}, not ONLINE", block=index)

    def _refuse_if_any_online(self, what: str) -> None:
        if self._hdr.online_bytes:
            raise SafetyError(f"{what} while memory blocks are ONLINE")


class _WriteSection:
    """``with tracker._write_section() as header:`` (a class, not a generator: this
    brackets every transition, several per step)."""

    __slots__ = ("_header",)

    def __init__(self, header: TrackerHeader) -> None:
        self._header = header

    def __enter__(self) -> TrackerHeader:
        self._header.generation += 1
        return self._header

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._header.generation += 1
