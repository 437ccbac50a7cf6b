"""What the spec oracle sees of a device, and what it keeps: :class:`ConfigSeen`,
:class:`Exchange` and :class:`DeviceView`.

Everything here is derived from the device's own answers (its config reads and
its responses), never from a model of one implementation: the oracle judges a
device by the spec alone (docs/spec-oracle.md).
"""

from __future__ import annotations

import dataclasses

from vmem_guest import spec
from vmem_guest.spec import BlockState, RequestType, ResponseType

_U64_LIMIT = 1 << 64
#: The most device blocks whose state the view tracks (one byte each): past that the
#: checks that need block states stay off rather than allocate without bound.
MAX_TRACKED_BLOCKS = 1 << 24


@dataclasses.dataclass(frozen=True)
class ConfigSeen:
    """One config read: ``struct virtio_mem_config`` (spec 5.15.4) and, when the
    channel can tell, the ``config_generation`` read with it (spec 4.1.4.3)."""

    raw: bytes
    block_size: int
    node_id: int
    addr: int
    region_size: int
    usable_region_size: int
    plugged_size: int
    requested_size: int
    generation: int | None = None

    @classmethod
    def parse(cls, raw: bytes, generation: int | None = None) -> ConfigSeen | None:
        """The fields of ``raw``; None when it is shorter than the 56-byte layout."""
        size = spec.VirtioMemConfig.SPEC_SIZE
        if len(raw) < size:
            return None
        cfg = spec.VirtioMemConfig.from_buffer_copy(raw[:size])
        return cls(
            raw=bytes(raw[:size]),
            block_size=int(cfg.block_size),
            node_id=int(cfg.node_id),
            addr=int(cfg.addr),
            region_size=int(cfg.region_size),
            usable_region_size=int(cfg.usable_region_size),
            plugged_size=int(cfg.plugged_size),
            requested_size=int(cfg.requested_size),
            generation=generation,
        )

    @property
    def geometry(self) -> tuple[int, int, int, int]:
        """The fields that cannot change (spec 5.15.4.2): block size, node, addr, region."""
        return (self.block_size, self.node_id, self.addr, self.region_size)

    @property
    def sane_blocks(self) -> bool:
        """Whether block indices mean anything: a power-of-two block size dividing the
        region, not too many blocks to track."""
        bs = self.block_size
        return (
            bs > 0
            and not bs & (bs - 1)
            and not self.addr % bs
            and self.region_size // bs <= MAX_TRACKED_BLOCKS
        )

    def covers_only_usable(self, addr: int, nb_blocks: int) -> bool:
        """Whether ``nb_blocks`` blocks from ``addr`` lie inside the usable region
        (the 64-bit sum may overflow: then they do not)."""
        end = addr + nb_blocks * self.block_size
        return self.addr <= addr and end <= self.addr + self.usable_region_size < _U64_LIMIT

    def valid_range(self, addr: int, nb_blocks: int) -> bool:
        """The spec's three conditions for PLUG, UNPLUG and STATE (5.15.6.3.2,
        5.15.6.4.2, 5.15.6.6.2): ``addr`` aligned to ``block_size``, ``nb_blocks`` > 0,
        no block outside the usable region covered."""
        bs = self.block_size
        aligned = bs > 0 and not addr % bs
        return aligned and nb_blocks > 0 and self.covers_only_usable(addr, nb_blocks)


