"""A virtio-mem device that answers requests with QEMU's rules, in QEMU's order.

The model works at the request level: it takes the 24 request bytes a driver
puts on the virtqueue and returns the 10 response bytes QEMU would write, so it
is a :class:`vmem_guest.device.RequestChannel`. Every rule below is QEMU's
``hw/virtio/virtio-mem.c`` (docs/protocol.md section 1); each method names the QEMU
function it restates. It does no I/O, reads no clock and uses randomness only
through the ``rng`` it is given (for ``busy_rate``).

QEMU versions. Our test host runs QEMU 7.2; the model follows 7.2 and notes
where newer QEMU differs:

- ``virtio_mem_unplug_all``: up to 8.0 it checks "migration running -> BUSY"
  before looking at the plugged size, so an UNPLUG_ALL with nothing plugged can
  still answer BUSY. The patch "virtio-mem: Skip most of virtio_mem_unplug_all()
  without plugged memory" (June 2023, so QEMU 8.1) runs that check only when
  something is plugged. See :attr:`DeviceModel.busy_unplug_all_when_empty`.
- Dynamic memslots (8.2, ``virtio_mem_activate_memslots_to_plug``...) change
  nothing a driver can see in the answers.
- Current QEMU runs the system reset from a Resettable object that skips the
  unplug on wake-up from suspend (``RESET_TYPE_WAKEUP``); 7.2 registers
  ``virtio_mem_system_reset`` with ``qemu_register_reset`` and always unplugs.
  The model has no suspend: :meth:`DeviceModel.system_reset` always unplugs.
- The same in 7.2 and current QEMU, as far as the patches read show:
  ``virtio_mem_valid_range``, ``virtio_mem_state_change_request`` (there is no
  size-related NACK for UNPLUG: only PLUG can be NACKed),
  ``virtio_mem_state_request``, ``virtio_mem_resize_usable_region`` (the
  first QEMU, 5.1, neither aligned the usable size up to the block size nor
  set it to 0 for a zero request) and ``virtio_mem_set_requested_size``.

QEMU arithmetic is on ``uint64_t``; the model masks to 64 bits in the same
places, so an address near 2**64 behaves as it does in QEMU. Not modelled: a
device-writable buffer shorter than 10 bytes (also ``virtio_error`` in QEMU);
:meth:`DeviceModel.submit` has no response buffer to check.

Other implementations. A :class:`~vmem_guest.sim.rules.ModelRules` (``rules``)
switches the model to another implementation's answers where they differ from
QEMU's (Cloud Hypervisor, Firecracker, StratoVirt: :mod:`vmem_guest.sim.profiles`
gives each switch with its source line); the default rules are QEMU's.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import random
import struct
from collections.abc import Callable
from typing import NoReturn

from vmem_guest import spec
from vmem_guest.errors import DeviceBroken, DeviceTimeout
from vmem_guest.sim.rules import QEMU_RULES, U16_WRAP, Malformed, ModelRules
from vmem_guest.spec import BlockState, RequestType, ResponseType

_U64_MASK = (1 << 64) - 1
#: QEMU's smallest block size, ``VIRTIO_MEM_MIN_BLOCK_SIZE`` (1 MiB).
MIN_BLOCK_SIZE = 1 << 20
#: ``VIRTIO_MEM_USABLE_EXTENT`` on x86 and s390x: 2 * 128 MiB (ARM: 2 * 512 MiB).
USABLE_EXTENT_X86 = 256 << 20

_STRUCT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}

_PLUG = int(RequestType.PLUG)
_UNPLUG = int(RequestType.UNPLUG)
_UNPLUG_ALL = int(RequestType.UNPLUG_ALL)
_STATE = int(RequestType.STATE)

StatKey = tuple[str, str]
#: One prepared answer: the response bytes and its ``stats`` key.
_Answer = tuple[bytes, StatKey]


def layout_struct(layout: type[ctypes.Structure], names: tuple[str, ...]) -> struct.Struct:
    """A little-endian ``struct.Struct`` reading ``names`` out of a spec layout.

    The offsets and sizes come from the ctypes layout in :mod:`vmem_guest.spec`,
    so no wire format is declared twice; gaps become pad bytes.
    """
    fmt = ["<"]
    pos = 0
    for name in names:
        field = getattr(layout, name)
        if field.offset < pos:
            raise ValueError(f"{layout.__name__}.{name} is out of order")
        if field.offset > pos:
            fmt.append(f"{field.offset - pos}x")
        fmt.append(_STRUCT_CODES[field.size])
        pos = field.offset + field.size
    return struct.Struct("".join(fmt))


def usable_region_for(
    requested_size: int, region_size: int, block_size: int, extent: int = USABLE_EXTENT_X86
) -> int:
    """The usable region QEMU computes for ``requested_size``.

    ``virtio_mem_resize_usable_region``: min(region, requested + extent),
    aligned up to the block size, and 0 when nothing is requested.
    """
    if not requested_size:
        return 0
    newsize = min(region_size, requested_size + extent)
    return -(-newsize // block_size) * block_size


def _usable_under(rules: ModelRules, requested: int, region: int, block: int, margin: int) -> int:
    """The usable region ``rules`` give for ``requested_size`` (before grow-only checks)."""
    if rules.usable_policy == "region":
        return region
    if rules.usable_policy == "slot":
        return min(region, -(-requested // rules.slot_size) * rules.slot_size)
    return usable_region_for(requested, region, block, margin)


class DeviceModel:
    """A QEMU-faithful virtio-mem device at the request level.

    Implements :class:`vmem_guest.device.RequestChannel`. Block indices
    (``sb_index``) count device blocks from ``addr``.

    Host side: :meth:`resize` (``qom-set requested-size``), :meth:`system_reset`,
    :meth:`device_reset` (the driver wrote status 0), ``busy_rate`` and
    ``busy_next`` (BUSY injection), ``on_config_change`` (the config interrupt).

    Attributes:
        on_config_change: called whenever QEMU raises a config interrupt: on every
            accepted :meth:`resize` (QEMU notifies even when the value did not
            change, which the spec allows) and when the device breaks
            (``virtio_error`` sets DEVICE_NEEDS_RESET and notifies). QEMU raises
            none for an UNPLUG_ALL that shrinks the usable region (the driver
            asked for it) nor on system reset.
        busy_rate: probability that a PLUG/UNPLUG/UNPLUG_ALL that would
            otherwise succeed answers BUSY (draws from ``rng``).
        busy_next: the next N such requests answer BUSY (deterministic).
        busy_unplug_all_when_empty: QEMU 7.2 behaviour (default): BUSY injection
            applies to UNPLUG_ALL even with nothing plugged. False: QEMU >= 8.1.
            (A field of ``rules``, settable here.)
        rules: where this device answers unlike QEMU (default: QEMU's rules).
        broken, broken_reason: set by ``virtio_error``; cleared by a reset.
        stats: answered requests, by (request type name, response type name).
        requests: every :meth:`submit` call, answered or not.
    """

    def __init__(
        self,
        *,
        addr: int,
        region_size: int,
        block_size: int,
        node_id: int = 0,
        requested_size: int = 0,
        usable_margin: int = USABLE_EXTENT_X86,
        rng: random.Random | None = None,
        rules: ModelRules = QEMU_RULES,
    ) -> None:
        _check_geometry(addr, region_size, block_size, node_id, requested_size, usable_margin)
        self.rules = rules
        self._addr = addr
        self._region_size = region_size
        self._block_size = block_size
        self._node_id = node_id
        self._margin = usable_margin
        self._shift = block_size.bit_length() - 1
        self._nr_blocks = region_size >> self._shift
        self._bitmap = bytearray(self._nr_blocks)
        self._ones = memoryview(b"\x01" * min(self._nr_blocks, spec.MAX_BLOCKS_PER_REQUEST))
        self._zeros = memoryview(bytes(min(self._nr_blocks, spec.MAX_BLOCKS_PER_REQUEST)))
        self._plugged = 0
        self._requested = requested_size
        self._usable = 0
        self._usable_end = addr
        self._config: bytes | None = None
        self._resize_usable_region(requested_size, can_shrink=True)
        self._req = layout_struct(spec.VirtioMemReq, ("type", "addr", "nb_blocks"))
        self._answers = _Answers()
        self.rng = rng if rng is not None else random.Random(0)
        self.on_config_change: Callable[[], None] | None = None
        self.busy_rate = 0.0
        self.busy_next = 0
        self.broken = False
        self.broken_reason: str | None = None
        self.stats: collections.Counter[StatKey] = collections.Counter()
        self.requests = 0

    @property
    def busy_unplug_all_when_empty(self) -> bool:
        return self.rules.busy_unplug_all_when_empty

    @busy_unplug_all_when_empty.setter
    def busy_unplug_all_when_empty(self, value: bool) -> None:
        self.rules = dataclasses.replace(self.rules, busy_unplug_all_when_empty=value)

    # -- geometry and sizes (the config space) ---------------------------------

    @property
    def addr(self) -> int:
        return self._addr

    @property
    def region_size(self) -> int:
        return self._region_size

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def node_id(self) -> int:
        return self._node_id

    @property
    def nr_blocks(self) -> int:
        """Device blocks in the whole region."""
        return self._nr_blocks

    @property
    def plugged_size(self) -> int:
        """QEMU's ``vmem->size`` (``qom-get size``)."""
        return self._plugged

    @property
    def requested_size(self) -> int:
        return self._requested

    @property
    def usable_region_size(self) -> int:
        return self._usable

    def read_config(self) -> bytes:
        """The 56 config bytes (``virtio_mem_get_config``); QEMU's are always stable."""
        if self._config is None:
            self._config = bytes(
                spec.VirtioMemConfig(
                    block_size=self._block_size,
                    node_id=self._node_id,
                    addr=self._addr,
                    region_size=self._region_size,
                    usable_region_size=self._usable,
                    plugged_size=self._plugged,
                    requested_size=self._requested,
                )
            )
        return self._config

    # -- block state -------------------------------------------------------------

    def is_plugged(self, sb_index: int) -> bool:
        """Whether device block ``sb_index`` (counted from ``addr``) is plugged."""
        if not 0 <= sb_index < self._nr_blocks:
            raise IndexError(f"block {sb_index} outside 0..{self._nr_blocks - 1}")
        return bool(self._bitmap[sb_index])

    def plugged_blocks(self) -> set[int]:
        """Indices of all plugged device blocks."""
        bitmap = self._bitmap
        found: set[int] = set()
        index = bitmap.find(1)
        while index != -1:
            found.add(index)
            index = bitmap.find(1, index + 1)
        return found

    def bitmap(self) -> bytes:
        """A copy of the block bitmap: one byte per device block, 1 = plugged."""
        return bytes(self._bitmap)

    # -- the virtqueue -----------------------------------------------------------

    def submit(self, request: bytes) -> bytes:
        """Handle one request, as ``virtio_mem_handle_request`` does.

        Returns the 10 response bytes. With QEMU's rules a request shorter than
        24 bytes or of an unknown type breaks the device (``virtio_error``): it is
        never answered, and this and every later call raise DeviceBroken until a
        reset. Other rules (:data:`~vmem_guest.sim.rules.Malformed`) answer ERROR,
        answer with no bytes, or leave that one request unanswered (DeviceTimeout).
        """
        self.requests += 1
        if self.broken:
            raise DeviceBroken(
                f"device is broken ({self.broken_reason}); it needs a reset",
                reason=self.broken_reason,
            )
        if len(request) < spec.VirtioMemReq.SPEC_SIZE:
            reason = f"invalid request size: {len(request)}"
            return self._malformed(self.rules.short_request, reason)
        req_type, gpa, nb_blocks = self._req.unpack_from(request)
        if req_type in (_PLUG, _UNPLUG):
            answer = self._state_change_request(req_type, gpa, nb_blocks)
        elif req_type == _STATE:
            answer = self._state_request(gpa, nb_blocks)
        elif req_type == _UNPLUG_ALL:
            answer = self._unplug_all_request()
        else:
            return self._malformed(self.rules.unknown_request, f"unknown request type: {req_type}")
        self.stats[answer[1]] += 1
        return answer[0]

    def _malformed(self, outcome: Malformed, reason: str) -> bytes:
        """What a request the device cannot parse leads to (``outcome``)."""
        if outcome == "error":
            self.stats[self._answers.malformed_error[1]] += 1
            return self._answers.malformed_error[0]
        if outcome == "empty":
            return b""
        if outcome == "unanswered":
            raise DeviceTimeout(f"no answer to a malformed request ({reason})", reason=reason)
        if outcome == "dies":
            self.broken = True
            self.broken_reason = f"request thread ended: {reason}"
            raise DeviceBroken(self.broken_reason, reason=self.broken_reason)
        self._virtio_error(reason)

    def _virtio_error(self, reason: str) -> NoReturn:
        """``virtio_error``: mark broken, raise DEVICE_NEEDS_RESET, answer nothing."""
        self.broken = True
        self.broken_reason = f"virtio-mem protocol violation: {reason}"
        self._config_interrupt()
        raise DeviceBroken(self.broken_reason, reason=self.broken_reason)

    def _valid_range(self, gpa: int, size: int) -> bool:
        """``virtio_mem_valid_range``: aligned, non-empty, no overflow, inside usable."""
        if gpa & (self._block_size - 1):
            return False
        if gpa + size > _U64_MASK or not size:
            return False
        if gpa < self._addr or gpa >= self._usable_end:
            return False
        return gpa + size <= self._usable_end

    def _state_change_request(self, req_type: int, gpa: int, nb_blocks: int) -> _Answer:
        """``virtio_mem_state_change_request`` for PLUG and UNPLUG, in QEMU's order.

        ERROR for an invalid range; NACK for a PLUG beyond ``requested_size``
        (UNPLUG is never NACKed); ERROR unless every block is in the opposite
        state; BUSY when injected (``virtio_mem_set_block_state``); else ACK.
        ``rules`` move or add the size checks (NACK before the range checks, a
        NACK for an empty PLUG or an UNPLUG below ``requested_size``) and choose
        the answer beyond ``requested_size``.
        """
        answers = self._answers
        rules = self.rules
        plug = req_type == _PLUG
        size = (nb_blocks << self._shift) & _U64_MASK
        if plug and not size and rules.empty_plug_nack:
            return answers.plug_nack
        beyond = plug and self._plugged + size > self._requested
        if beyond and rules.requested_check_first:
            return answers.plug_answer(rules.plug_beyond_requested)
        below = not size or size + self._requested > self._plugged
        if not plug and rules.unplug_nack_below_requested and below:
            return answers.unplug_nack
        if not self._valid_range(gpa, size):
            return answers.plug_error if plug else answers.unplug_error
        if beyond:
            return answers.plug_answer(rules.plug_beyond_requested)
        first = (gpa - self._addr) >> self._shift
        last = first + nb_blocks
        if self._bitmap.find(1 if plug else 0, first, last) != -1:
            return answers.plug_error if plug else answers.unplug_error
        if self._take_busy(req_type):
            return answers.plug_busy if plug else answers.unplug_busy
        if plug:
            self._bitmap[first:last] = self._ones[:nb_blocks]
            self._plugged += size
        else:
            self._bitmap[first:last] = self._zeros[:nb_blocks]
            self._plugged -= size
        self._config = None
        return answers.plug_ack if plug else answers.unplug_ack

    def _state_request(self, gpa: int, nb_blocks: int) -> _Answer:
        """``virtio_mem_state_request``: ERROR outside the usable region, else the state."""
        answers = self._answers
        size = (nb_blocks << self._shift) & _U64_MASK
        if not self._valid_range(gpa, size):
            return answers.state_error
        first = (gpa - self._addr) >> self._shift
        last = first + nb_blocks
        if self._bitmap.find(0, first, last) == -1:
            return answers.state_plugged
        if self._bitmap.find(1, first, last) == -1:
            return answers.state_unplugged
        return answers.state_mixed

    def _unplug_all_request(self) -> _Answer:
        """``virtio_mem_unplug_all_request``: BUSY or ACK (never ERROR or NACK with
        QEMU's rules; run by run, it answers what an UNPLUG of a run would)."""
        busy_applies = self._plugged or self.rules.busy_unplug_all_when_empty
        if busy_applies and self._take_busy(_UNPLUG_ALL):
            return self._answers.unplug_all_busy
        if self.rules.unplug_all_by_runs:
            refused = self._unplug_runs()
            if refused is not None:
                return refused
            self._after_unplug_all()
            return self._answers.unplug_all_ack
        self._unplug_all()
        return self._answers.unplug_all_ack

    def _unplug_runs(self) -> _Answer | None:
        """UNPLUG_ALL as a loop of UNPLUGs over the lowest plugged run (its length cast
        to 16 bits if the rules say so); the first answer other than ACK, or None (ACK)."""
        answers = self._answers
        while True:
            first = self._bitmap.find(1)
            if first == -1:
                return None
            end = self._bitmap.find(0, first)
            length = (self._nr_blocks if end == -1 else end) - first
            if self.rules.unplug_all_run_u16:
                count = length % U16_WRAP
                if not count:
                    return None  # the run is left plugged, and the loop ends with ACK
            else:
                count = min(length, spec.MAX_BLOCKS_PER_REQUEST)
            gpa = self._addr + (first << self._shift)
            answer = self._state_change_request(_UNPLUG, gpa, count)
            if answer is not answers.unplug_ack:
                return answers.unplug_all_as(answer)

    def _unplug_all(self) -> None:
        """``virtio_mem_unplug_all`` once past BUSY: all unplugged, usable may shrink."""
        if self._plugged:
            if self.rules.unplug_all_count_u16:
                cleared = self._nr_blocks % U16_WRAP
                self._bitmap[:cleared] = bytes(cleared)
            else:
                self._bitmap[:] = bytes(self._nr_blocks)
            self._plugged = 0
        self._after_unplug_all()

    def _after_unplug_all(self) -> None:
        """The usable region after an ACKed UNPLUG_ALL, as ``rules`` say."""
        policy = self.rules.unplug_all_usable
        if policy == "requested":
            self._resize_usable_region(self._requested, can_shrink=True)
        elif policy == "zero":
            self._set_usable(0)
        self._config = None

    def _take_busy(self, req_type: int) -> bool:
        """Whether this otherwise successful request answers BUSY (injection).

        Stands for ``virtio_mem_is_busy`` (migration) and failed discard or
        preallocation in ``virtio_mem_set_block_state``; only for the requests
        the rules let answer BUSY.
        """
        if req_type not in self.rules.busy_requests:
            return False
        if self.busy_next > 0:
            self.busy_next -= 1
            return True
        return self.busy_rate > 0.0 and self.rng.random() < self.busy_rate

    # -- host side ---------------------------------------------------------------

    def resize(self, requested_size: int) -> None:
        """``qom-set <id> requested-size``: ``virtio_mem_set_requested_size``.

        Raises ValueError for a size QEMU refuses (negative, not a multiple of
        ``block_size``, larger than the region), and for an unchanged size when
        the rules refuse that. The usable region only grows here. QEMU raises
        the config interrupt on every accepted set, even when the value is
        unchanged.
        """
        if requested_size < 0 or requested_size % self._block_size:
            raise ValueError(
                f"requested-size {requested_size:#x} has to be a multiple of "
                f"block-size {self._block_size:#x}"
            )
        if requested_size > self._region_size:
            raise ValueError(
                f"requested-size {requested_size:#x} cannot exceed the memory backend "
                f"size {self._region_size:#x}"
            )
        if requested_size == self._requested and self.rules.resize_same_refused:
            raise ValueError(f"requested-size {requested_size:#x} is already the requested size")
        if requested_size != self._requested or self.rules.usable_policy == "slot":
            self._resize_usable_region(requested_size, can_shrink=False)
            self._requested = requested_size
            self._config = None
        self._config_interrupt()

    def system_reset(self) -> None:
        """A guest reboot: ``virtio_mem_system_reset`` unplugs all, then the device resets.

        The usable region is recomputed from ``requested_size`` (it may shrink);
        ``requested_size`` stays. No config interrupt.
        """
        self._unplug_all()
        self.device_reset()

    def device_reset(self) -> None:
        """The driver wrote status 0 (``virtio_reset``): clears ``broken`` only.

        virtio-mem has no device reset handler, so no block state changes
        (unless the rules say the device forgets its blocks, ``plugged_size`` kept).
        """
        self.broken = False
        self.broken_reason = None
        if self.rules.reset_forgets_blocks:
            self._bitmap[:] = bytes(self._nr_blocks)

    def _resize_usable_region(self, requested_size: int, *, can_shrink: bool) -> None:
        """``virtio_mem_resize_usable_region`` (or the rules' usable policy)."""
        policy = self.rules.usable_policy
        if policy == "slot" and not can_shrink and self._usable >= requested_size:
            return  # grown only while smaller than requested_size
        newsize = _usable_under(
            self.rules, requested_size, self._region_size, self._block_size, self._margin
        )
        if newsize < self._usable and not can_shrink:
            return
        self._set_usable(newsize)

    def _set_usable(self, newsize: int) -> None:
        self._usable = newsize
        self._usable_end = (self._addr + newsize) & _U64_MASK
        self._config = None

    def _config_interrupt(self) -> None:
        """``virtio_notify_config``: tell the driver to re-read the config."""
        callback = self.on_config_change
        if callback is not None:
            callback()


class _Answers:
    """Every answer the model gives, built once: response bytes and stats key."""

    def __init__(self) -> None:
        def make(req: RequestType, resp: ResponseType, state: int = 0) -> _Answer:
            return spec.encode_response(resp, state), (req.name, resp.name)

        plug, unplug, state = RequestType.PLUG, RequestType.UNPLUG, RequestType.STATE
        ack, nack = ResponseType.ACK, ResponseType.NACK
        busy, error = ResponseType.BUSY, ResponseType.ERROR
        self.plug_ack = make(plug, ack)
        self.plug_nack = make(plug, nack)
        self.plug_busy = make(plug, busy)
        self.plug_error = make(plug, error)
        self.unplug_ack = make(unplug, ack)
        self.unplug_busy = make(unplug, busy)
        self.unplug_error = make(unplug, error)
        self.unplug_all_ack = make(RequestType.UNPLUG_ALL, ack)
        self.unplug_all_busy = make(RequestType.UNPLUG_ALL, busy)
        self.state_error = make(state, error)
        self.state_plugged = make(state, ack, BlockState.PLUGGED)
        self.state_unplugged = make(state, ack, BlockState.UNPLUGGED)
        self.state_mixed = make(state, ack, BlockState.MIXED)
        self.unplug_nack = make(unplug, nack)
        self._plug_by_type = {
            ResponseType.ACK: self.plug_ack,
            ResponseType.NACK: self.plug_nack,
            ResponseType.BUSY: self.plug_busy,
            ResponseType.ERROR: self.plug_error,
        }
        self._unplug_all_by_type = {
            resp: make(RequestType.UNPLUG_ALL, resp) for resp in ResponseType
        }
        #: An unknown request type answered ERROR (stats key "UNKNOWN").
        self.malformed_error = (spec.encode_response(error), ("UNKNOWN", error.name))

    def plug_answer(self, resp: ResponseType) -> _Answer:
        """The PLUG answer of type ``resp``."""
        return self._plug_by_type[resp]

    def unplug_all_as(self, answer: _Answer) -> _Answer:
        """The UNPLUG_ALL answer of the same response type as ``answer``."""
        return self._unplug_all_by_type[ResponseType[answer[1][1]]]


def _check_geometry(
    addr: int,
    region_size: int,
    block_size: int,
    node_id: int,
    requested_size: int,
    usable_margin: int,
) -> None:
    """The properties QEMU's ``virtio_mem_device_realize`` (and the setters) refuse."""
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(f"block-size {block_size:#x} must be a power of two >= 1 MiB")
    if region_size <= 0 or region_size % block_size:
        raise ValueError(f"region size {region_size:#x} must be a positive multiple of block-size")
    if addr < 0 or addr % block_size or addr + region_size > _U64_MASK + 1:
        raise ValueError(f"addr {addr:#x} must be block-aligned and the region inside 64 bits")
    if requested_size < 0 or requested_size % block_size or requested_size > region_size:
        raise ValueError(
            f"requested-size {requested_size:#x} must be a multiple of block-size "
            "and at most the region size"
        )
    if not 0 <= node_id <= 0xFFFF:
        raise ValueError(f"node {node_id} does not fit the config's le16")
    if usable_margin < 0:
        raise ValueError(f"usable margin {usable_margin:#x} must not be negative")
