"""memfd_secret(2): user memory the kernel allocates unmovable (Linux >= 5.14).

Its pages come from ``GFP_HIGHUSER`` (mm/secretmem.c), never from ZONE_MOVABLE,
and cannot be migrated: exactly what a no-IOMMU DMA buffer needs, since the
device keeps using the physical address it was told. The kernel must allow it
(``secretmem.enable=1`` on 6.x command lines, default off in 6.1).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform

#: ``__NR_memfd_secret`` (arch/x86/entry/syscalls/syscall_64.tbl; arm64 and riscv
#: use the generic table, include/uapi/asm-generic/unistd.h).
_SYSCALL_NUMBERS = {"x86_64": 447, "aarch64": 447, "riscv64": 447}


def memfd_secret() -> int | None:
    """A new secretmem file descriptor, or None where the kernel does not offer it."""
    number = _SYSCALL_NUMBERS.get(platform.machine())
    if number is None:
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(number, os.O_CLOEXEC))
    if fd >= 0:
        return fd
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.ENOMEM):
        return None  # not built, not enabled (secretmem.enable=0), or no memlock room
    raise OSError(err, os.strerror(err), "memfd_secret")
