"""A classic BPF socket filter that lets through only the kernel's PCI ``add`` uevents.

A kernel uevent on the ``NETLINK_KOBJECT_UEVENT`` socket is a bare string, no netlink
header (``lib/kobject_uevent.c``, ``uevent_net_broadcast_untagged``): it starts
``ACTION@DEVPATH``, and every PCI function's devpath starts ``/devices/pci``
(``drivers/pci/probe.c``: root buses are ``pciDDDD:BB`` under ``/devices``). Each memory
block the agent adds and onlines brings ``add@/devices/system/memory/memoryN`` and
``online@...`` uevents; filtered in the kernel, they never wake the agent.

libudev's own filter (``udev_monitor_filter_add_match_subsystem_devtype``) would not do:
its BPF program passes every message without libudev's header, which is every kernel
uevent (systemd ``sd-device/device-monitor.c``, ``device_monitor_filter_update``).
"""

from __future__ import annotations

import ctypes
import socket
import struct

#: ``SO_ATTACH_FILTER`` (include/uapi/asm-generic/socket.h); the socket module lacks it.
SO_ATTACH_FILTER = 26
#: The message prefix that passes: 16 bytes, four big-endian words for ``BPF_W|BPF_ABS``.
PCI_ADD_PREFIX = b"add@/devices/pci"

# Classic BPF opcodes (include/uapi/linux/bpf_common.h, filter.h).
_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K
_ACCEPT = 0xFFFF_FFFF  # keep the whole message
_DROP = 0


class _SockFilter(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    )


class _SockFprog(ctypes.Structure):
    _fields_ = (("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter)))


def prefix_program(prefix: bytes) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) of a program that keeps messages starting with ``prefix`` (a
    multiple of 4 bytes) and drops the rest (a load past the end drops too)."""
    if not prefix or len(prefix) % 4:
        raise ValueError(f"prefix of {len(prefix)} bytes: a multiple of 4 is needed")
    words = struct.unpack(f">{len(prefix) // 4}I", prefix)
    program: list[tuple[int, int, int, int]] = []
    for index, word in enumerate(words):
        # After this jump: 2 instructions per later word, then ACCEPT; DROP follows it.
        to_drop = 2 * (len(words) - index - 1) + 1
        program += [(_LD_W_ABS, 0, 0, 4 * index), (_JEQ_K, 0, to_drop, word)]
    return [*program, (_RET_K, 0, 0, _ACCEPT), (_RET_K, 0, 0, _DROP)]


def attach_prefix_filter(fd: int, prefix: bytes = PCI_ADD_PREFIX) -> None:
    """Attach :func:`prefix_program` to socket ``fd`` (OSError when the kernel refuses).
    The kernel copies the program (``sk_attach_filter``): nothing here must outlive it."""
    program = prefix_program(prefix)
    instructions = (_SockFilter * len(program))(*(_SockFilter(*ins) for ins in program))
    fprog = _SockFprog(len(program), ctypes.cast(instructions, ctypes.POINTER(_SockFilter)))
    sock = socket.socket(fileno=fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
    finally:
        sock.detach()  # the fd stays its owner's
