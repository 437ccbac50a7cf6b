"""Capability parsing from crafted PCI config space (virtio spec 4.1.4)."""

from __future__ import annotations

import struct

import pytest

from vmem_guest.errors import TransportError
from vmem_guest.transport import virtio_pci as vp

BAR4 = 0x4000
BARS = [0, 0x1000, 0, 0, BAR4, 0]  # BAR 1: the MSI-X table in QEMU; BAR 4: virtio


def vendor_cap(cfg_type: int, bar: int, offset: int, length: int, mult: int | None = None) -> bytes:
    cap_len = 16 if mult is None else 20
    raw = struct.pack("<BBBBBB2xII", 0x09, 0, cap_len, cfg_type, bar, 0, offset, length)
    return raw if mult is None else raw + struct.pack("<I", mult)


def config_space(caps: list[tuple[int, bytes]], first: int | None = None) -> bytearray:
    """256 bytes: 1af4:1058 rev 1 with ``caps`` chained in the given order."""
    cfg = bytearray(256)
    struct.pack_into("<HH", cfg, 0, 0x1AF4, 0x1058)
    struct.pack_into("<H", cfg, vp.PCI_STATUS, vp.PCI_STATUS_CAP_LIST)
    cfg[vp.PCI_REVISION_ID] = 1
    cfg[vp.PCI_CAPABILITY_LIST] = caps[0][0] if first is None else first
    for i, (pos, body) in enumerate(caps):
        cfg[pos : pos + len(body)] = body
        cfg[pos + 1] = caps[i + 1][0] if i + 1 < len(caps) else 0
    return cfg


def qemu_caps(notify_len: int = 0x1000) -> list[tuple[int, bytes]]:
    """QEMU's order: newest first (PCI_CFG, NOTIFY, DEVICE, ISR, COMMON), all in BAR 4."""
    return [
        (0x84, vendor_cap(vp.CfgType.PCI, 0, 0, 0) + bytes(4)),
        (0x70, vendor_cap(vp.CfgType.NOTIFY, 4, 0x3000, notify_len, mult=4)),
        (0x60, vendor_cap(vp.CfgType.DEVICE, 4, 0x2000, 0x1000)),
        (0x50, vendor_cap(vp.CfgType.ISR, 4, 0x1000, 0x1000)),
        (0x40, vendor_cap(vp.CfgType.COMMON, 4, 0x0000, 0x1000)),
    ]


def test_qemu_layout() -> None:
    caps = vp.parse_virtio_caps(bytes(config_space(qemu_caps())), BARS, device_cfg_size=56)
    assert (caps.common.bar, caps.common.offset, caps.common.length) == (4, 0, 0x1000)
    assert (caps.isr.offset, caps.device.offset, caps.notify.offset) == (0x1000, 0x2000, 0x3000)
    assert caps.notify.notify_off_multiplier == 4
    assert caps.notify.cap_offset == 0x70
    assert caps.bars() == {4}
    assert not caps.msix


def test_msix_capability_is_noticed() -> None:
    msix = (0x98, bytes([vp.PCI_CAP_ID_MSIX, 0, 1, 0]) + struct.pack("<II", 1, 0x801))
    cfg = config_space([msix, *qemu_caps()])
    assert vp.parse_virtio_caps(bytes(cfg), BARS).msix
    assert next(cap_id for cap_id, _ in vp.walk_capabilities(bytes(cfg))) == vp.PCI_CAP_ID_MSIX


def test_cap_beyond_the_bar_is_an_error() -> None:
    cfg = config_space(qemu_caps(notify_len=0x2000))
    with pytest.raises(TransportError, match="NOTIFY capability 0x3000\\+0x2000 exceeds BAR 4"):
        vp.parse_virtio_caps(bytes(cfg), BARS)


def test_cap_in_an_unimplemented_bar_is_an_error() -> None:
    caps = qemu_caps()
    caps[2] = (0x60, vendor_cap(vp.CfgType.DEVICE, 2, 0, 0x100))
    with pytest.raises(TransportError, match="exceeds BAR 2"):
        vp.parse_virtio_caps(bytes(config_space(caps)), BARS)


def test_offset_overflow_is_an_error() -> None:
    caps = qemu_caps()
    caps[3] = (0x50, vendor_cap(vp.CfgType.ISR, 4, 0xFFFF_FFFF, 0x10))
    with pytest.raises(TransportError, match="exceeds BAR"):
        vp.parse_virtio_caps(bytes(config_space(caps)), BARS)


