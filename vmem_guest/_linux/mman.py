"""mmap(2) flags the ``mmap`` module does not export, and a read-only mapping with an
address (which ``mmap.mmap`` does not give)."""

from __future__ import annotations

import ctypes
import mmap
import os
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


def map_readonly(fd: int, length: int, offset: int) -> int:
    """mmap(2) ``length`` bytes of ``fd`` at ``offset`` (page-aligned) read-only and
    shared; the address, for exact-width ctypes loads (a read-only ``mmap.mmap``
    cannot give one). OSError as the kernel raised it; free with :func:`unmap`."""
    libc = _libc()
    address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if address in (None, _MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(address)


def unmap(address: int, length: int) -> None:
    """munmap(2) what :func:`map_readonly` mapped."""
    _libc().munmap(ctypes.c_void_p(address), length)


#: ``MAP_FAILED``: (void *) -1, as ctypes returns it for a c_void_p result.
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    )
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    return libc
