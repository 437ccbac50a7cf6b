"""The split virtqueue against a device written in Python over the same memory.

The fake device sees only bus addresses: it translates them through a fake
bus-address -> memory map, reads the available ring and the descriptor chain
exactly as a device would (spec 2.7), answers, and writes the used entry.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Callable

import pytest

from vmem_guest import spec
from vmem_guest._linux.eventfd import EventFd
from vmem_guest.device import VirtioMemDevice
from vmem_guest.errors import DeviceBroken, DeviceTimeout, ResponseError
from vmem_guest.spec import BlockState, RequestType, ResponseType
from vmem_guest.transport import virtqueue as vq

BUS_BASE = 0x4000_0000
REQ = ctypes.sizeof(spec.VirtioMemReq)
RESP = ctypes.sizeof(spec.VirtioMemResp)


class FakeMemory:
    """DMA memory whose bus addresses are BUS_BASE + offset."""

    def __init__(self, size: int = 8192) -> None:
        self._map = mmap.mmap(-1, size)
        self._anchor = (ctypes.c_char * size).from_buffer(self._map)
        self.address = ctypes.addressof(self._anchor)
        self.size = size

    def bus_addr(self, offset: int, length: int = 1) -> int:
        assert offset >= 0 and offset + length <= self.size
        return BUS_BASE + offset

    def virt(self, bus: int, length: int) -> int:
        """The device's view: bus address -> host address, bounds-checked."""
        assert bus >= BUS_BASE and bus + length <= BUS_BASE + self.size, hex(bus)
        return self.address + (bus - BUS_BASE)


def answer_state(request: bytes) -> bytes:
    req = spec.VirtioMemReq.from_buffer_copy(request)
    if req.type == RequestType.STATE:
        return spec.encode_response(ResponseType.ACK, BlockState.UNPLUGGED)
    return spec.encode_response(ResponseType.ACK)


class FakeDevice:
    """The device side of the queue: reads avail + descriptors, writes response + used."""

    def __init__(self, mem: FakeMemory, queue: vq.Virtqueue) -> None:
        self.mem = mem
        self.size = queue.layout.size
        self.desc_bus, self.avail_bus, self.used_bus = (
            queue.desc_bus,
            queue.avail_bus,
            queue.used_bus,
        )
        self.last_avail = 0
        self.answer: Callable[[bytes], bytes] = answer_state
        self.used_id: int | None = None  # override: a wrong id
        self.used_len: int | None = None  # override: a wrong length
        self.silent = False
        self.interrupt = False
        self.requests: list[bytes] = []

    def _desc(self, index: int) -> vq.VringDesc:
        assert 0 <= index < self.size
        size = ctypes.sizeof(vq.VringDesc)
        return vq.VringDesc.from_address(self.mem.virt(self.desc_bus + index * size, size))

    def process(self) -> None:
        if self.silent:
            return
        avail_t, used_t = vq.avail_type(self.size), vq.used_type(self.size)
        avail = avail_t.from_address(self.mem.virt(self.avail_bus, ctypes.sizeof(avail_t)))
        used = used_t.from_address(self.mem.virt(self.used_bus, ctypes.sizeof(used_t)))
        while self.last_avail != avail.idx:
            head = avail.ring[self.last_avail % self.size]
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            first = self._desc(head)
            assert first.flags == vq.VRING_DESC_F_NEXT and first.len == REQ
            second = self._desc(first.next)
            assert second.flags == vq.VRING_DESC_F_WRITE and second.len == RESP
            request = ctypes.string_at(self.mem.virt(first.addr, first.len), first.len)
            self.requests.append(request)
            response = self.answer(request)
            ctypes.memmove(self.mem.virt(second.addr, len(response)), response, len(response))
            elem = used.ring[used.idx % self.size]
            elem.id = head if self.used_id is None else self.used_id
            elem.len = len(response) if self.used_len is None else self.used_len
            used.idx = (used.idx + 1) & 0xFFFF
            self.interrupt = True

    def wait_for_interrupt(self, timeout: float) -> bool:
        fired, self.interrupt = self.interrupt, False
        return fired


def make_queue(size: int = 16) -> tuple[vq.Virtqueue, FakeDevice]:
    mem = FakeMemory()
    layout = vq.RingLayout.for_size(size, request_len=REQ, response_len=RESP)
    holder: list[FakeDevice] = []
    queue = vq.Virtqueue(
        mem,
        layout,
        notify=lambda: holder[0].process(),
        wait_for_interrupt=lambda t: holder[0].wait_for_interrupt(t),
    )
    holder.append(FakeDevice(mem, queue))
    return queue, holder[0]


def test_layout_like_vring_init() -> None:
    # vring_init(num=16, align=4): avail at 256, used at align(256 + 6 + 32, 4) = 296.
    lay = vq.RingLayout.for_size(16, request_len=24, response_len=10)
    assert (lay.desc, lay.avail, lay.used) == (0, 256, 296)
    assert lay.request == 432  # used ring 6 + 8*16 = 134 bytes, then 16-aligned
    assert (lay.response, lay.total) == (456, 466)
    lay8 = vq.RingLayout.for_size(8, request_len=24, response_len=10)
    assert (lay8.avail, lay8.used) == (128, 152)  # 128 + 6 + 16 = 150 -> 152
    assert ctypes.sizeof(vq.VringDesc) == 16
    assert ctypes.sizeof(vq.avail_type(16)) == 6 + 2 * 16
    assert ctypes.sizeof(vq.used_type(16)) == 6 + 8 * 16