def test_loop_in_the_list_is_an_error() -> None:
    cfg = config_space(qemu_caps())
    cfg[0x40 + 1] = 0x70  # COMMON points back to NOTIFY
    with pytest.raises(TransportError, match="loop"):
        vp.walk_capabilities(bytes(cfg))
    with pytest.raises(TransportError, match="loop"):
        vp.parse_virtio_caps(bytes(cfg), BARS)


def test_self_loop_is_an_error() -> None:
    cfg = config_space(qemu_caps())
    cfg[0x84 + 1] = 0x84
    with pytest.raises(TransportError, match="loop"):
        vp.walk_capabilities(bytes(cfg))


def test_pointer_into_the_header_is_an_error() -> None:
    cfg = config_space(qemu_caps())
    cfg[0x50 + 1] = 0x10
    with pytest.raises(TransportError, match="out of range"):
        vp.walk_capabilities(bytes(cfg))


def test_low_pointer_bits_are_ignored() -> None:
    cfg = config_space(qemu_caps(), first=0x84 | 3)
    assert [pos for _, pos in vp.walk_capabilities(bytes(cfg))] == [0x84, 0x70, 0x60, 0x50, 0x40]


def test_no_capability_list() -> None:
    cfg = config_space(qemu_caps())
    struct.pack_into("<H", cfg, vp.PCI_STATUS, 0)
    assert vp.walk_capabilities(bytes(cfg)) == []
    with pytest.raises(TransportError, match="missing virtio capabilities: COMMON, NOTIFY"):
        vp.parse_virtio_caps(bytes(cfg), BARS)


def test_missing_device_cap() -> None:
    caps = [c for c in qemu_caps() if c[0] != 0x60]
    with pytest.raises(TransportError, match="missing virtio capabilities: DEVICE"):
        vp.parse_virtio_caps(bytes(config_space(caps)), BARS)


def test_first_of_each_type_wins_and_reserved_bar_is_skipped() -> None:
    extra_reserved = (0xA0, vendor_cap(vp.CfgType.COMMON, 7, 0, 0x1000))
    extra_second = (0xB0, vendor_cap(vp.CfgType.DEVICE, 4, 0x3800, 0x100))
    cfg = config_space([extra_reserved, *qemu_caps(), extra_second])
    caps = vp.parse_virtio_caps(bytes(cfg), BARS)
    assert caps.common.cap_offset == 0x40  # the BAR-7 one is ignored (spec 4.1.4)
    assert caps.device.offset == 0x2000  # the later one is not used


def test_windows_too_small_are_errors() -> None:
    caps = qemu_caps()
    caps[4] = (0x40, vendor_cap(vp.CfgType.COMMON, 4, 0, 16))
    with pytest.raises(TransportError, match="COMMON capability length"):
        vp.parse_virtio_caps(bytes(config_space(caps)), BARS)
    with pytest.raises(TransportError, match="DEVICE capability length"):
        vp.parse_virtio_caps(bytes(config_space(qemu_caps())), BARS, device_cfg_size=0x2000)


def test_short_notify_cap_is_an_error() -> None:
    caps = qemu_caps()
    caps[1] = (0x70, vendor_cap(vp.CfgType.NOTIFY, 4, 0x3000, 0x1000))  # cap_len 16, no mult
    with pytest.raises(TransportError, match="notify capability at 0x70 is too short"):
        vp.parse_virtio_caps(bytes(config_space(caps)), BARS)


def test_cap_running_past_config_space() -> None:
    cfg = config_space(qemu_caps())
    cfg[0x40 + 1] = 0xF8  # a vendor cap at 0xf8 would end at 0x108
    cfg[0xF8] = 0x09
    with pytest.raises(TransportError, match="runs past"):
        vp.parse_virtio_caps(bytes(cfg), BARS)


def test_layout_structs() -> None:
    import ctypes

    assert ctypes.sizeof(vp.VirtioPciCap) == 16
    assert ctypes.sizeof(vp.VirtioPciNotifyCap) == 20
    assert ctypes.sizeof(vp.VirtioPciCommonCfg) == 56
    offsets = {
        name: getattr(vp.VirtioPciCommonCfg, name).offset
        for name, _ in vp.VirtioPciCommonCfg._fields_
    }
    assert offsets["device_status"] == 20 and offsets["config_generation"] == 21
    assert offsets["queue_enable"] == 28 and offsets["queue_notify_off"] == 30
    assert (offsets["queue_desc"], offsets["queue_driver"], offsets["queue_device"]) == (32, 40, 48)
