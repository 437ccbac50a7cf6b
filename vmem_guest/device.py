"""VirtioMemDevice: validated config snapshots and typed requests over a channel.

A *channel* is whatever carries request bytes to a device and brings the
response back: the real virtio-pci transport and virtqueue
(``vmem_guest.transport``) or the device model (``vmem_guest.sim``). This
module never trusts what comes back: every config value and every response is
bounds-checked here before anything else sees it.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Protocol

from vmem_guest import spec
from vmem_guest.errors import ConfigError, ResponseError
from vmem_guest.spec import BlockState, RequestType, ResponseType

#: Smallest block size a device may announce: one 4 KiB page (QEMU's minimum is 1 MiB).
MIN_BLOCK_SIZE = 4096
_U64_LIMIT = 1 << 64


class Cause(enum.Flag):
    """Why a device interrupted (spec 4.1.4.5: ISR bit 0 queue, bit 1 config; with
    MSI-X, which vector fired). The real and the simulated transports report these."""

    NONE = 0
    QUEUE = enum.auto()
    CONFIG = enum.auto()


class InterruptMode(enum.IntEnum):
    """How a device's interrupts reach the driver (kept in the tracker header's
    ``interrupt_mode``; 0 is what a tracker written before that field existed holds)."""

    UNKNOWN = 0
    INTX = 1  # one INTx line; ISR says queue or config (spec 4.1.4.5)
    MSIX = 2  # MSI-X: vector 0 config changes, vector 1 the request queue
    MODEL = 3  # the simulator's device model (no PCI)

    @property
    def text(self) -> str:
        """``INTx``, ``MSI-X``, ``model``, ``unknown`` (for ``vmem-guest status``)."""
        return {1: "INTx", 2: "MSI-X", 3: "model"}.get(self.value, "unknown")


class Binding(enum.IntEnum):
    """Which kernel driver hands the PCI function to the agent, and how the device
    addresses its DMA memory (kept in the tracker header's ``binding``; 0 is what a
    tracker written before that field existed holds). docs/uio.md."""

    UNKNOWN = 0
    VFIO_TYPE1 = 1  # vfio-pci behind an IOMMU: the device sees IOVAs
    VFIO_NOIOMMU = 2  # vfio-pci in no-IOMMU mode: the device sees physical addresses
    UIO = 3  # uio_pci_generic: physical addresses, INTx through /dev/uioN
    MODEL = 4  # the simulator's device model (no PCI)

    @property
    def text(self) -> str:
        """``vfio type1``, ``vfio noiommu``, ``uio``, ``model``, ``unknown`` (for ``status``)."""
        return {1: "vfio type1", 2: "vfio noiommu", 3: "uio", 4: "model"}.get(self.value, "unknown")


#: The device-type feature bits of a virtio feature word (spec 6: bits 0-23).
DEVICE_FEATURE_MASK = 0x00FF_FFFF


class RequestChannel(Protocol):
    """What carries virtio-mem requests: one request in flight at a time."""

    def read_config(self) -> bytes:
        """The 56 config bytes, read stable across ``config_generation`` (spec 4.1.4.3)."""

    def submit(self, request: bytes) -> bytes:
        """Send one request and return the bytes the device wrote as response.

        Raises DeviceTimeout when the device does not answer in time, and
        PagemapRefused only before the request reached the device (it saw nothing).
        """


class InterruptingChannel(RequestChannel, Protocol):
    """A channel that also signals interrupts through file descriptors (for a selector)."""

    def interrupt_fd(self) -> int:
        """Readable when the device raised an interrupt (queue or config)."""

    def config_change_fd(self) -> int:
        """Readable on a config change (may be the same fd as interrupt_fd)."""

    def handle_interrupt(self) -> Cause:
        """Consume pending interrupts and say which causes they had."""

    @property
    def interrupt_mode(self) -> InterruptMode:
        """How this channel's interrupts arrive."""

    @property
    def binding(self) -> Binding:
        """Which driver hands the function over (vfio type1, vfio noiommu, uio)."""

    @property
    def device_features(self) -> int:
        """The virtio-mem feature bits (0-23) negotiated with the device."""

    def release_request_fd(self) -> int | None:
        """Readable when the kernel wants the device back (a hot-unplug); None when
        this channel cannot be asked."""

    def transport_was_reset(self) -> bool:
        """True when the transport was reset under the driver (the device no longer
        shows DRIVER_OK): what a resume from suspend does to a QEMU device."""

    def reinitialize(self) -> None:
        """After such a reset: renegotiate the same features, rebuild the queue,
        route the same interrupt fds again. Block state is not touched."""

    def leave_secret_memory(self) -> bool:
        """Before a hibernation: move the ring out of memfd_secret memory (Linux offers
        no hibernation while any exists); False when it is not in any."""

    def close(self) -> None:
        """Release the device (a device reset keeps block state, spec 5.15.5)."""


