"""The device side of a split virtqueue, in Python, over the driver's own ring memory.

:class:`RingMemory` is DMA memory whose bus addresses are ``BUS_BASE +
offset``; :class:`RingDevice` sees only bus addresses, reads the available
ring and each descriptor chain as a device does (spec 2.7.5-2.7.8), hands the
request bytes to an ``answer`` function and writes the response and the used
entry. Unlike a device, it can be told to misbehave in the used ring (a wrong
id or length, silence), which is what the agent's virtqueue must survive.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Callable

from vmem_guest import spec
from vmem_guest.transport import virtqueue as vq

#: Bus address of offset 0 of a :class:`RingMemory`.
BUS_BASE = 0x4000_0000

Answer = Callable[[bytes], bytes]


class RingProtocolError(Exception):
    """The driver broke the ring protocol (a device would call ``virtio_error``)."""


class RingMemory:
    """Anonymous memory with a fake bus-address map (a ``DmaMemory``)."""

    def __init__(self, size: int = 8192) -> None:
        self._map = mmap.mmap(-1, size)
        self._anchor = (ctypes.c_char * size).from_buffer(self._map)
        self.address = ctypes.addressof(self._anchor)
        self.size = size

    def bus_addr(self, offset: int, length: int = 1) -> int:
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"offset {offset:#x}+{length:#x} outside {self.size:#x} bytes")
        return BUS_BASE + offset

    def virt(self, bus: int, length: int) -> int:
        """The device's view: bus address -> process address, bounds-checked."""
        if bus < BUS_BASE or bus + length > BUS_BASE + self.size:
            raise RingProtocolError(f"bus address {bus:#x}+{length} outside the DMA memory")
        return self.address + (bus - BUS_BASE)


class RingDevice:
    """Answers each available chain of ``queue`` with ``answer(request)``.

    Attributes:
        answer: request bytes -> response bytes.
        used_id, used_len: when set, written into the used entry instead of the
            chain's head and the response length (a misbehaving device).
        silent: take nothing off the ring (a device that never answers).
        interrupt: set when a used entry was written, cleared by
            :meth:`wait_for_interrupt`.
        requests: every request read off the ring.
    """

    def __init__(self, mem: RingMemory, queue: vq.Virtqueue, answer: Answer) -> None:
        self.mem = mem
        self.size = queue.layout.size
        self.desc_bus, self.avail_bus, self.used_bus = (
            queue.desc_bus,
            queue.avail_bus,
            queue.used_bus,
        )
        self.last_avail = 0
        self.answer = answer
        self.used_id: int | None = None
        self.used_len: int | None = None
        self.silent = False
        self.interrupt = False
        self.requests: list[bytes] = []

    def _desc(self, index: int) -> vq.VringDesc:
        if not 0 <= index < self.size:
            raise RingProtocolError(f"descriptor {index} outside the ring")
        size = ctypes.sizeof(vq.VringDesc)
        return vq.VringDesc.from_address(self.mem.virt(self.desc_bus + index * size, size))

    def process(self) -> None:
        """The driver's notify: consume every new available chain."""
        if self.silent:
            return
        avail_t, used_t = vq.avail_type(self.size), vq.used_type(self.size)
        avail = avail_t.from_address(self.mem.virt(self.avail_bus, ctypes.sizeof(avail_t)))
        used = used_t.from_address(self.mem.virt(self.used_bus, ctypes.sizeof(used_t)))
        while self.last_avail != avail.idx:
            head = avail.ring[self.last_avail % self.size]
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            first = self._desc(head)
            if first.flags != vq.VRING_DESC_F_NEXT:
                raise RingProtocolError(f"request descriptor flags {first.flags:#x}")
            second = self._desc(first.next)
            if second.flags != vq.VRING_DESC_F_WRITE:
                raise RingProtocolError(f"response descriptor flags {second.flags:#x}")
            request = ctypes.string_at(self.mem.virt(first.addr, first.len), first.len)
            self.requests.append(request)
            response = self.answer(request)[: second.len]
            ctypes.memmove(self.mem.virt(second.addr, len(response)), response, len(response))
            elem = used.ring[used.idx % self.size]
            elem.id = head if self.used_id is None else self.used_id
            elem.len = len(response) if self.used_len is None else self.used_len
            used.idx = (used.idx + 1) & 0xFFFF
            self.interrupt = True

    def wait_for_interrupt(self, timeout: float) -> bool:
        """The driver's wait: answers are synchronous, so no waiting is needed."""
        fired, self.interrupt = self.interrupt, False
        return fired


def ring_pair(
    answer: Answer, size: int = 16, memory_size: int = 8192
) -> tuple[vq.Virtqueue, RingDevice]:
    """A driver :class:`~vmem_guest.transport.virtqueue.Virtqueue` wired to a RingDevice."""
    mem = RingMemory(memory_size)
    layout = vq.RingLayout.for_size(
        size,
        request_len=ctypes.sizeof(spec.VirtioMemReq),
        response_len=ctypes.sizeof(spec.VirtioMemResp),
    )
    holder: list[RingDevice] = []
    queue = vq.Virtqueue(
        mem,
        layout,
        notify=lambda: holder[0].process(),
        wait_for_interrupt=lambda timeout: holder[0].wait_for_interrupt(timeout),
        name="sim",
    )
    holder.append(RingDevice(mem, queue, answer))
    return queue, holder[0]
