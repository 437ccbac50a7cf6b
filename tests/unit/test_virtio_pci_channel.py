"""PciChannel's policy and interrupt bookkeeping, without a device."""

from __future__ import annotations

import ctypes
from types import SimpleNamespace
from typing import Any

import pytest

from vmem_guest._linux import vfio_uapi as uapi
from vmem_guest._linux.eventfd import EventFd
from vmem_guest.device import Cause, InterruptMode
from vmem_guest.errors import DeviceBroken, TransportError
from vmem_guest.spec import Feature
from vmem_guest.transport import channel as ch
from vmem_guest.transport import virtio_pci as vp
from vmem_guest.transport.virtqueue import RingLayout

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

    def status(self) -> int:
        return int(vp.Status.DRIVER_OK)


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

    def enable_release_request(self, eventfd: EventFd) -> bool:
        self.release_request = eventfd
        return True

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


class ResetTransport:
    """The common-config calls a (re)start makes, recorded in order; status as the device has it."""

    def __init__(self, offered: int) -> None:
        self.offered = offered
        self.calls: list[str] = []
        self.status_value = 0
        self.accepts_vectors = True

    def status(self) -> int:
        return self.status_value

    def needs_reset(self) -> bool:
        return bool(self.status_value & vp.Status.DEVICE_NEEDS_RESET)

    def reset(self) -> None:
        self.calls.append("reset")
        self.status_value = 0

    def add_status(self, bits: vp.Status) -> None:
        self.calls.append(bits.name or str(int(bits)))
        self.status_value |= bits

    def device_features(self) -> int:
        return self.offered

    def negotiate(self, features: int) -> None:
        self.calls.append(f"negotiate {features:#x}")

    def set_config_vector(self, vector: int) -> bool:
        self.calls.append(f"config vector {vector}")
        return self.accepts_vectors

    def set_queue_vector(self, index: int, vector: int) -> bool:
        self.calls.append(f"queue vector {vector}")
        return self.accepts_vectors

    def setup_queue(self, index: int, *, size: int, desc: int, driver: int, device: int) -> None:
        self.calls.append(f"queue {index} size {size} desc {desc:#x}")

    def driver_ok(self) -> None:
        self.calls.append("DRIVER_OK")
        self.status_value |= vp.Status.DRIVER_OK

    def notify(self, index: int) -> None:
        pass


class ResetVfio:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def enable_bus_master(self) -> None:
        self.calls.append("bus master")

    def enable_irqs(self, index: int, eventfds: list[EventFd]) -> None:
        self.calls.append(f"irqs {index} fds {[e.fd for e in eventfds]}")

    def unmask_intx(self) -> None:
        self.calls.append("unmask")


class RingMemory:
    """A DMA buffer stand-in: plain memory, bus address = 0x10000 + offset."""

    def __init__(self, size: int = 4096) -> None:
        self.mem = (ctypes.c_char * size)()
        self.address = ctypes.addressof(self.mem)
        self.size = size

    def bus_addr(self, offset: int, length: int = 1) -> int:
        return 0x10000 + offset


PERSISTENT_OFFER = bit(Feature.VERSION_1) | bit(Feature.PERSISTENT_SUSPEND)


def resumable_channel(
    msix: bool, offered: int = PERSISTENT_OFFER
) -> tuple[ch.PciChannel, ResetTransport, ResetVfio, RingMemory]:
    """A channel as _start left it: features accepted, eventfds, a ring with one request
    answered (so indices are not 0), DRIVER_OK; then the transport reset (status 0)."""
    vfio = ResetVfio()
    channel = ch.PciChannel("0000:00:04.0", vfio)  # type: ignore[arg-type]
    transport = ResetTransport(offered)
    memory = RingMemory()
    channel.transport = transport  # type: ignore[assignment]
    channel.buffer = memory  # type: ignore[assignment]
    channel.features = ch.select_features(offered, mode="noiommu")
    channel._irq = EventFd()
    if msix:
        channel._config_irq, channel.msix = EventFd(), True
    layout = RingLayout.for_size(16, request_len=24, response_len=10)
    channel._start_queue(transport, memory, layout)  # type: ignore[arg-type]
    assert channel.queue is not None
    channel.queue.last_used = channel.queue.avail.idx = 7  # requests went through
    transport.calls.clear()
    transport.status_value = 0  # S3 wake-up: QEMU reset the device
    return channel, transport, vfio, memory


