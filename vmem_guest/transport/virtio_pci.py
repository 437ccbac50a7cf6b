"""The virtio 1.x PCI transport, driven through mapped BARs (virtio spec 4.1).

Layouts live in one place, as ctypes structures: :class:`VirtioPciCap`,
:class:`VirtioPciNotifyCap` (spec 4.1.4) and :class:`VirtioPciCommonCfg`
(spec 4.1.4.3), whose field offsets are the register offsets.

Register accesses go through :class:`Mmio`: exact-width loads and stores via
``ctypes.c_uint8/16/32.from_address`` on the mapped BAR, 64-bit fields as two
32-bit stores, low half first (spec 4.1.3.1; Linux ``vp_iowrite64_twopart``).
Slicing or ``struct.pack_into`` on the mmap object reaches QEMU as byte
writes, which it rejects for 16-bit registers such as ``queue_enable``
(docs/test-vm.md section 6).
"""

from __future__ import annotations

import ctypes
import dataclasses
import enum
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Protocol

from vmem_guest.errors import TransportError

# -- PCI configuration space (PCI Local Bus spec 6.1, 6.7) ---------------------
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_REVISION_ID = 0x08
PCI_CAPABILITY_LIST = 0x34
PCI_STD_HEADER_END = 0x40
PCI_CAP_ID_MSIX = 0x11
PCI_CAP_ID_VNDR = 0x09
#: Linux ``PCI_FIND_CAP_TTL``: no well-formed list is longer.
PCI_FIND_CAP_TTL = 48
PCI_NUM_BARS = 6


class CfgType(enum.IntEnum):
    """``virtio_pci_cap.cfg_type`` (spec 4.1.4)."""

    COMMON = 1
    NOTIFY = 2
    ISR = 3
    DEVICE = 4
    PCI = 5


class Status(enum.IntFlag):
    """``device_status`` bits (spec 2.1)."""

    ACKNOWLEDGE = 1
    DRIVER = 2
    DRIVER_OK = 4
    FEATURES_OK = 8
    DEVICE_NEEDS_RESET = 64
    FAILED = 128


#: ``msix_config`` / ``queue_msix_vector`` value meaning "no vector" (spec 4.1.5.1.2).
VIRTIO_MSI_NO_VECTOR = 0xFFFF
#: ISR status bits (spec 4.1.4.5).
ISR_QUEUE = 1 << 0
ISR_CONFIG = 1 << 1


class VirtioPciCap(ctypes.LittleEndianStructure):
    """``struct virtio_pci_cap`` (spec 4.1.4)."""

    _pack_ = 1
    _fields_ = (
        ("cap_vndr", ctypes.c_uint8),
        ("cap_next", ctypes.c_uint8),
        ("cap_len", ctypes.c_uint8),
        ("cfg_type", ctypes.c_uint8),
        ("bar", ctypes.c_uint8),
        ("id", ctypes.c_uint8),
        ("padding", ctypes.c_uint8 * 2),
        ("offset", ctypes.c_uint32),
        ("length", ctypes.c_uint32),
    )


class VirtioPciNotifyCap(ctypes.LittleEndianStructure):
    """``struct virtio_pci_notify_cap`` (spec 4.1.4.4)."""

    _pack_ = 1
    _fields_ = (("cap", VirtioPciCap), ("notify_off_multiplier", ctypes.c_uint32))


class VirtioPciCommonCfg(ctypes.LittleEndianStructure):
    """``struct virtio_pci_common_cfg`` (spec 4.1.4.3): field offsets are register offsets."""

    _pack_ = 1
    _fields_ = (
        ("device_feature_select", ctypes.c_uint32),
        ("device_feature", ctypes.c_uint32),
        ("driver_feature_select", ctypes.c_uint32),
        ("driver_feature", ctypes.c_uint32),
        ("msix_config", ctypes.c_uint16),
        ("num_queues", ctypes.c_uint16),
        ("device_status", ctypes.c_uint8),
        ("config_generation", ctypes.c_uint8),
        ("queue_select", ctypes.c_uint16),
        ("queue_size", ctypes.c_uint16),
        ("queue_msix_vector", ctypes.c_uint16),
        ("queue_enable", ctypes.c_uint16),
        ("queue_notify_off", ctypes.c_uint16),
        ("queue_desc", ctypes.c_uint64),
        ("queue_driver", ctypes.c_uint64),
        ("queue_device", ctypes.c_uint64),
    )


def _reg(name: str) -> tuple[int, int]:
    """(offset, size) of a common-config register."""
    field = getattr(VirtioPciCommonCfg, name)
    return int(field.offset), int(field.size)


# -- capability parsing --------------------------------------------------------


