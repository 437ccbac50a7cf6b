"""A split virtqueue with one request in flight (virtio spec 2.7).

The rings live in DMA memory and are accessed through ctypes layouts at
fixed offsets, computed like Linux ``vring_init``: descriptor table at 0
(16-aligned), available ring right after it (2-aligned), used ring at the
next ``used_align`` boundary (4, the spec's minimum for split rings), then the
request and response buffers.

A request is a two-descriptor chain, always descriptors 0 and 1: the request
(device-readable) then the response (device-writable). Waiting for the answer
goes through a seam, ``wait_for_interrupt(timeout) -> bool``, so the same code
runs against a real interrupt eventfd and against a device written in Python.

Memory ordering: the stores below are separate C stores issued in program
order; x86 (TSO) keeps them in that order for the device. Weakly ordered
machines would need barriers before publishing ``avail.idx`` and after
reading ``used.idx``.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from vmem_guest.errors import DeviceBroken, DeviceTimeout, ResponseError

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4
MAX_QUEUE_SIZE = 32768  # spec 2.7: queue sizes up to 2^15


class VringDesc(ctypes.LittleEndianStructure):
    """``struct virtq_desc`` (spec 2.7.5)."""

    _pack_ = 1
    _fields_ = (
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("flags", ctypes.c_uint16),
        ("next", ctypes.c_uint16),
    )


class VringUsedElem(ctypes.LittleEndianStructure):
    """``struct virtq_used_elem`` (spec 2.7.8)."""

    _pack_ = 1
    _fields_ = (("id", ctypes.c_uint32), ("len", ctypes.c_uint32))


def avail_type(size: int) -> type[ctypes.LittleEndianStructure]:
    """``struct virtq_avail`` for a queue of ``size`` entries (spec 2.7.6)."""

    class VringAvail(ctypes.LittleEndianStructure):
        _pack_ = 1
        _fields_ = (
            ("flags", ctypes.c_uint16),
            ("idx", ctypes.c_uint16),
            ("ring", ctypes.c_uint16 * size),
            ("used_event", ctypes.c_uint16),
        )

    return VringAvail


def used_type(size: int) -> type[ctypes.LittleEndianStructure]:
    """``struct virtq_used`` for a queue of ``size`` entries (spec 2.7.8)."""

    class VringUsed(ctypes.LittleEndianStructure):
        _pack_ = 1
        _fields_ = (
            ("flags", ctypes.c_uint16),
            ("idx", ctypes.c_uint16),
            ("ring", VringUsedElem * size),
            ("avail_event", ctypes.c_uint16),
        )

    return VringUsed


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """Offsets of the rings and buffers in one DMA area."""

    size: int
    desc: int
    avail: int
    used: int
    request: int
    response: int
    request_len: int
    response_len: int
    total: int

    @classmethod
    def for_size(
        cls, size: int, *, request_len: int, response_len: int, used_align: int = USED_ALIGN
    ) -> RingLayout:
        if not 0 < size <= MAX_QUEUE_SIZE or size & (size - 1):
            raise ValueError(f"queue size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
        if used_align < USED_ALIGN or used_align & (used_align - 1):
            raise ValueError(f"used ring alignment {used_align}")
        desc = 0
        avail = desc + ctypes.sizeof(VringDesc) * size
        used = _align(avail + ctypes.sizeof(avail_type(size)), used_align)
        request = _align(used + ctypes.sizeof(used_type(size)), DESC_ALIGN)
        response = _align(request + request_len, 8)
        total = response + response_len
        return cls(size, desc, avail, used, request, response, request_len, response_len, total)


class DmaMemory(Protocol):
    """Memory the device can reach (``transport.dma.DmaBuffer`` or a test double)."""

    address: int
    size: int

    def bus_addr(self, offset: int, length: int = 1) -> int: ...


#: Wait for the queue's interrupt for at most ``timeout`` seconds; True if one came.
WaitForInterrupt = Callable[[float], bool]


class Virtqueue:
    """The driver side of one split virtqueue with a single request in flight."""

    HEAD = 0  # the request chain is always descriptors 0 -> 1

    def __init__(
        self,
        memory: DmaMemory,
        layout: RingLayout,
        *,
        notify: Callable[[], None],
        wait_for_interrupt: WaitForInterrupt,
        name: str = "vq",
    ) -> None:
        if layout.total > memory.size:
            raise ValueError(f"ring needs {layout.total:#x} bytes, memory has {memory.size:#x}")
        self.memory = memory
        self.layout = layout
        self.notify = notify
        self.wait_for_interrupt = wait_for_interrupt
        self.log = logging.getLogger(f"vmem_guest.virtqueue.{name}")
        base = memory.address
        ctypes.memset(base, 0, layout.total)
        self.desc = (VringDesc * layout.size).from_address(base + layout.desc)
        self.avail: Any = avail_type(layout.size).from_address(base + layout.avail)
        self.used: Any = used_type(layout.size).from_address(base + layout.used)
        self.last_used = 0
        self.broken: str | None = None
        # Bus addresses: checked contiguous once, here.
        self.desc_bus = memory.bus_addr(layout.desc, ctypes.sizeof(VringDesc) * layout.size)
        self.avail_bus = memory.bus_addr(layout.avail, ctypes.sizeof(self.avail))
        self.used_bus = memory.bus_addr(layout.used, ctypes.sizeof(self.used))
        self._request_bus = memory.bus_addr(layout.request, layout.request_len)
        self._response_bus = memory.bus_addr(layout.response, layout.response_len)

    def submit(self, request: bytes, timeout: float) -> bytes:
        """Send ``request``, wait for the used entry, return the response bytes.

        Raises DeviceTimeout when nothing is used within ``timeout`` seconds,
        ResponseError when the used entry is not ours (id) or not a full
        response (len). Either leaves the queue unusable (:attr:`broken`): a
        late or foreign used entry would be misread, so only a device reset helps.
        """
        if self.broken:
            raise DeviceBroken(f"virtqueue unusable: {self.broken}", reason=self.broken)
        lay = self.layout
        if len(request) != lay.request_len:
            raise ValueError(f"request is {len(request)} bytes, the ring takes {lay.request_len}")
        base = self.memory.address
        ctypes.memmove(base + lay.request, request, lay.request_len)
        ctypes.memset(base + lay.response, 0, lay.response_len)
        head, tail = self.desc[self.HEAD], self.desc[self.HEAD + 1]
        head.addr, head.len, head.flags, head.next = (
            self._request_bus,
            lay.request_len,
            VRING_DESC_F_NEXT,
            self.HEAD + 1,
        )
        tail.addr, tail.len, tail.flags, tail.next = (
            self._response_bus,
            lay.response_len,
            VRING_DESC_F_WRITE,
            0,
        )
        avail_idx = self.avail.idx
        self.avail.ring[avail_idx % lay.size] = self.HEAD
        self.avail.idx = (avail_idx + 1) & 0xFFFF  # publish after the ring entry
        self.notify()
        self._wait_used(timeout)
        return self._take_used()

    def _wait_used(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.used.idx == self.last_used:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.wait_for_interrupt(remaining):
                if self.used.idx != self.last_used:
                    return
                self.broken = "request timed out"
                raise DeviceTimeout(f"no answer within {timeout:g} s", timeout=timeout)

    def _take_used(self) -> bytes:
        lay = self.layout
        pending = (self.used.idx - self.last_used) & 0xFFFF
        if pending != 1:
            self.broken = f"{pending} used entries for one request"
            raise ResponseError(self.broken, used_idx=self.used.idx, last_used=self.last_used)
        elem = self.used.ring[self.last_used % lay.size]
        used_id, used_len = elem.id, elem.len
        self.last_used = (self.last_used + 1) & 0xFFFF
        if used_id != self.HEAD:
            self.broken = f"used id {used_id}, expected {self.HEAD}"
            raise ResponseError(self.broken, id=used_id)
        if used_len != lay.response_len:
            self.broken = f"used len {used_len}, expected {lay.response_len}"
            raise ResponseError(self.broken, len=used_len)
        return ctypes.string_at(self.memory.address + lay.response, lay.response_len)