@pytest.mark.parametrize("msix", [False, True])
def test_reinitialize_after_a_reset_renegotiates_and_rebuilds_in_the_same_buffer(
    msix: bool,
) -> None:
    channel, transport, vfio, memory = resumable_channel(msix)
    old_queue = channel.queue
    assert channel.transport_was_reset()
    channel.reinitialize()
    assert not channel.transport_was_reset()
    vectors = ["config vector 0", "queue vector 1"] if msix else []
    assert transport.calls == [
        "reset",
        "ACKNOWLEDGE",
        "DRIVER",
        f"negotiate {PERSISTENT_OFFER:#x}",  # exactly what was accepted at open
        *vectors,
        "queue 0 size 16 desc 0x10000",  # same ring, same bus address
        "DRIVER_OK",
    ]
    assert channel._irq is not None
    if msix:
        assert channel._config_irq is not None
        fds = [channel._config_irq.fd, channel._irq.fd]  # the eventfds the selector holds
        assert vfio.calls == ["bus master", f"irqs {uapi.VFIO_PCI_MSIX_IRQ_INDEX} fds {fds}"]
    else:
        irqs = f"irqs {uapi.VFIO_PCI_INTX_IRQ_INDEX} fds {[channel._irq.fd]}"
        assert vfio.calls == ["bus master", irqs, "unmask"]
    queue = channel.queue
    assert queue is not None and queue is not old_queue
    assert queue.memory is memory and queue.last_used == 0 and queue.avail.idx == 0
    assert channel.interrupt_mode is (InterruptMode.MSIX if msix else InterruptMode.INTX)


def test_reinitialize_refuses_a_device_that_dropped_a_feature() -> None:
    channel, transport, _, _ = resumable_channel(False)
    transport.offered = bit(Feature.VERSION_1)  # PERSISTENT_SUSPEND gone
    with pytest.raises(TransportError, match="no longer offers features 0x4"):
        channel.reinitialize()
    assert "DRIVER_OK" not in transport.calls


def test_reinitialize_refuses_vectors_it_cannot_route_again() -> None:
    channel, transport, _, _ = resumable_channel(True)
    transport.accepts_vectors = False
    with pytest.raises(TransportError, match="refused its MSI-X vectors after resume"):
        channel.reinitialize()
    assert "DRIVER_OK" not in transport.calls


def test_a_request_to_a_reset_transport_fails_at_once_and_says_why() -> None:
    channel, _, _, _ = resumable_channel(False)
    with pytest.raises(DeviceBroken, match=r"lost DRIVER_OK \(status 0x0\).*resume from suspend"):
        channel.submit(bytes(24))
    assert channel.queue is not None and channel.queue.avail.idx == 7  # nothing was queued


def test_the_kernel_s_release_request_is_routed_to_an_eventfd() -> None:
    channel, vfio, _ = irq_channel(2, accepts=True)
    assert channel.release_request_fd() == vfio.release_request.fd


def test_without_a_release_request_index_the_channel_has_no_fd_for_it() -> None:
    class NoRequestVfio(IrqVfio):
        def enable_release_request(self, eventfd: EventFd) -> bool:
            return False

    vfio = NoRequestVfio(0)
    channel = ch.PciChannel("0000:00:04.0", vfio)  # type: ignore[arg-type]
    channel._setup_interrupts(VectorTransport(True))  # type: ignore[arg-type]
    assert channel.release_request_fd() is None
    assert channel.interrupt_mode is InterruptMode.INTX  # interrupts are set up all the same


class SecretRing(RingMemory):
    """A ring buffer that says whether it is memfd_secret memory, and whether it was freed."""

    def __init__(self, secret: bool, bus: int = 0x10000) -> None:
        super().__init__()
        self.secret, self.bus, self.closed = secret, bus, False

    def bus_addr(self, offset: int, length: int = 1) -> int:
        return self.bus + offset

    def where(self) -> str:
        return f"{self.bus:#x}"

    def close(self) -> None:
        self.closed = True


def test_leaving_secret_memory_rebuilds_the_ring_in_plain_memory_and_frees_the_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Linux offers no hibernation while memfd_secret memory exists: the ring moves to a
    plain page outside the device regions, through a reset, and the secret one goes."""
    channel, transport, _, _ = resumable_channel(False)
    secret, plain = SecretRing(True), SecretRing(False, bus=0x20000)
    channel.buffer = secret  # type: ignore[assignment]
    asked: list[tuple[int, list[tuple[int, int]], bool]] = []

    def outside(size: int, avoid: list[tuple[int, int]], **kw: Any) -> SecretRing:
        asked.append((size, list(avoid), kw["secret"]))
        return plain

    monkeypatch.setattr(ch.PhysBuffer, "outside", outside)
    channel.guard_ranges.append((1 << 32, 2 << 32))
    assert channel.leave_secret_memory() is True
    assert asked == [(channel.queue.layout.total, [(1 << 32, 2 << 32)], False)]  # type: ignore[union-attr]
    assert transport.calls == [
        "reset",
        "ACKNOWLEDGE",
        "DRIVER",
        f"negotiate {PERSISTENT_OFFER:#x}",
        "queue 0 size 16 desc 0x20000",  # the new page
        "DRIVER_OK",
    ]
    assert channel.buffer is plain and secret.closed and not plain.closed
    # Plain memory already: nothing to do, nothing touched.
    transport.calls.clear()
    assert channel.leave_secret_memory() is False
    assert transport.calls == [] and asked[1:] == []
