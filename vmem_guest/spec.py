"""virtio-mem wire layouts and constants, declared once, as data.

Everything here is the specification's (virtio-spec ``device-types/mem``,
Linux ``include/uapi/linux/virtio_mem.h``); names follow the spec. All
structures are little-endian; their sizes are pinned by ``tests/unit/test_spec.py``.
"""

from __future__ import annotations

import ctypes
import enum
from typing import ClassVar

#: virtio device ID of virtio-mem (spec 5.15).
VIRTIO_ID_MEM = 24
#: PCI vendor and (modern) device ID: 0x1040 + device ID (spec 4.1.2.1).
PCI_VENDOR_ID = 0x1AF4
PCI_DEVICE_ID = 0x1040 + VIRTIO_ID_MEM
#: The single virtqueue: "guestq" (spec 5.15.2).
REQUEST_QUEUE = 0
#: nb_blocks is a le16: the most device blocks one request can carry (spec 5.15.6).
MAX_BLOCKS_PER_REQUEST = 0xFFFF


class Feature(enum.IntEnum):
    """Feature bits: device-specific (spec 5.15.3) and reserved (spec 6)."""

    ACPI_PXM = 0
    UNPLUGGED_INACCESSIBLE = 1
    PERSISTENT_SUSPEND = 2
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_RESET = 40


class RequestType(enum.IntEnum):
    """``virtio_mem_req.type`` (spec 5.15.6)."""

    PLUG = 0
    UNPLUG = 1
    UNPLUG_ALL = 2
    STATE = 3


class ResponseType(enum.IntEnum):
    """``virtio_mem_resp.type`` (spec 5.15.6)."""

    ACK = 0
    NACK = 1
    BUSY = 2
    ERROR = 3


class BlockState(enum.IntEnum):
    """``virtio_mem_resp_state.state`` for an ACKed STATE request (spec 5.15.6.6)."""

    PLUGGED = 0
    UNPLUGGED = 1
    MIXED = 2


class _LayoutCheck:
    """Mixin: each layout states its spec size and the tests pin it."""

    SPEC_SIZE: ClassVar[int]


class VirtioMemConfig(ctypes.LittleEndianStructure, _LayoutCheck):
    """``struct virtio_mem_config`` (spec 5.15.4), read-only for the driver."""

    SPEC_SIZE = 56
    _pack_ = 1
    _fields_ = (
        ("block_size", ctypes.c_uint64),
        ("node_id", ctypes.c_uint16),
        ("padding", ctypes.c_uint8 * 6),
        ("addr", ctypes.c_uint64),
        ("region_size", ctypes.c_uint64),
        ("usable_region_size", ctypes.c_uint64),
        ("plugged_size", ctypes.c_uint64),
        ("requested_size", ctypes.c_uint64),
    )


class VirtioMemReq(ctypes.LittleEndianStructure, _LayoutCheck):
    """``struct virtio_mem_req`` (spec 5.15.6): PLUG/UNPLUG/STATE share one body.

    UNPLUG_ALL uses only ``type``; ``addr`` and ``nb_blocks`` are then zero.
    """

    SPEC_SIZE = 24
    _pack_ = 1
    _fields_ = (
        ("type", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
        ("addr", ctypes.c_uint64),
        ("nb_blocks", ctypes.c_uint16),
        ("padding2", ctypes.c_uint16 * 3),
    )


class VirtioMemResp(ctypes.LittleEndianStructure, _LayoutCheck):
    """``struct virtio_mem_resp`` (spec 5.15.6); ``state`` is valid for ACKed STATE only."""

    SPEC_SIZE = 10
    _pack_ = 1
    _fields_ = (
        ("type", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
        ("state", ctypes.c_uint16),
    )


LAYOUTS: tuple[type[_LayoutCheck], ...] = (VirtioMemConfig, VirtioMemReq, VirtioMemResp)


def encode_request(req_type: RequestType, addr: int = 0, nb_blocks: int = 0) -> bytes:
    """The 24 request bytes for one request (spec 5.15.6).

    Raises ValueError for a value its field cannot hold: ctypes would silently
    wrap it (65,536 blocks would go out as 0, -1 as 65,535).
    """
    if not (0 <= req_type <= 0xFFFF and 0 <= addr < 1 << 64 and 0 <= nb_blocks <= 0xFFFF):
        raise ValueError(f"request {req_type} {addr:#x} x{nb_blocks} does not fit the layout")
    req = VirtioMemReq(type=req_type, addr=addr, nb_blocks=nb_blocks)
    return bytes(req)


def encode_response(resp_type: ResponseType, state: int = 0) -> bytes:
    """The 10 response bytes a device writes (used by the device model)."""
    return bytes(VirtioMemResp(type=resp_type, state=state))