@dataclasses.dataclass(frozen=True)
class DeviceConfig:
    """A validated snapshot of ``struct virtio_mem_config`` (sizes in bytes)."""

    block_size: int
    node_id: int
    addr: int
    region_size: int
    usable_region_size: int
    plugged_size: int
    requested_size: int

    @property
    def end(self) -> int:
        """First address past the device region."""
        return self.addr + self.region_size

    @property
    def usable_end(self) -> int:
        """First address past the usable part of the region."""
        return self.addr + self.usable_region_size

    @property
    def nr_blocks(self) -> int:
        """Device blocks in the whole region."""
        return self.region_size // self.block_size

    @classmethod
    def from_bytes(cls, raw: bytes) -> DeviceConfig:
        """Parse and validate config bytes; raise ConfigError on any spec violation."""
        if len(raw) < spec.VirtioMemConfig.SPEC_SIZE:
            raise ConfigError(f"config space is {len(raw)} bytes, expected 56", length=len(raw))
        cfg = spec.VirtioMemConfig.from_buffer_copy(raw[: spec.VirtioMemConfig.SPEC_SIZE])
        snapshot = cls(
            block_size=cfg.block_size,
            node_id=cfg.node_id,
            addr=cfg.addr,
            region_size=cfg.region_size,
            usable_region_size=cfg.usable_region_size,
            plugged_size=cfg.plugged_size,
            requested_size=cfg.requested_size,
        )
        snapshot.validate()
        return snapshot

    def validate(self) -> None:
        """Check the spec's rules on config values (spec 5.15.4, 5.15.5.1)."""
        bs = self.block_size
        if bs < MIN_BLOCK_SIZE or bs & (bs - 1):
            raise ConfigError(f"block_size {bs:#x} is not a power of two >= 4 KiB", block_size=bs)
        for name in ("addr", "region_size", "usable_region_size", "plugged_size", "requested_size"):
            value = getattr(self, name)
            if value % bs:
                raise ConfigError(
                    f"{name} {value:#x} is not a multiple of block_size {bs:#x}",
                    field=name,
                    value=value,
                )
        if self.region_size == 0:
            raise ConfigError("region_size is 0", region_size=0)
        if self.addr + self.region_size > _U64_LIMIT:
            raise ConfigError(
                "device region overflows the address space",
                addr=self.addr,
                region_size=self.region_size,
            )
        for name in ("usable_region_size", "plugged_size", "requested_size"):
            if getattr(self, name) > self.region_size:
                raise ConfigError(
                    f"{name} {getattr(self, name):#x} exceeds region_size {self.region_size:#x}",
                    field=name,
                )
        # Blocks are plugged only inside the usable region, and the usable region
        # shrinks only when nothing is plugged (UNPLUG_ALL, system reset; spec 5.15.4).
        # A requested_size beyond the usable region also breaks a device MUST (spec,
        # "The device MUST set usable_region_size to requested_size or greater"), but
        # Firecracker does it after every UNPLUG_ALL (device.rs:418, until the host's
        # next resize): it is tolerated, and the planner plans within the usable
        # region only (docs/design.md, "What the agent assumes of a device").
        if self.plugged_size > self.usable_region_size:
            raise ConfigError(
                "plugged_size exceeds usable_region_size"
                f" ({self.plugged_size:#x} > {self.usable_region_size:#x})",
                field="plugged_size",
                usable_region_size=self.usable_region_size,
            )

    @property
    def requested_beyond_usable(self) -> bool:
        """``requested_size`` exceeds ``usable_region_size`` (a device MUST broken)."""
        return self.requested_size > self.usable_region_size


