"""PciChannel's policy and interrupt bookkeeping, without a device."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vmem_guest._linux import vfio_uapi as uapi
from vmem_guest._linux.eventfd import EventFd
from vmem_guest.device import Cause, InterruptMode
from vmem_guest.errors import TransportError
from vmem_guest.spec import Feature
from vmem_guest.transport import channel as ch
from vmem_guest.transport import virtio_pci as vp

QEMU72_OFFER = 0x10130000001  # ACPI_PXM, INDIRECT_DESC, EVENT_IDX, VERSION_1, RING_RESET
QEMU72_VIOMMU_OFFER = 0x10330000001  # ... plus ACCESS_PLATFORM


def bit(feature: Feature) -> int:
    return 1 << feature


def test_features_qemu_7_2() -> None:
    assert ch.select_features(QEMU72_OFFER, mode="noiommu") == bit(Feature.VERSION_1) | bit(
        Feature.ACPI_PXM
    )
    assert ch.select_features(QEMU72_VIOMMU_OFFER, mode="type1") == (
        bit(Feature.VERSION_1) | bit(Feature.ACPI_PXM) | bit(Feature.ACCESS_PLATFORM)
    )


def test_unplugged_inaccessible_is_accepted_when_offered() -> None:
    offer = (
        bit(Feature.VERSION_1)
        | bit(Feature.UNPLUGGED_INACCESSIBLE)
        | bit(Feature.PERSISTENT_SUSPEND)
    )
    # PERSISTENT_SUSPEND too: the agent handles resume (it keeps the blocks and
    # re-initialises the transport), so it may let the guest suspend.
    assert ch.select_features(offer, mode="noiommu") == (
        bit(Feature.VERSION_1)
        | bit(Feature.UNPLUGGED_INACCESSIBLE)
        | bit(Feature.PERSISTENT_SUSPEND)
    )


def test_persistent_suspend_alone_is_accepted_and_unknown_bits_are_not() -> None:
    offer = bit(Feature.VERSION_1) | bit(Feature.PERSISTENT_SUSPEND) | 1 << 3 | 1 << 23
    assert ch.select_features(offer, mode="noiommu") == (
        bit(Feature.VERSION_1) | bit(Feature.PERSISTENT_SUSPEND)
    )


def test_feature_requirements() -> None:
    with pytest.raises(TransportError, match="VERSION_1"):
        ch.select_features(bit(Feature.ACPI_PXM), mode="noiommu")
    with pytest.raises(TransportError, match="ACCESS_PLATFORM"):
        ch.select_features(QEMU72_OFFER, mode="type1")


@pytest.mark.parametrize(("device_max", "limit", "size"), [(128, 16, 16), (128, 12, 8), (5, 16, 4)])
def test_pick_queue_size(device_max: int, limit: int, size: int) -> None:
    assert ch.pick_queue_size(device_max, limit) == size


def test_pick_queue_size_too_small() -> None:
    with pytest.raises(TransportError):
        ch.pick_queue_size(1, 16)


def test_identity() -> None:
    cfg = bytearray(64)
    cfg[0:4] = bytes.fromhex("f41a5810")
    cfg[vp.PCI_REVISION_ID] = 1
    ch.check_identity(bytes(cfg))
    cfg[vp.PCI_REVISION_ID] = 0  # a transitional/legacy revision
    with pytest.raises(TransportError, match="not a modern virtio-mem"):
        ch.check_identity(bytes(cfg))
    cfg[0:4] = bytes.fromhex("f41a4110")  # virtio-net
    cfg[vp.PCI_REVISION_ID] = 1
    with pytest.raises(TransportError):
        ch.check_identity(bytes(cfg))


class FakeVfio:
    def __init__(self) -> None:
        self.unmasks = 0

    def unmask_intx(self) -> None:
        self.unmasks += 1


class FakeTransport:
    def __init__(self, isr: list[int]) -> None:
        self.isr = isr

    def read_isr(self) -> int:
        return self.isr.pop(0) if self.isr else 0

    def needs_reset(self) -> bool:
        return False


def intx_channel(isr: list[int]) -> tuple[ch.PciChannel, FakeVfio, EventFd]:
    vfio = FakeVfio()
    channel = ch.PciChannel("0000:00:04.0", vfio)  # type: ignore[arg-type]
    channel.transport = FakeTransport(isr)  # type: ignore[assignment]
    channel.queue = channel.buffer = object()  # type: ignore[assignment]
    efd = EventFd()
    channel._irq = efd
    return channel, vfio, efd


def test_intx_interrupt_reads_isr_and_unmasks() -> None:
    channel, vfio, efd = intx_channel([vp.ISR_QUEUE | vp.ISR_CONFIG])
    efd.signal()
    assert channel.interrupt_fd() == channel.config_change_fd() == efd.fd
    assert channel.handle_interrupt() == Cause.QUEUE | Cause.CONFIG
    assert vfio.unmasks == 1
    assert not efd.wait(0)  # drained
    efd.close()


def test_config_change_during_a_request_is_kept_for_the_outer_loop() -> None:
    channel, vfio, efd = intx_channel([vp.ISR_CONFIG, vp.ISR_QUEUE])
    efd.signal()
    assert channel._wait_for_queue(0.1)  # the config interrupt wakes the request wait
    efd.signal()
    assert channel._wait_for_queue(0.1)  # then the answer
    assert vfio.unmasks == 2
    assert channel.handle_interrupt() == Cause.CONFIG  # what the request wait saw
    assert not channel._wait_for_queue(0.01)
    efd.close()


def test_submit_re_signals_a_config_change_it_swallowed() -> None:
    channel, _, efd = intx_channel([vp.ISR_CONFIG | vp.ISR_QUEUE])

    class Queue:
        def submit(self, request: bytes, timeout: float) -> bytes:
            efd.signal()  # the device answers and the host resized meanwhile
            assert channel._wait_for_queue(timeout)
            return b"answer"

    class Buffer:
        def check_outside(self, ranges: object) -> None:
            pass

    channel.queue, channel.buffer = Queue(), Buffer()  # type: ignore[assignment]
    assert channel.submit(b"request") == b"answer"
    assert efd.wait(0)  # the outer selector loop wakes up...
    assert channel.handle_interrupt() == Cause.CONFIG  # ...and learns about the change
    efd.close()


class IrqVfio:
    """The VFIO calls _setup_interrupts makes: vectors per index, what was enabled."""

    def __init__(self, msix_vectors: int) -> None:
        self.counts = {uapi.VFIO_PCI_INTX_IRQ_INDEX: 1, uapi.VFIO_PCI_MSIX_IRQ_INDEX: msix_vectors}
        self.enabled: list[tuple[int, int]] = []  # (index, eventfds)
        self.disabled = 0

    def irq_info(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(count=self.counts.get(index, 0))

    def enable_irqs(self, index: int, eventfds: list[EventFd]) -> None:
        self.enabled.append((index, len(eventfds)))

    def disable_irqs(self) -> None:
        self.disabled += 1


class VectorTransport:
    """msix_config / queue_msix_vector as the device reads them back."""

    def __init__(self, accepts: bool) -> None:
        self.accepts = accepts
        self.config_vector = self.queue_vector = vp.VIRTIO_MSI_NO_VECTOR

    def _take(self, vector: int) -> int:
        return (
            vector if self.accepts or vector == vp.VIRTIO_MSI_NO_VECTOR else vp.VIRTIO_MSI_NO_VECTOR
        )

    def set_config_vector(self, vector: int) -> bool:
        self.config_vector = self._take(vector)
        return self.config_vector == vector

    def set_queue_vector(self, index: int, vector: int) -> bool:
        assert index == 0
        self.queue_vector = self._take(vector)
        return self.queue_vector == vector


def irq_channel(msix_vectors: int, accepts: bool) -> tuple[ch.PciChannel, IrqVfio, VectorTransport]:
    vfio = IrqVfio(msix_vectors)
    channel = ch.PciChannel("0000:00:04.0", vfio)  # type: ignore[arg-type]
    transport = VectorTransport(accepts)
    channel._setup_interrupts(transport)  # type: ignore[arg-type]
    return channel, vfio, transport


def test_two_msix_vectors_route_config_and_queue_apart() -> None:
    channel, vfio, transport = irq_channel(2, accepts=True)
    assert channel.interrupt_mode is InterruptMode.MSIX
    assert vfio.enabled == [(uapi.VFIO_PCI_MSIX_IRQ_INDEX, 2)]
    assert (transport.config_vector, transport.queue_vector) == (ch.CONFIG_VECTOR, ch.QUEUE_VECTOR)
    assert channel.config_change_fd() != channel.interrupt_fd()


def test_without_msix_the_channel_uses_intx() -> None:
    channel, vfio, _ = irq_channel(0, accepts=True)
    assert channel.interrupt_mode is InterruptMode.INTX
    assert vfio.enabled == [(uapi.VFIO_PCI_INTX_IRQ_INDEX, 1)]
    assert channel.config_change_fd() == channel.interrupt_fd()


def test_a_device_that_refuses_its_vectors_falls_back_to_intx() -> None:
    channel, vfio, transport = irq_channel(2, accepts=False)
    assert channel.interrupt_mode is InterruptMode.INTX
    # MSI-X was tried, turned off again, and both vectors left at "no vector".
    assert vfio.enabled == [(uapi.VFIO_PCI_MSIX_IRQ_INDEX, 2), (uapi.VFIO_PCI_INTX_IRQ_INDEX, 1)]
    assert vfio.disabled == 1
    assert transport.config_vector == transport.queue_vector == vp.VIRTIO_MSI_NO_VECTOR
    assert channel._config_irq is None
