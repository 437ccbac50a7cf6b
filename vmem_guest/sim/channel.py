"""A device-model channel with interrupts as an eventfd, like PciChannel with INTx.

It lets the agent's selector loop run against the device model: a host-side
resize (from another thread, as a hypervisor would) raises the eventfd with the
config cause, exactly as QEMU raises INTx with ISR bit 1. A lock keeps the
model consistent between the host thread and the agent's reads.
"""

from __future__ import annotations

import contextlib
import os
import threading

from vmem_guest._linux.lifetime import close_fd
from vmem_guest.device import Cause, InterruptMode
from vmem_guest.sim.device_model import DeviceModel


class SimChannel:
    """An :class:`~vmem_guest.device.InterruptingChannel` over a DeviceModel."""

    def __init__(self, model: DeviceModel) -> None:
        self.model = model
        self.lock = threading.Lock()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._causes = Cause.NONE
        model.on_config_change = self._config_interrupt

    def _config_interrupt(self) -> None:
        self._causes |= Cause.CONFIG
        os.eventfd_write(self._efd, 1)

    def host_resize(self, requested_size: int) -> None:
        """The hypervisor's ``qom-set requested-size`` (callable from any thread)."""
        with self.lock:
            self.model.resize(requested_size)

    def read_config(self) -> bytes:
        with self.lock:
            return self.model.read_config()

    def submit(self, request: bytes) -> bytes:
        with self.lock:
            return self.model.submit(request)

    def interrupt_fd(self) -> int:
        return self._efd

    def config_change_fd(self) -> int:
        return self._efd

    def handle_interrupt(self) -> Cause:
        with self.lock:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self._efd)
            causes, self._causes = self._causes, Cause.NONE
        return causes

    @property
    def interrupt_mode(self) -> InterruptMode:
        return InterruptMode.MODEL

    @property
    def device_features(self) -> int:
        """No feature negotiation happens with the model: no bits."""
        return 0

    def close(self) -> None:
        self._efd = close_fd(self._efd)
