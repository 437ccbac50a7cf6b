"""A fake :class:`~vmem_guest.transport.function.PciFunction` and its
:class:`~vmem_guest.transport.function.Interrupts`, for PciChannel tests that need
neither VFIO nor UIO: every call is recorded in one shared list, in order."""

from __future__ import annotations

from collections.abc import Iterable

from vmem_guest._linux.eventfd import EventFd
from vmem_guest.device import Cause, InterruptMode
from vmem_guest.transport.dma import DmaBuffer
from vmem_guest.transport.function import Access
from vmem_guest.transport.virtio_pci import BarLike, VirtioPciTransport


class FakeInterrupts:
    """INTx-like: one eventfd for both causes; ``causes`` is what :meth:`take` returns."""

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls
        self.efd = EventFd()
        self.causes: list[Cause] = []

    @property
    def mode(self) -> InterruptMode:
        return InterruptMode.INTX

    def queue_fd(self) -> int:
        return self.efd.fd

    def config_fd(self) -> int:
        return self.efd.fd

    def wait(self, timeout: float) -> bool:
        return self.efd.wait(timeout)

    def take(self) -> Cause:
        self.calls.append("take")
        self.efd.drain()
        return self.causes.pop(0) if self.causes else Cause.NONE

    def repost(self) -> None:
        self.calls.append("repost")
        self.efd.signal()

    def restore(self) -> None:
        self.calls.append("restore interrupts")

    def release_request_fd(self) -> int | None:
        return None

    def close(self) -> None:
        self.calls.append("close interrupts")
        self.efd.close()


class FakeFunction:
    """Records what the channel asks of it; BARs and DMA memory are the test's."""

    def __init__(self, access: Access = "uio", *, calls: list[str] | None = None) -> None:
        self.bdf = "0000:00:04.0"
        self.access: Access = access
        self.calls: list[str] = [] if calls is None else calls
        self.interrupts = FakeInterrupts(self.calls)

    def config_space(self) -> bytes:
        raise NotImplementedError("give the channel its transport directly")

    def bar_sizes(self) -> list[int]:
        return [0] * 6

    def map_bar(self, index: int) -> BarLike:
        raise NotImplementedError("give the channel its transport directly")

    def enable_bus_master(self) -> None:
        self.calls.append("bus master")

    def dma_buffer(self, size: int, guard_ranges: Iterable[tuple[int, int]]) -> DmaBuffer:
        raise NotImplementedError("give the channel its buffer directly")

    def open_interrupts(self, transport: VirtioPciTransport) -> FakeInterrupts:
        self.calls.append("open interrupts")
        return self.interrupts

    def close(self) -> None:
        self.calls.append("close function")
