"""vmem_guest: a userspace guest driver for the virtio-mem device."""

__version__ = "0.1.0"
