"""The split virtqueue against a device written in Python over the same memory.

The device (``vmem_guest.sim.ring``) sees only bus addresses: it translates
them through a fake bus-address -> memory map, reads the available ring and the
descriptor chain exactly as a device would (spec 2.7), answers, and writes the
used entry.
"""

from __future__ import annotations

import ctypes
import threading

import pytest

from vmem_guest import spec
from vmem_guest._linux.eventfd import EventFd
from vmem_guest.device import VirtioMemDevice
from vmem_guest.errors import DeviceBroken, DeviceTimeout, ResponseError
from vmem_guest.sim.ring import RingDevice, RingMemory, ring_pair
from vmem_guest.spec import BlockState, RequestType, ResponseType
from vmem_guest.transport import virtqueue as vq

REQ = ctypes.sizeof(spec.VirtioMemReq)
RESP = ctypes.sizeof(spec.VirtioMemResp)


def answer_state(request: bytes) -> bytes:
    req = spec.VirtioMemReq.from_buffer_copy(request)
    if req.type == RequestType.STATE:
        return spec.encode_response(ResponseType.ACK, BlockState.UNPLUGGED)
    return spec.encode_response(ResponseType.ACK)


def make_queue(size: int = 16) -> tuple[vq.Virtqueue, RingDevice]:
    return ring_pair(answer_state, size=size)


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
    mem = RingMemory(4096)
    mem.size = 100
    layout = vq.RingLayout.for_size(16, request_len=REQ, response_len=RESP)
    with pytest.raises(ValueError):
        vq.Virtqueue(mem, layout, notify=lambda: None, wait_for_interrupt=lambda t: False)


def test_waits_on_an_eventfd_for_a_late_answer() -> None:
    """A device thread answers 50 ms later and signals an eventfd: submit blocks, no polling."""
    mem = RingMemory()
    layout = vq.RingLayout.for_size(8, request_len=REQ, response_len=RESP)
    efd = EventFd()
    calls: list[float] = []

    def wait(timeout: float) -> bool:
        calls.append(timeout)
        fired = efd.wait(timeout)
        efd.drain()
        return fired

    holder: list[RingDevice] = []

    def notify() -> None:
        def later() -> None:
            holder[0].process()
            efd.signal()

        threading.Timer(0.05, later).start()

    queue = vq.Virtqueue(mem, layout, notify=notify, wait_for_interrupt=wait)
    holder.append(RingDevice(mem, queue, answer_state))
    efd.signal()  # a spurious interrupt first (e.g. a config change): keep waiting
    response = queue.submit(spec.encode_request(RequestType.STATE, 0, 1), timeout=2.0)
    assert response[:2] == b"\0\0"
    assert 2 <= len(calls) <= 3
    efd.close()
