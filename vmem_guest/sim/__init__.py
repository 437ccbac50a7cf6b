"""Simulated hardware: the QEMU-faithful virtio-mem device model (and friends)."""

from vmem_guest.sim.device_model import DeviceModel

__all__ = ["DeviceModel"]
