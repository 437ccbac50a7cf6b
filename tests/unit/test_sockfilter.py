"""The uevent socket filter: the kernel drops every message but a PCI ``add``."""

from __future__ import annotations

import socket

import pytest

from vmem_guest._linux.sockfilter import PCI_ADD_PREFIX, attach_prefix_filter, prefix_program

PCI_ADD = b"add@/devices/pci0000:00/0000:00:1c.0/0000:01:00.0\0ACTION=add\0SUBSYSTEM=pci\0"
MEMORY_ADD = b"add@/devices/system/memory/memory40\0ACTION=add\0SUBSYSTEM=memory\0"
MEMORY_ONLINE = b"online@/devices/system/memory/memory40\0ACTION=online\0SUBSYSTEM=memory\0"
PCI_REMOVE = b"remove@/devices/pci0000:00/0000:00:1c.0/0000:01:00.0\0ACTION=remove\0"
SHORT = b"add@/dev"


def test_only_pci_adds_reach_the_reader() -> None:
    """A datagram socket takes the same filter as the netlink one (sk_filter)."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with reader, writer:
        attach_prefix_filter(reader.fileno())
        for message in (MEMORY_ADD, MEMORY_ONLINE, PCI_REMOVE, SHORT, PCI_ADD, MEMORY_ADD):
            writer.send(message)
        reader.setblocking(False)
        received = []
        while True:
            try:
                received.append(reader.recv(4096))
            except BlockingIOError:
                break
        assert received == [PCI_ADD]
        assert reader.fileno() >= 0  # the fd still belongs to its owner


def test_the_program_compares_four_words_then_keeps_or_drops() -> None:
    program = prefix_program(PCI_ADD_PREFIX)
    assert len(program) == 10
    assert [ins[3] for ins in program[0:8:2]] == [0, 4, 8, 12]  # load offsets
    assert [1 + 2 * i + 1 + ins[2] for i, ins in enumerate(program[1:8:2])] == [9, 9, 9, 9]
    assert program[8][3] == 0xFFFF_FFFF and program[9][3] == 0
    with pytest.raises(ValueError, match="multiple of 4"):
        prefix_program(b"add@/d")
