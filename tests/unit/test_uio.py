"""UIO: bind --uio and back, and the UIO function (config, BARs, INTx through
/dev/uioN) against the fake sysfs tree, whose kernel thread plays uio_pci_generic."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_pci_sysfs import BDF, FakeKernel
from test_cli import run_main
from test_doctor import RELEASE, Guest, detail, status
from test_virtio_pci_caps import config_space, qemu_caps

from vmem_guest import binding, service
from vmem_guest.binding import UIO_PCI_GENERIC, VFIO_PCI, bind, bind_uio, unbind
from vmem_guest.device import Binding, Cause, InterruptMode
from vmem_guest.doctor import Status
from vmem_guest.errors import TransportError
from vmem_guest.pci import get_device
from vmem_guest.transport import pci_config, uio
from vmem_guest.transport import virtio_pci as vp
from vmem_guest.transport.function import Interrupts, PciFunction, binding_of
from vmem_guest.transport.uio import Resource, UioFunction, parse_resources

BAR4_START = 0x8_0000_0000
BAR4_SIZE = 0x4000
#: sysfs ``resource`` flags QEMU's BAR 4 shows (64-bit prefetchable memory).
BAR4_FLAGS = 0x14220C


@pytest.fixture
def uio_fk(fk: FakeKernel) -> FakeKernel:
    """The fake kernel with uio_pci_generic registered and the device's config space,
    ``resource`` and ``resource4`` as sysfs shows a QEMU virtio-mem-pci function."""
    fk.add_driver(UIO_PCI_GENERIC)
    devdir = fk.devdir(BDF)
    config = config_space(qemu_caps())
    config[pci_config.PCI_COMMAND] = 0  # memory space and bus master off
    (devdir / "config").write_bytes(bytes(config))
    lines = ["0x0000000000000000 0x0000000000000000 0x0000000000000000"] * 13
    lines[4] = f"{BAR4_START:#018x} {BAR4_START + BAR4_SIZE - 1:#018x} {BAR4_FLAGS:#018x}"
    (devdir / "resource").write_text("\n".join(lines) + "\n")
    bar = bytearray(BAR4_SIZE)
    bar[0x1000] = vp.ISR_CONFIG  # the ISR byte, as the device would have it
    (devdir / "resource4").write_bytes(bytes(bar))
    return fk


def command(fk: FakeKernel) -> int:
    data = (fk.devdir(BDF) / "config").read_bytes()
    return int.from_bytes(data[pci_config.PCI_COMMAND : pci_config.PCI_COMMAND + 2], "little")


# ----- binding --------------------------------------------------------------------------


def test_bind_uio_and_back(uio_fk: FakeKernel) -> None:
    node = bind_uio("00:03.0", sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
    assert node == uio_fk.dev / "uio0" and node.exists()
    assert uio_fk.override(BDF) == UIO_PCI_GENERIC
    assert uio_fk.log == [("unbind", "virtio-pci", BDF), ("probe", BDF, UIO_PCI_GENERIC)]
    assert uio.uio_number(BDF, uio_fk.sys) == 0
    # Binding again is a no-op that returns the same node.
    assert bind_uio(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev) == node
    assert len(uio_fk.log) == 2

    assert unbind(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev) == "virtio-pci"
    assert uio_fk.log[2:] == [("unbind", UIO_PCI_GENERIC, BDF), ("probe", BDF, "virtio-pci")]
    assert not node.exists() and uio.uio_number(BDF, uio_fk.sys) is None


def test_bind_uio_needs_no_noiommu_mode(uio_fk: FakeKernel) -> None:
    bind_uio(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
    assert (uio_fk.sys / "module/vfio/parameters/enable_unsafe_noiommu_mode").read_text() == "N\n"


def test_a_held_uio_device_is_neither_unbound_nor_rebound(uio_fk: FakeKernel) -> None:
    node = bind_uio(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
    function = UioFunction.open(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
    opened: list[str] = []
    real_open = os.open

    def recording_open(path: object, *args: object) -> int:
        opened.append(str(path))
        return real_open(path, *args)  # type: ignore[arg-type]

    try:
        assert uio.held(BDF, uio_fk.sys)
        with pytest.raises(TransportError, match=r"in use.*agent running"):
            unbind(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
        with pytest.raises(TransportError, match="in use"):
            bind(BDF, allow_noiommu=True, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
        with pytest.raises(TransportError, match="in use"):
            UioFunction.open(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
        assert uio_fk.driver_of(BDF) == UIO_PCI_GENERIC
        # None of them opened /dev/uioN: its every close clears Bus Master
        # (uio_pci_generic.c release), which would stop the agent's DMA.
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "open", recording_open)
            assert uio.held(BDF, uio_fk.sys)
            with pytest.raises(TransportError, match="in use"):
                UioFunction.open(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
            with pytest.raises(TransportError, match="in use"):
                unbind(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
        assert opened and not any(path == str(node) for path in opened), opened
    finally:
        function.close()
    assert not uio.held(BDF, uio_fk.sys)
    assert unbind(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev) == "virtio-pci"


def test_from_vfio_to_uio(uio_fk: FakeKernel) -> None:
    bind(BDF, allow_noiommu=True, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
    node = bind_uio(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
    assert uio_fk.driver_of(BDF) == UIO_PCI_GENERIC and node.exists()
    assert not (uio_fk.dev / "vfio/noiommu-0").exists()


def test_uio_that_does_not_take_the_device_hands_it_back(
    uio_fk: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No uio/uioN ever appears: as when the probe fails (no INTx disable support).
    monkeypatch.setattr(uio_fk, "_probe", lambda bdf: uio_fk.log.append(("probe-failed", bdf)))
    with pytest.raises(TransportError, match=f"{UIO_PCI_GENERIC} did not bind"):
        bind_uio(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev, timeout=0.2)
    assert uio_fk.override(BDF) == "\n"


def test_the_agent_drives_a_uio_bound_device_through_uio(uio_fk: FakeKernel) -> None:
    bind_uio(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
    dev = get_device(BDF, uio_fk.sys, use_udev=False)
    # Left with uio_pci_generic: no vfio-pci rebinding, no --noiommu asked for.
    assert service.bind_device(dev, allow_noiommu=False) == "uio"
    assert uio_fk.driver_of(BDF) == UIO_PCI_GENERIC
    assert binding_of("uio") is Binding.UIO and Binding.UIO.text == "uio"


def test_unbind_leaves_other_drivers_alone(uio_fk: FakeKernel) -> None:
    assert binding.OURS == (VFIO_PCI, UIO_PCI_GENERIC)
    assert unbind(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev) == "virtio-pci"
    assert uio_fk.log == []


# ----- the function ---------------------------------------------------------------------


@pytest.fixture
def function(uio_fk: FakeKernel) -> UioFunction:
    bind_uio(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
    opened = UioFunction.open(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)
    yield opened  # type: ignore[misc]
    opened.close()


def test_parse_resources() -> None:
    text = (
        "0x00000000fe000000 0x00000000fe000fff 0x0000000000040200\n"
        "0x0000000000000000 0x0000000000000000 0x0000000000000000\n"
        "0x000000000000c000 0x000000000000c03f 0x0000000000040101\n"
    )
    assert parse_resources(text) == [
        Resource(0xFE000000, 0xFE000FFF, 0x40200),
        Resource(0, 0, 0),
        Resource(0xC000, 0xC03F, 0x40101),
    ]
    assert [r.size for r in parse_resources(text)] == [0x1000, 0, 0x40]
    assert [r.is_memory for r in parse_resources(text)] == [True, False, False]
    with pytest.raises(TransportError, match="not three hex numbers"):
        parse_resources("0x0 0x1\n")


def test_open_refuses_a_function_not_bound_to_uio(uio_fk: FakeKernel) -> None:
    with pytest.raises(TransportError, match=r"bound to virtio-pci, not uio_pci_generic.*--uio"):
        UioFunction.open(BDF, sysfs_root=uio_fk.sys, dev_root=uio_fk.dev)


def test_config_bars_and_bus_master(uio_fk: FakeKernel, function: UioFunction) -> None:
    checked: PciFunction = function  # the channel's interface, statically
    assert checked.access == "uio"
    config = function.config_space()
    assert config[:4] == bytes.fromhex("f41a5810") and len(config) == 256
    assert function.bar_sizes() == [0, 0, 0, 0, BAR4_SIZE, 0]
    caps = vp.parse_virtio_caps(config, function.bar_sizes())
    assert caps.bars() == {4}
    bar = function.map_bar(4)
    assert bar.size == BAR4_SIZE
    assert ctypes.c_uint8.from_address(bar.address + 0x1000).value == vp.ISR_CONFIG
    with pytest.raises(TransportError, match=r"BAR 0 .* cannot be mmap'd"):
        function.map_bar(0)
    function.enable_bus_master()
    wanted = pci_config.PCI_COMMAND_MEMORY | pci_config.PCI_COMMAND_MASTER
    assert command(uio_fk) & wanted == wanted


class IsrTransport:
    """The one transport call interrupts make: the ISR read (which clears it)."""

    def __init__(self, isr: list[int]) -> None:
        self.isr = isr

    def read_isr(self) -> int:
        return self.isr.pop(0) if self.isr else 0


def test_intx_through_dev_uio(uio_fk: FakeKernel, function: UioFunction) -> None:
    transport = IsrTransport([vp.ISR_CONFIG, vp.ISR_QUEUE])
    interrupts = function.open_interrupts(transport)  # type: ignore[arg-type]
    checked: Interrupts = interrupts
    assert checked.mode is InterruptMode.INTX
    assert interrupts.queue_fd() == interrupts.config_fd()  # one line, both causes
    assert interrupts.release_request_fd() is None
    assert not command(uio_fk) & pci_config.PCI_COMMAND_INTX_DISABLE  # enabled at open
    assert not interrupts.wait(0)

    uio_fk.raise_uio_interrupt(BDF)  # the host resized: INTx, masked by the handler
    assert command(uio_fk) & pci_config.PCI_COMMAND_INTX_DISABLE
    assert interrupts.wait(1.0)
    assert interrupts.take() == Cause.CONFIG
    assert interrupts.event_count == 1
    # Re-enabled through the command register, and nothing pending any more.
    assert not command(uio_fk) & pci_config.PCI_COMMAND_INTX_DISABLE
    assert not interrupts.wait(0)

    uio_fk.raise_uio_interrupt(BDF)
    assert interrupts.wait(1.0)
    assert interrupts.take() == Cause.QUEUE
    assert interrupts.event_count == 2

    interrupts.repost()  # a config change a request wait saw: the outer loop wakes
    assert interrupts.wait(0)
    assert interrupts.take() == Cause.NONE  # the cause itself is the channel's to keep
    assert not interrupts.wait(0)
    interrupts.close()
    assert command(uio_fk) & pci_config.PCI_COMMAND_INTX_DISABLE  # off again


def test_the_interrupt_fd_works_in_a_selector(uio_fk: FakeKernel, function: UioFunction) -> None:
    import selectors

    interrupts = function.open_interrupts(IsrTransport([vp.ISR_CONFIG]))  # type: ignore[arg-type]
    with selectors.DefaultSelector() as selector:
        selector.register(interrupts.config_fd(), selectors.EVENT_READ)
        assert selector.select(0) == []
        uio_fk.raise_uio_interrupt(BDF)
        assert len(selector.select(1.0)) == 1
        assert interrupts.take() == Cause.CONFIG
        assert selector.select(0) == []
    interrupts.close()


def test_the_command_register_is_written_by_its_high_byte_only(
    uio_fk: FakeKernel, function: UioFunction, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[tuple[int, bytes]] = []
    real = os.pwrite

    def recording(fd: int, data: bytes, offset: int) -> int:
        writes.append((offset, bytes(data)))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording)
    function.config.config_write(pci_config.PCI_COMMAND, struct.pack("<H", 0x0406))
    writes.clear()
    function.config.set_intx(True)
    assert writes == [(5, b"\x00")]  # bit 10 is bit 2 of byte 5; the low byte untouched
    assert command(uio_fk) == 0x0006
    writes.clear()
    function.config.set_intx(True)
    assert writes == []  # already enabled


def test_a_removed_device_reads_as_a_transport_error(
    function: UioFunction, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupts = function.open_interrupts(IsrTransport([]))  # type: ignore[arg-type]

    def unregistered(fd: int, size: int) -> bytes:  # uio_read once info is gone
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "read", unregistered)
    with pytest.raises(TransportError, match=r"event count failed.*unbound or removed"):
        interrupts.take()
    monkeypatch.undo()
    interrupts.close()


def test_dma_memory_is_physical_and_kept_out_of_the_regions(
    function: UioFunction, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[int, list[tuple[int, int]], Path]] = []

    def outside(size: int, avoid: list[tuple[int, int]], *, pagemap_path: Path) -> str:
        calls.append((size, list(avoid), pagemap_path))
        return "buffer"

    monkeypatch.setattr(uio.PhysBuffer, "outside", outside)
    function.pagemap_path = tmp_path / "pagemap"
    assert function.dma_buffer(4096, [(1 << 32, 2 << 32)]) == "buffer"  # type: ignore[comparison-overlap]
    assert calls == [(4096, [(1 << 32, 2 << 32)], tmp_path / "pagemap")]


# ----- the command line -----------------------------------------------------------------


def test_bind_uio_on_the_command_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    asked: list[str] = []

    def bind_uio(bdf: str) -> Path:
        asked.append(bdf)
        return tmp_path / "uio3"

    monkeypatch.setattr(binding, "bind_uio", bind_uio)
    code, out, _ = run_main(["bind", "--uio", "00:03.0"], capsys)
    assert (code, asked) == (0, ["00:03.0"])
    assert out == f"0000:00:03.0 bound to uio_pci_generic ({tmp_path / 'uio3'})\n"
    code, out, err = run_main(["bind", "--uio", "--noiommu", "00:03.0"], capsys)
    assert code == 2 and out == "" and "--uio and --noiommu exclude each other" in err
    assert asked == ["00:03.0"]


# ----- doctor ---------------------------------------------------------------------------


def no_module(guest: Guest, name: str) -> None:
    """Take ``name``.ko out of the fake guest's modules.dep (and no kernel config)."""
    dep = guest.lib_modules / RELEASE / "modules.dep"
    dep.write_text("".join(line for line in dep.read_text().splitlines(True) if name not in line))


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    made = Guest(tmp_path)
    with made.pci.running():
        yield made


