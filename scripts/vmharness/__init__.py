"""vmharness: the vmem_guest test VM (QEMU + virtio-mem + QMP + a guest command runner).

Put ``scripts/`` on ``sys.path`` and ``from vmharness import TestVM, VMConfig, MemDevice``.
See README "## The test VM".
"""

from .config import Dimm, MemDevice, VMConfig, userspace_driver_config
from .errors import (
    GuestCommandError,
    HarnessError,
    HostUnavailable,
    MigrationFailed,
    VMError,
    VMTimeout,
)
from .host import NEWER_PAIR, Pair
from .sizes import REBOOT_MEMTOTAL_MARGIN, GiB, MiB, fmt_size, parse_size
from .vm import TestVM

__all__ = [
    "NEWER_PAIR",
    "REBOOT_MEMTOTAL_MARGIN",
    "Dimm",
    "GiB",
    "GuestCommandError",
    "HarnessError",
    "HostUnavailable",
    "MemDevice",
    "MiB",
    "MigrationFailed",
    "Pair",
    "TestVM",
    "VMConfig",
    "VMError",
    "VMTimeout",
    "fmt_size",
    "parse_size",
    "userspace_driver_config",
]