def walk_capabilities(config: bytes) -> list[tuple[int, int]]:
    """The standard capability list as ``(cap_id, offset)`` pairs, in list order.

    Raises TransportError on a pointer into the standard header or past
    ``config``, on a loop, or on a list longer than Linux would follow.
    """
    if len(config) < PCI_STD_HEADER_END:
        raise TransportError(f"config space is {len(config)} bytes", length=len(config))
    status = int.from_bytes(config[PCI_STATUS : PCI_STATUS + 2], "little")
    if not status & PCI_STATUS_CAP_LIST:
        return []
    caps: list[tuple[int, int]] = []
    seen: set[int] = set()
    pos = config[PCI_CAPABILITY_LIST] & ~3
    while pos:
        if pos < PCI_STD_HEADER_END or pos + 2 > len(config):
            raise TransportError(f"capability pointer {pos:#x} out of range", pointer=pos)
        if pos in seen:
            raise TransportError(f"loop in the capability list at {pos:#x}", pointer=pos)
        if len(caps) >= PCI_FIND_CAP_TTL:
            raise TransportError("capability list too long", length=len(caps))
        seen.add(pos)
        caps.append((config[pos], pos))
        pos = config[pos + 1] & ~3
    return caps


@dataclasses.dataclass(frozen=True)
class VirtioCap:
    """One validated virtio vendor capability: a window into a BAR."""

    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_offset: int
    notify_off_multiplier: int = 0


@dataclasses.dataclass(frozen=True)
class VirtioCaps:
    """The four windows a modern virtio-pci driver needs."""

    common: VirtioCap
    notify: VirtioCap
    isr: VirtioCap
    device: VirtioCap
    msix: bool

    def bars(self) -> set[int]:
        return {c.bar for c in (self.common, self.notify, self.isr, self.device)}


#: The smallest window each capability must describe.
def _min_lengths(device_cfg_size: int) -> dict[int, int]:
    return {
        CfgType.COMMON: ctypes.sizeof(VirtioPciCommonCfg),
        CfgType.NOTIFY: 2,
        CfgType.ISR: 1,
        CfgType.DEVICE: device_cfg_size,
    }


def parse_virtio_caps(
    config: bytes, bar_sizes: Sequence[int], *, device_cfg_size: int = 0
) -> VirtioCaps:
    """Find and validate the COMMON, NOTIFY, ISR and DEVICE capabilities (spec 4.1.4).

    The first capability of each type wins; one naming a reserved BAR (> 5) is
    ignored as the spec requires. A chosen one must lie inside its BAR
    (``bar_sizes[bar]``) and be at least as long as its structure.
    """
    found: dict[int, VirtioCap] = {}
    msix = False
    min_len = _min_lengths(device_cfg_size)
    for cap_id, pos in walk_capabilities(config):
        if cap_id == PCI_CAP_ID_MSIX:
            msix = True
        if cap_id != PCI_CAP_ID_VNDR:
            continue
        if pos + ctypes.sizeof(VirtioPciCap) > len(config):
            raise TransportError(f"virtio capability at {pos:#x} runs past config space")
        cap = VirtioPciCap.from_buffer_copy(config, pos)
        if cap.cfg_type not in min_len or cap.cfg_type in found:
            continue
        if cap.cap_len < ctypes.sizeof(VirtioPciCap):
            raise TransportError(f"virtio capability at {pos:#x} has cap_len {cap.cap_len}")
        if cap.bar >= PCI_NUM_BARS:
            continue
        multiplier = 0
        if cap.cfg_type == CfgType.NOTIFY:
            size = ctypes.sizeof(VirtioPciNotifyCap)
            if cap.cap_len < size or pos + size > len(config):
                raise TransportError(f"notify capability at {pos:#x} is too short")
            multiplier = VirtioPciNotifyCap.from_buffer_copy(config, pos).notify_off_multiplier
        bar_size = bar_sizes[cap.bar] if cap.bar < len(bar_sizes) else 0
        name = CfgType(cap.cfg_type).name
        if cap.length < min_len[cap.cfg_type]:
            raise TransportError(
                f"{name} capability length {cap.length:#x} < {min_len[cap.cfg_type]:#x}",
                cap=name,
            )
        if cap.offset + cap.length > bar_size:
            raise TransportError(
                f"{name} capability {cap.offset:#x}+{cap.length:#x} exceeds BAR {cap.bar} "
                f"of {bar_size:#x} bytes",
                cap=name,
                bar=cap.bar,
            )
        found[cap.cfg_type] = VirtioCap(
            cap.cfg_type, cap.bar, cap.offset, cap.length, pos, multiplier
        )
    missing = [
        t.name
        for t in (CfgType.COMMON, CfgType.NOTIFY, CfgType.ISR, CfgType.DEVICE)
        if t not in found
    ]
    if missing:
        raise TransportError(f"missing virtio capabilities: {', '.join(missing)}", missing=missing)
    return VirtioCaps(
        found[CfgType.COMMON],
        found[CfgType.NOTIFY],
        found[CfgType.ISR],
        found[CfgType.DEVICE],
        msix,
    )


