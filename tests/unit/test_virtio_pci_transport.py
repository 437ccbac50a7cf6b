"""Register-level behaviour of VirtioPciTransport over plain memory standing in for BAR 4."""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

import pytest

from vmem_guest.errors import TransportError
from vmem_guest.transport import virtio_pci as vp

CC = vp.VirtioPciCommonCfg


@dataclass
class FakeBar:
    address: int
    size: int


def off(name: str) -> int:
    return int(getattr(CC, name).offset)


@pytest.fixture
def bar() -> tuple[ctypes.Array[ctypes.c_char], FakeBar]:
    mem = (ctypes.c_char * 0x4000)()
    return mem, FakeBar(ctypes.addressof(mem), 0x4000)


def caps() -> vp.VirtioCaps:
    return vp.VirtioCaps(
        common=vp.VirtioCap(vp.CfgType.COMMON, 4, 0, 0x1000, 0x40),
        notify=vp.VirtioCap(vp.CfgType.NOTIFY, 4, 0x3000, 0x1000, 0x70, 4),
        isr=vp.VirtioCap(vp.CfgType.ISR, 4, 0x1000, 0x1000, 0x50),
        device=vp.VirtioCap(vp.CfgType.DEVICE, 4, 0x2000, 0x1000, 0x60),
        msix=False,
    )


def test_setup_queue_programs_registers(bar: tuple[ctypes.Array[ctypes.c_char], FakeBar]) -> None:
    mem, fake = bar
    struct.pack_into("<H", mem, off("num_queues"), 1)
    struct.pack_into("<H", mem, off("queue_size"), 128)
    struct.pack_into("<H", mem, off("queue_notify_off"), 3)
    transport = vp.VirtioPciTransport(caps(), {4: fake})
    assert transport.max_queue_size(0) == 128
    info = transport.setup_queue(
        0, size=16, desc=0x1_2345_6000, driver=0x1_2345_6100, device=0x1_2345_6200
    )
    assert info == vp.QueueInfo(0, 16, 12)
    assert struct.unpack_from("<H", mem, off("queue_size"))[0] == 16
    assert struct.unpack_from("<Q", mem, off("queue_desc"))[0] == 0x1_2345_6000
    assert struct.unpack_from("<Q", mem, off("queue_device"))[0] == 0x1_2345_6200
    assert struct.unpack_from("<H", mem, off("queue_enable"))[0] == 1
    transport.notify(0)
    assert struct.unpack_from("<H", mem, 0x3000 + 12)[0] == 0


def test_setup_queue_checks(bar: tuple[ctypes.Array[ctypes.c_char], FakeBar]) -> None:
    mem, fake = bar
    struct.pack_into("<H", mem, off("num_queues"), 1)
    struct.pack_into("<H", mem, off("queue_size"), 8)
    transport = vp.VirtioPciTransport(caps(), {4: fake})
    with pytest.raises(TransportError, match="size 16"):
        transport.setup_queue(0, size=16, desc=0, driver=0, device=0)
    with pytest.raises(TransportError, match="size 6"):
        transport.setup_queue(0, size=6, desc=0, driver=0, device=0)
    with pytest.raises(TransportError, match="num_queues"):
        transport.max_queue_size(1)
    struct.pack_into("<H", mem, off("queue_notify_off"), 0x1000)  # 0x4000 past the window
    with pytest.raises(TransportError, match="MMIO access"):
        transport.setup_queue(0, size=8, desc=0, driver=0, device=0)


def test_features_status_config_isr(bar: tuple[ctypes.Array[ctypes.c_char], FakeBar]) -> None:
    mem, fake = bar
    transport = vp.VirtioPciTransport(caps(), {4: fake})
    struct.pack_into("<I", mem, off("device_feature"), 0x1)
    assert transport.device_features() == 0x1_0000_0001  # both selects read the same word
    transport.add_status(vp.Status.ACKNOWLEDGE)
    transport.negotiate(0x1_0000_0001)
    assert transport.status() == vp.Status.ACKNOWLEDGE | vp.Status.FEATURES_OK
    assert struct.unpack_from("<I", mem, off("driver_feature"))[0] == 1  # last select: high word
    mem[0x2000:0x2038] = bytes(range(56))
    assert transport.read_config(56) == bytes(range(56))
    mem[0x1000] = b"\x03"
    assert transport.read_isr() == 3
    transport.reset()
    assert transport.status() == 0
    struct.pack_into("<B", mem, off("device_status"), vp.Status.DEVICE_NEEDS_RESET)
    assert transport.needs_reset()


def test_read_config_keeps_its_generation(
    bar: tuple[ctypes.Array[ctypes.c_char], FakeBar],
) -> None:
    """The generation a config read was stable under is kept for the spec oracle."""
    mem, fake = bar
    transport = vp.VirtioPciTransport(caps(), {4: fake})
    assert transport.last_config_generation is None
    struct.pack_into("<B", mem, off("config_generation"), 7)
    transport.read_config(56)
    assert transport.last_config_generation == 7
    struct.pack_into("<B", mem, off("config_generation"), 8)
    assert transport.last_config_generation == 7
    transport.read_config(56)
    assert transport.last_config_generation == 8


def test_mmio_bounds_and_alignment(bar: tuple[ctypes.Array[ctypes.c_char], FakeBar]) -> None:
    _, fake = bar
    mmio = vp.Mmio(fake.address, 64)
    mmio.write64(8, 0x1122_3344_5566_7788)
    assert (mmio.read32(8), mmio.read32(12)) == (0x5566_7788, 0x1122_3344)
    assert mmio.read_bytes(7, 6) == bytes([0, 0x88, 0x77, 0x66, 0x55, 0x44])
    for bad in (lambda: mmio.read16(63), lambda: mmio.read32(2), lambda: mmio.write8(64, 0)):
        with pytest.raises(TransportError):
            bad()


def test_window_beyond_mapped_bar() -> None:
    with pytest.raises(TransportError, match="beyond mapped BAR"):
        vp.VirtioPciTransport(caps(), {4: FakeBar(0x1000, 0x2000)})