@pytest.mark.parametrize("size", [0, 3, 65536])
def test_layout_rejects_bad_sizes(size: int) -> None:
    with pytest.raises(ValueError):
        vq.RingLayout.for_size(size, request_len=24, response_len=10)


def test_round_trip_and_index_wrap() -> None:
    queue, device = make_queue(size=4)
    for i in range(40):  # wraps the ring index many times
        request = spec.encode_request(RequestType.STATE, 0x1_0000_0000 + i * 0x20_0000, 1)
        response = queue.submit(request, timeout=1.0)
        assert response == spec.encode_response(ResponseType.ACK, BlockState.UNPLUGGED)
        assert device.requests[-1] == request
    assert queue.avail.idx == 40 and queue.used.idx == 40


def test_used_index_wraps_at_16_bits() -> None:
    queue, device = make_queue(size=8)
    for index in (queue.avail, queue.used):
        index.idx = 0xFFFE
    queue.last_used = device.last_avail = 0xFFFE
    for _ in range(4):
        queue.submit(spec.encode_request(RequestType.PLUG, 0, 1), timeout=1.0)
    assert queue.used.idx == 2 and queue.last_used == 2


def test_through_virtio_mem_device() -> None:
    queue, _ = make_queue()

    class Channel:
        def read_config(self) -> bytes:
            return bytes(56)

        def submit(self, request: bytes) -> bytes:
            return queue.submit(request, timeout=1.0)

    assert VirtioMemDevice(Channel(), "vq").state(0x1_0000_0000, 64).state is BlockState.UNPLUGGED


def test_wrong_used_id_is_a_response_error() -> None:
    queue, device = make_queue()
    device.used_id = 5
    with pytest.raises(ResponseError, match="used id 5"):
        queue.submit(spec.encode_request(RequestType.STATE, 0, 1), timeout=1.0)
    with pytest.raises(DeviceBroken):
        queue.submit(spec.encode_request(RequestType.STATE, 0, 1), timeout=1.0)


@pytest.mark.parametrize("length", [0, 4, 9, 11, 4096])
def test_wrong_used_len_is_a_response_error(length: int) -> None:
    queue, device = make_queue()
    device.used_len = length
    with pytest.raises(ResponseError, match=f"used len {length}"):
        queue.submit(spec.encode_request(RequestType.STATE, 0, 1), timeout=1.0)


def test_two_used_entries_for_one_request() -> None:
    queue, device = make_queue()
    original = device.process

    def twice() -> None:
        original()
        queue.used.idx += 1

    queue.notify = twice
    with pytest.raises(ResponseError, match="2 used entries"):
        queue.submit(spec.encode_request(RequestType.STATE, 0, 1), timeout=1.0)


def test_no_answer_is_a_timeout() -> None:
    queue, device = make_queue()
    device.silent = True
    with pytest.raises(DeviceTimeout):
        queue.submit(spec.encode_request(RequestType.STATE, 0, 1), timeout=0.05)
    with pytest.raises(DeviceBroken, match="timed out"):
        queue.submit(spec.encode_request(RequestType.STATE, 0, 1), timeout=0.05)


def test_request_length_is_checked() -> None:
    queue, _ = make_queue()
    with pytest.raises(ValueError):
        queue.submit(b"\0" * 23, timeout=1.0)


def test_memory_too_small() -> None:
    mem = FakeMemory(4096)
    mem.size = 100
    layout = vq.RingLayout.for_size(16, request_len=REQ, response_len=RESP)
    with pytest.raises(ValueError):
        vq.Virtqueue(mem, layout, notify=lambda: None, wait_for_interrupt=lambda t: False)


def test_waits_on_an_eventfd_for_a_late_answer() -> None:
    """A device thread answers 50 ms later and signals an eventfd: submit blocks, no polling."""
    mem = FakeMemory()
    layout = vq.RingLayout.for_size(8, request_len=REQ, response_len=RESP)
    efd = EventFd()
    calls: list[float] = []

    def wait(timeout: float) -> bool:
        calls.append(timeout)
        fired = efd.wait(timeout)
        efd.drain()
        return fired

    holder: list[FakeDevice] = []

    def notify() -> None:
        def later() -> None:
            holder[0].process()
            efd.signal()

        threading.Timer(0.05, later).start()

    queue = vq.Virtqueue(mem, layout, notify=notify, wait_for_interrupt=wait)
    holder.append(FakeDevice(mem, queue))
    efd.signal()  # a spurious interrupt first (e.g. a config change): keep waiting
    response = queue.submit(spec.encode_request(RequestType.STATE, 0, 1), timeout=2.0)
    assert response[:2] == b"\0\0"
    assert 2 <= len(calls) <= 3
    efd.close()