# -- register access -----------------------------------------------------------


class Mmio:
    """A window of a mapped BAR with exact-width, naturally aligned accesses."""

    def __init__(self, address: int, size: int) -> None:
        self.address = address
        self.size = size

    def window(self, offset: int, size: int) -> Mmio:
        self._check(offset, size, 1)
        return Mmio(self.address + offset, size)

    def _check(self, offset: int, size: int, align: int) -> int:
        if offset < 0 or offset + size > self.size or offset % align:
            raise TransportError(f"MMIO access {offset:#x}+{size} outside {self.size:#x}")
        return self.address + offset

    def read8(self, offset: int) -> int:
        return ctypes.c_uint8.from_address(self._check(offset, 1, 1)).value

    def read16(self, offset: int) -> int:
        return ctypes.c_uint16.from_address(self._check(offset, 2, 2)).value

    def read32(self, offset: int) -> int:
        return ctypes.c_uint32.from_address(self._check(offset, 4, 4)).value

    def write8(self, offset: int, value: int) -> None:
        ctypes.c_uint8.from_address(self._check(offset, 1, 1)).value = value

    def write16(self, offset: int, value: int) -> None:
        ctypes.c_uint16.from_address(self._check(offset, 2, 2)).value = value

    def write32(self, offset: int, value: int) -> None:
        ctypes.c_uint32.from_address(self._check(offset, 4, 4)).value = value

    def write64(self, offset: int, value: int) -> None:
        """Two 32-bit stores, low half first."""
        self._check(offset, 8, 4)
        self.write32(offset, value & 0xFFFF_FFFF)
        self.write32(offset + 4, value >> 32)

    def read_bytes(self, offset: int, length: int) -> bytes:
        """``length`` bytes by 32-bit loads (byte loads for an unaligned head or tail)."""
        self._check(offset, length, 1)
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            if pos % 4 == 0 and pos + 4 <= end:
                out += self.read32(pos).to_bytes(4, "little")
                pos += 4
            else:
                out.append(self.read8(pos))
                pos += 1
        return bytes(out)


class BarLike(Protocol):
    """What :class:`VirtioPciTransport` needs of a mapped BAR (``vfio.MappedBar``)."""

    address: int
    size: int


# -- the transport -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QueueInfo:
    """What queue setup settled on."""

    index: int
    size: int
    notify_offset: int


