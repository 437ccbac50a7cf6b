"""The PCI Command register, written the same way whoever gives access to config
space (a VFIO region, or the sysfs ``config`` file under UIO).

PCI Local Bus spec 6.2.2: bit 1 Memory Space, bit 2 Bus Master, bit 10 Interrupt
Disable (PCI 2.3). Linux ``include/uapi/linux/pci_regs.h``: PCI_COMMAND 0x04,
PCI_COMMAND_INTX_DISABLE 0x400.
"""

from __future__ import annotations

from typing import Protocol

from vmem_guest.errors import TransportError

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 1 << 1
PCI_COMMAND_MASTER = 1 << 2
#: While set, the function may not assert INTx; uio_pci_generic sets it in its
#: interrupt handler and the userspace driver clears it (docs/uio.md).
PCI_COMMAND_INTX_DISABLE = 1 << 10
PCI_CONFIG_SIZE = 256


class ConfigAccess(Protocol):
    """Exact-size reads and writes of PCI config space."""

    def config_read(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (1, 2 and 4 are single accesses)."""

    def config_write(self, offset: int, data: bytes) -> None:
        """``data`` at ``offset``, one access of its size."""


def read_command(config: ConfigAccess) -> int:
    """The Command register."""
    return int.from_bytes(config.config_read(PCI_COMMAND, 2), "little")


def update_command(config: ConfigAccess, *, set_bits: int = 0, clear_bits: int = 0) -> int:
    """Read-modify-write the Command register (one 16-bit write, skipped when nothing
    changes), then check the bits read back; returns the new value. TransportError
    when the function does not keep them."""
    command = read_command(config)
    wanted = (command | set_bits) & ~clear_bits & 0xFFFF
    if wanted != command:
        config.config_write(PCI_COMMAND, wanted.to_bytes(2, "little"))
    readback = read_command(config)
    if readback & set_bits != set_bits or readback & clear_bits:
        raise TransportError(
            f"PCI_COMMAND is {readback:#x} after writing {wanted:#x}",
            command=readback,
            wanted=wanted,
        )
    return readback


def enable_bus_master(config: ConfigAccess) -> None:
    """Memory Space and Bus Master on: the device may now DMA."""
    update_command(config, set_bits=PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
