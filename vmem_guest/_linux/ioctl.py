"""ioctl request numbers and one ioctl call that fails with a typed error.

The encoding is the kernel's generic one (linux ``include/uapi/asm-generic/ioctl.h``,
used by x86, arm64 and riscv): 8 bits of number, 8 bits of type, 14 bits of
argument size and 2 bits of direction, from the least significant bit up.
The helpers keep the kernel's names without the leading underscore.
"""

from __future__ import annotations

import ctypes
import fcntl
from typing import Any

from vmem_guest.errors import IoctlError

IOC_NRBITS = 8
IOC_TYPEBITS = 8
IOC_SIZEBITS = 14
IOC_DIRBITS = 2

IOC_NRSHIFT = 0
IOC_TYPESHIFT = IOC_NRSHIFT + IOC_NRBITS
IOC_SIZESHIFT = IOC_TYPESHIFT + IOC_TYPEBITS
IOC_DIRSHIFT = IOC_SIZESHIFT + IOC_SIZEBITS

#: Direction bits. IOC_WRITE: userspace writes, the kernel reads; IOC_READ: the reverse.
IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2

#: An argument type: a ctypes type (its size is used) or a size in bytes.
ArgType = type[Any] | int


def _size_of(arg: ArgType) -> int:
    return arg if isinstance(arg, int) else ctypes.sizeof(arg)


def IOC(direction: int, type_: int | str, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``: each field is range-checked, unlike in C."""
    type_num = ord(type_) if isinstance(type_, str) else type_
    for name, value, bits in (
        ("direction", direction, IOC_DIRBITS),
        ("type", type_num, IOC_TYPEBITS),
        ("nr", nr, IOC_NRBITS),
        ("size", size, IOC_SIZEBITS),
    ):
        if not 0 <= value < (1 << bits):
            raise ValueError(f"ioctl {name} {value} does not fit in {bits} bits")
    return (
        (direction << IOC_DIRSHIFT)
        | (type_num << IOC_TYPESHIFT)
        | (nr << IOC_NRSHIFT)
        | (size << IOC_SIZESHIFT)
    )


def IO(type_: int | str, nr: int) -> int:
    """``_IO(type, nr)``: no argument (or an argument passed by value)."""
    return IOC(IOC_NONE, type_, nr, 0)


def IOR(type_: int | str, nr: int, arg: ArgType) -> int:
    """``_IOR(type, nr, argtype)``: the kernel writes the argument."""
    return IOC(IOC_READ, type_, nr, _size_of(arg))


def IOW(type_: int | str, nr: int, arg: ArgType) -> int:
    """``_IOW(type, nr, argtype)``: the kernel reads the argument."""
    return IOC(IOC_WRITE, type_, nr, _size_of(arg))


def IOWR(type_: int | str, nr: int, arg: ArgType) -> int:
    """``_IOWR(type, nr, argtype)``: the kernel reads and writes the argument."""
    return IOC(IOC_READ | IOC_WRITE, type_, nr, _size_of(arg))


def IOC_DIR(request: int) -> int:
    return (request >> IOC_DIRSHIFT) & ((1 << IOC_DIRBITS) - 1)


def IOC_TYPE(request: int) -> int:
    return (request >> IOC_TYPESHIFT) & ((1 << IOC_TYPEBITS) - 1)


def IOC_NR(request: int) -> int:
    return (request >> IOC_NRSHIFT) & ((1 << IOC_NRBITS) - 1)


def IOC_SIZE(request: int) -> int:
    return (request >> IOC_SIZESHIFT) & ((1 << IOC_SIZEBITS) - 1)


#: What :func:`ioctl` passes: an int by value, or a buffer by pointer.
IoctlArg = int | bytearray | ctypes.Structure | ctypes.Array[Any] | ctypes.c_int32


def ioctl(fd: int, name: str, request: int, arg: IoctlArg = 0) -> int:
    """Call ioctl and return its (non-negative) result; raise IoctlError naming ``name``.

    ``arg`` is passed by value when it is an int, else by pointer to its buffer,
    which the kernel may update in place (in/out structures such as
    ``vfio_region_info``).
    """
    try:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        return int(fcntl.ioctl(fd, request, arg, True))
    except OSError as exc:
        raise IoctlError(name, exc.errno or 0) from None
