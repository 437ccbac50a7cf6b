"""A device-model channel with interrupts as an eventfd, like PciChannel with INTx.

It lets the agent's selector loop run against the device model: a host-side
resize (from another thread, as a hypervisor would) raises the eventfd with the
config cause, exactly as QEMU raises INTx with ISR bit 1. A lock keeps the
model consistent between the host thread and the agent's reads.

:meth:`SimChannel.host_suspend_resume` plays an S3 suspend and QEMU's wake-up
(``sim/profiles.py``): the transport is reset (requests go unanswered until the
driver re-initialises it) and, without ``keeps_blocks``, every block is unplugged.
"""

from __future__ import annotations

import contextlib
import os
import threading

from vmem_guest._linux.lifetime import close_fd
from vmem_guest.device import Cause, InterruptMode
from vmem_guest.errors import DeviceTimeout
from vmem_guest.sim.device_model import DeviceModel


class SimChannel:
    """An :class:`~vmem_guest.device.InterruptingChannel` over a DeviceModel."""

    def __init__(self, model: DeviceModel, *, features: int = 0) -> None:
        """``features``: the virtio-mem feature bits to report as negotiated."""
        self.model = model
        self.features = features
        #: The transport was reset (a wake-up) and not re-initialised since.
        self.reset_pending = False
        #: How often :meth:`reinitialize` ran.
        self.reinitializations = 0
        self.lock = threading.Lock()
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._release_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._causes = Cause.NONE
        model.on_config_change = self._config_interrupt

    def _config_interrupt(self) -> None:
        self._causes |= Cause.CONFIG
        os.eventfd_write(self._efd, 1)

    def host_resize(self, requested_size: int) -> None:
        """The hypervisor's ``qom-set requested-size`` (callable from any thread)."""
        with self.lock:
            self.model.resize(requested_size)

    def host_suspend_resume(self, *, keeps_blocks: bool) -> None:
        """The guest suspended to RAM and the host woke it (``system_wakeup``).

        QEMU 7.2 runs a system reset at wake-up (every block unplugged, the usable
        region recomputed); 10.0 skips the unplug for RESET_TYPE_WAKEUP
        (``keeps_blocks``). Both reset the transport.
        """
        with self.lock:
            if keeps_blocks:
                self.model.device_reset()
            else:
                self.model.system_reset()
            self.reset_pending = True

    def host_unplug_request(self) -> None:
        """``device_del``: the guest kernel asks the driver to give the device back."""
        os.eventfd_write(self._release_efd, 1)

    def release_request_fd(self) -> int:
        return self._release_efd

    def read_config(self) -> bytes:
        with self.lock:
            return self.model.read_config()

    def submit(self, request: bytes) -> bytes:
        with self.lock:
            if self.reset_pending:
                # A reset queue is disabled: the notify reaches nobody.
                raise DeviceTimeout("no answer: the transport was reset", timeout=0)
            return self.model.submit(request)

    def transport_was_reset(self) -> bool:
        return self.reset_pending

    def reinitialize(self) -> None:
        with self.lock:
            self.reset_pending = False
            self.reinitializations += 1

    def leave_secret_memory(self) -> bool:
        """The simulator's ring is in no memfd_secret memory."""
        return False

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
        """No feature negotiation happens with the model: the bits it was given."""
        return self.features

    def close(self) -> None:
        self._efd = close_fd(self._efd)
        self._release_efd = close_fd(self._release_efd)