@dataclasses.dataclass(frozen=True)
class Response:
    """A parsed, validated response: ``state`` is set only for an ACKed STATE."""

    type: ResponseType
    state: BlockState | None = None

    @property
    def acked(self) -> bool:
        return self.type is ResponseType.ACK


def parse_response(raw: bytes, req_type: RequestType) -> Response:
    """Validate the response bytes for a request of ``req_type`` (spec 5.15.6)."""
    if len(raw) < spec.VirtioMemResp.SPEC_SIZE:
        raise ResponseError(f"response is {len(raw)} bytes, expected 10", length=len(raw))
    resp = spec.VirtioMemResp.from_buffer_copy(raw[: spec.VirtioMemResp.SPEC_SIZE])
    try:
        resp_type = ResponseType(resp.type)
    except ValueError:
        raise ResponseError(f"unknown response type {resp.type}", type=resp.type) from None
    if req_type is not RequestType.STATE or resp_type is not ResponseType.ACK:
        return Response(resp_type)
    try:
        return Response(resp_type, BlockState(resp.state))
    except ValueError:
        raise ResponseError(f"unknown block state {resp.state}", state=resp.state) from None


class VirtioMemDevice:
    """Typed virtio-mem requests over a :class:`RequestChannel`.

    It does not judge ACK/NACK/BUSY/ERROR: the caller (the driver core) decides.
    It does check that requests are well formed before sending them, because a
    malformed request breaks QEMU's device (``virtio_error``).
    """

    def __init__(self, channel: RequestChannel, name: str) -> None:
        self.channel = channel
        self.name = name
        self.log = logging.getLogger(f"vmem_guest.device.{name}")
        self.requests_sent = 0

    def config(self) -> DeviceConfig:
        """Read and validate the config space."""
        return DeviceConfig.from_bytes(self.channel.read_config())

    def plug(self, addr: int, nb_blocks: int) -> Response:
        return self._range_request(RequestType.PLUG, addr, nb_blocks)

    def unplug(self, addr: int, nb_blocks: int) -> Response:
        return self._range_request(RequestType.UNPLUG, addr, nb_blocks)

    def state(self, addr: int, nb_blocks: int) -> Response:
        return self._range_request(RequestType.STATE, addr, nb_blocks)

    def unplug_all(self) -> Response:
        return self._send(RequestType.UNPLUG_ALL, 0, 0)

    def _range_request(self, req_type: RequestType, addr: int, nb_blocks: int) -> Response:
        if not 0 < nb_blocks <= spec.MAX_BLOCKS_PER_REQUEST:
            raise ValueError(f"nb_blocks {nb_blocks} outside 1..{spec.MAX_BLOCKS_PER_REQUEST}")
        if not 0 <= addr < _U64_LIMIT:
            raise ValueError(f"address {addr:#x} is not a 64-bit address")
        return self._send(req_type, addr, nb_blocks)

    def _send(self, req_type: RequestType, addr: int, nb_blocks: int) -> Response:
        raw = self.channel.submit(spec.encode_request(req_type, addr, nb_blocks))
        self.requests_sent += 1
        response = parse_response(raw, req_type)
        self.log.debug(
            "%s addr=%#x nb_blocks=%d -> %s%s",
            req_type.name,
            addr,
            nb_blocks,
            response.type.name,
            f" {response.state.name}" if response.state is not None else "",
        )
        return response
