"""mmap(2) flags the ``mmap`` module does not export."""

from __future__ import annotations

import platform

from vmem_guest.errors import TransportError

#: ``MAP_LOCKED`` in ``include/uapi/asm-generic/mman.h`` (x86 and arm64 share it;
#: mips, powerpc, sparc and alpha use other values).
_MAP_LOCKED_GENERIC = 0x2000
_GENERIC_MACHINES = frozenset({"x86_64", "aarch64", "riscv64", "i686"})


def map_locked() -> int:
    """The MAP_LOCKED flag for this machine; TransportError where it differs."""
    machine = platform.machine()
    if machine not in _GENERIC_MACHINES:
        raise TransportError(f"MAP_LOCKED unknown on {machine}", machine=machine)
    return _MAP_LOCKED_GENERIC