class VirtioPciTransport:
    """Common config, features, status, queues, ISR and notify (spec 4.1.4, 4.1.5)."""

    #: Attempts at a generation-stable config read before giving up.
    CONFIG_READ_TRIES = 100

    def __init__(
        self,
        caps: VirtioCaps,
        bars: Mapping[int, BarLike],
        *,
        name: str = "virtio",
        reset_timeout: float = 1.0,
    ) -> None:
        def window(cap: VirtioCap) -> Mmio:
            bar = bars[cap.bar]
            if cap.offset + cap.length > bar.size:
                raise TransportError(f"capability {cap.cfg_type} beyond mapped BAR {cap.bar}")
            return Mmio(bar.address + cap.offset, cap.length)

        self.caps = caps
        self.common = window(caps.common)
        self.notify_area = window(caps.notify)
        self.isr = window(caps.isr)
        self.device_cfg = window(caps.device)
        self.reset_timeout = reset_timeout
        self.log = logging.getLogger(f"vmem_guest.virtio_pci.{name}")
        self._notify_offsets: dict[int, int] = {}

    # status
    def status(self) -> int:
        return self.common.read8(_reg("device_status")[0])

    def _write_status(self, value: int) -> None:
        self.common.write8(_reg("device_status")[0], value)

    def add_status(self, bits: Status) -> None:
        self._write_status(self.status() | bits)

    def needs_reset(self) -> bool:
        return bool(self.status() & Status.DEVICE_NEEDS_RESET)

    def reset(self) -> None:
        """Write 0 and wait (bounded) until the device reads back 0 (spec 4.1.4.3.2)."""
        self._write_status(0)
        deadline = time.monotonic() + self.reset_timeout
        while self.status() != 0:
            if time.monotonic() > deadline:
                raise TransportError(f"device status {self.status():#x} after reset")
            time.sleep(0.001)

    # features
    def device_features(self) -> int:
        sel, _ = _reg("device_feature_select")
        feat, _ = _reg("device_feature")
        words = []
        for i in range(2):
            self.common.write32(sel, i)
            words.append(self.common.read32(feat))
        return words[0] | words[1] << 32

    def negotiate(self, driver_features: int) -> None:
        """Write ``driver_features``, set FEATURES_OK and check that it stuck (spec 3.1.1)."""
        sel, _ = _reg("driver_feature_select")
        feat, _ = _reg("driver_feature")
        for i in range(2):
            self.common.write32(sel, i)
            self.common.write32(feat, (driver_features >> (32 * i)) & 0xFFFF_FFFF)
        self.add_status(Status.FEATURES_OK)
        if not self.status() & Status.FEATURES_OK:
            raise TransportError(
                f"device refused features {driver_features:#x} (FEATURES_OK did not stick)",
                features=driver_features,
            )

    # queues
    def num_queues(self) -> int:
        return self.common.read16(_reg("num_queues")[0])

    def max_queue_size(self, index: int) -> int:
        """The device's maximum size for queue ``index``; TransportError if absent or enabled."""
        common = self.common
        if index >= self.num_queues():
            raise TransportError(f"queue {index} >= num_queues {self.num_queues()}", queue=index)
        common.write16(_reg("queue_select")[0], index)
        max_size = common.read16(_reg("queue_size")[0])
        if max_size == 0:
            raise TransportError(f"queue {index} is not available", queue=index)
        if common.read16(_reg("queue_enable")[0]):
            raise TransportError(f"queue {index} is already enabled", queue=index)
        return max_size

    def setup_queue(
        self,
        index: int,
        *,
        size: int,
        desc: int,
        driver: int,
        device: int,
    ) -> QueueInfo:
        """Program split queue ``index`` with ``size`` entries and enable it (spec 4.1.5.1.3).

        Its MSI-X vector, if any, is set before with :meth:`set_queue_vector`.

        ``size`` must be a power of two no larger than :meth:`max_queue_size`
        (split rings, spec 2.7). ``desc``, ``driver`` and ``device`` are bus
        addresses of the descriptor table, available and used rings.
        """
        common = self.common
        max_size = self.max_queue_size(index)
        if size <= 0 or size & (size - 1) or size > max_size:
            raise TransportError(f"queue {index}: size {size} (device max {max_size})")
        common.write16(_reg("queue_size")[0], size)
        common.write64(_reg("queue_desc")[0], desc)
        common.write64(_reg("queue_driver")[0], driver)
        common.write64(_reg("queue_device")[0], device)
        notify_off = common.read16(_reg("queue_notify_off")[0])
        notify_offset = notify_off * self.caps.notify.notify_off_multiplier
        self.notify_area.window(notify_offset, 2)  # bounds-checks it
        common.write16(_reg("queue_enable")[0], 1)
        if common.read16(_reg("queue_enable")[0]) != 1:
            raise TransportError(f"queue {index} did not enable", queue=index)
        self._notify_offsets[index] = notify_offset
        self.log.debug(
            "queue %d: size %d (max %d), notify at %#x", index, size, max_size, notify_offset
        )
        return QueueInfo(index, size, notify_offset)

    def set_config_vector(self, vector: int) -> bool:
        """Route config changes to MSI-X ``vector``; False when the device refused it.

        Spec 4.1.5.1.2: the device answers VIRTIO_MSI_NO_VECTOR on read-back when
        it could not map the vector (QEMU: ``msix_vector_use`` failed).
        """
        off = _reg("msix_config")[0]
        self.common.write16(off, vector)
        return self.common.read16(off) == vector

    def set_queue_vector(self, index: int, vector: int) -> bool:
        """Route queue ``index``'s interrupts to MSI-X ``vector`` (``queue_msix_vector``
        of the selected queue, spec 4.1.5.1.3 step 4); False when the device refused."""
        common = self.common
        common.write16(_reg("queue_select")[0], index)
        off = _reg("queue_msix_vector")[0]
        common.write16(off, vector)
        return common.read16(off) == vector

    def driver_ok(self) -> None:
        self.add_status(Status.DRIVER_OK)
        if self.needs_reset():
            raise TransportError("device needs reset right after DRIVER_OK")

    def notify(self, index: int) -> None:
        """Write the queue index to its notify address (spec 4.1.4.4)."""
        self.notify_area.write16(self._notify_offsets[index], index)

    def read_isr(self) -> int:
        """Read (and thereby clear) the ISR status byte (spec 4.1.4.5)."""
        return self.isr.read8(0)

    #: The ``config_generation`` the last :meth:`read_config` was stable under.
    last_config_generation: int | None = None

    def read_config(self, length: int) -> bytes:
        """``length`` bytes of device config, stable across ``config_generation``.

        Spec 4.1.4.3.1: re-read until the generation is the same before and after.
        """
        gen_off = _reg("config_generation")[0]
        for _ in range(self.CONFIG_READ_TRIES):
            before = self.common.read8(gen_off)
            data = self.device_cfg.read_bytes(0, length)
            if self.common.read8(gen_off) == before:
                self.last_config_generation = before
                return data
        raise TransportError("config_generation never settled", tries=self.CONFIG_READ_TRIES)