def test_doctor_with_the_device_bound_to_uio(guest: Guest) -> None:
    guest.pci.add_driver(UIO_PCI_GENERIC)
    bind_uio(BDF, sysfs_root=guest.sys, dev_root=guest.dev)
    no_module(guest, "vfio-pci")  # no VFIO at all: the UIO path needs none
    report = guest.examine(noiommu=False)
    assert status(report, "vfio-pci") is Status.NOT_NEEDED
    assert status(report, "iommu") is Status.OK and detail(report, "iommu") == f"{BDF}: uio"
    assert status(report, "uio_pci_generic") is Status.OK
    assert detail(report, "uio_pci_generic").endswith(f"bound: {BDF}")
    assert status(report, "secretmem") is Status.OK  # physical addresses: it applies
    assert status(report, "interrupt remapping") is Status.NOT_NEEDED
    assert report.ready
    assert report.devices[0]["driver"] == UIO_PCI_GENERIC


def test_doctor_points_to_uio_where_vfio_is_missing(guest: Guest) -> None:
    no_module(guest, "vfio-pci")
    report = guest.examine()
    assert status(report, "vfio-pci") is Status.MISSING and not report.ready
    assert detail(report, "vfio-pci").endswith(
        "; fallback: vmem-guest bind --uio BDF (uio_pci_generic is available)"
    )
    assert status(report, "uio_pci_generic") is Status.OK
    assert "bind --uio BDF uses it" in detail(report, "uio_pci_generic")


def test_doctor_without_uio(guest: Guest) -> None:
    no_module(guest, "uio_pci_generic")
    report = guest.examine()  # VFIO serves (no-IOMMU allowed): the fallback is not needed
    assert status(report, "uio_pci_generic") is Status.NOT_NEEDED
    assert report.ready
    no_module(guest, "vfio-pci")
    report = guest.examine()  # neither
    assert status(report, "uio_pci_generic") is Status.MISSING
    assert "no uio_pci_generic" in detail(report, "uio_pci_generic")
    assert "fallback" not in detail(report, "vfio-pci")
    assert not report.ready