@dataclasses.dataclass(frozen=True)
class Request:
    """``struct virtio_mem_req`` as sent (spec 5.15.6); ``data`` is everything after
    ``type`` (padding, ``addr``, ``nb_blocks``, padding)."""

    type: int
    addr: int
    nb_blocks: int
    data: bytes
    length: int

    @classmethod
    def parse(cls, raw: bytes) -> Request:
        full = bytes(raw[: spec.VirtioMemReq.SPEC_SIZE]).ljust(spec.VirtioMemReq.SPEC_SIZE, b"\0")
        req = spec.VirtioMemReq.from_buffer_copy(full)
        return cls(
            type=int(req.type),
            addr=int(req.addr),
            nb_blocks=int(req.nb_blocks),
            data=full[2:],
            length=len(raw),
        )

    @property
    def name(self) -> str:
        try:
            return RequestType(self.type).name
        except ValueError:
            return f"type={self.type}"

    def describe(self) -> str:
        if self.type == RequestType.UNPLUG_ALL:
            return self.name
        return f"{self.name} addr={self.addr:#x} nb_blocks={self.nb_blocks}"


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One request and the device's answer, with the config last read before it."""

    request: Request
    response: bytes
    config: ConfigSeen | None

    @property
    def response_type(self) -> int | None:
        """The response's ``type`` (le16), None when the response is shorter than 2 bytes."""
        if len(self.response) < 2:
            return None
        return int.from_bytes(self.response[0:2], "little")

    @property
    def state(self) -> int | None:
        """``virtio_mem_resp_state.state`` (bytes 8-9), None when the response is short."""
        size = spec.VirtioMemResp.SPEC_SIZE
        if len(self.response) < size:
            return None
        return int.from_bytes(self.response[size - 2 : size], "little")

    def answered(self, *types: ResponseType) -> bool:
        return self.response_type in {int(t) for t in types}

    def answer_text(self) -> str:
        """``ACK``, ``STATE ACK MIXED``-style text for reports, or the raw type."""
        kind = self.response_type
        try:
            text = ResponseType(kind).name if kind is not None else "no type"
        except ValueError:
            text = f"type={kind}"
        if self.request.type == RequestType.STATE and kind == ResponseType.ACK:
            state = self.state
            try:
                text += f" {BlockState(state).name}" if state is not None else " (no state)"
            except ValueError:
                text += f" state={state}"
        return text


@dataclasses.dataclass
class DeviceView:
    """What the device's history says, as far as a driver can know it.

    ``plugged`` holds one byte per device block (1: the device ACKed its PLUG and
    no ACKed UNPLUG or UNPLUG_ALL since), counted from the first config's
    ``addr``; None while the block states are unknown: before the first config
    showing ``plugged_size`` 0 or an ACKed UNPLUG_ALL, and after any finding
    (a device that broke one rule is not used to judge the next).
    ``since_read`` are the exchanges since the last config read.
    """

    first: ConfigSeen | None = None
    last: ConfigSeen | None = None
    plugged: bytearray | None = None
    since_read: list[Exchange] = dataclasses.field(default_factory=list)

    def block_range(self, addr: int, nb_blocks: int) -> range | None:
        """The block indices a request covers, None when they are not tracked blocks."""
        first = self.first
        if first is None or self.plugged is None:
            return None
        offset = addr - first.addr
        if offset < 0 or offset % first.block_size:
            return None
        start = offset // first.block_size
        if start + nb_blocks > len(self.plugged):
            return None
        return range(start, start + nb_blocks)

    def plugged_bytes(self) -> int | None:
        """The plugged size the history implies, None while block states are unknown."""
        if self.plugged is None or self.first is None:
            return None
        return self.plugged.count(1) * self.first.block_size

    def state_of(self, blocks: range) -> BlockState | None:
        """PLUGGED, UNPLUGGED or MIXED for tracked ``blocks`` (None: not tracked)."""
        if self.plugged is None or not blocks:
            return None
        part = self.plugged[blocks.start : blocks.stop]
        if part.find(0) == -1:
            return BlockState.PLUGGED
        if part.find(1) == -1:
            return BlockState.UNPLUGGED
        return BlockState.MIXED

    def all_unplugged(self) -> None:
        """Every block unplugged (an ACKed UNPLUG_ALL, or ``plugged_size`` 0)."""
        first = self.first
        if first is None or not first.sane_blocks:
            self.plugged = None
            return
        self.plugged = bytearray(first.region_size // first.block_size)

    def forget(self) -> None:
        self.plugged = None

    def apply(self, exchange: Exchange) -> None:
        """Record what an ACKed state change did (no answer but ACK changes a block)."""
        self.since_read.append(exchange)
        if not exchange.answered(ResponseType.ACK):
            return
        req = exchange.request
        if req.type == RequestType.UNPLUG_ALL:
            self.all_unplugged()
            return
        if req.type not in (RequestType.PLUG, RequestType.UNPLUG):
            return
        blocks = self.block_range(req.addr, req.nb_blocks)
        if blocks is None:
            self.forget()
            return
        assert self.plugged is not None
        value = 1 if req.type == RequestType.PLUG else 0
        self.plugged[blocks.start : blocks.stop] = bytes([value]) * len(blocks)

    def read(self, config: ConfigSeen) -> None:
        """Take a config read as the new reference."""
        if self.first is None:
            self.first = config
        elif config.geometry != self.first.geometry:
            self.forget()
        self.last = config
        self.since_read = []
        if (
            self.plugged is None
            and config.plugged_size == 0
            and config.geometry == (self.first.geometry)
        ):
            self.all_unplugged()
