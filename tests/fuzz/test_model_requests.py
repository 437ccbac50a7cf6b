"""Raw virtio-mem requests, valid and invalid, against the device model and an oracle.

The oracle is a plain, set-based restatement of QEMU's rules (docs/protocol.md
section 1), written independently of the model: after every step the model's
answer, block state, config and callbacks must equal the oracle's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from vmem_guest import spec
from vmem_guest.device import DeviceConfig
from vmem_guest.errors import DeviceBroken
from vmem_guest.sim import DeviceModel
from vmem_guest.spec import BlockState, RequestType, ResponseType

MiB = 1 << 20
GiB = 1 << 30
TOP = 1 << 64
RANGE_TYPES = (RequestType.PLUG, RequestType.UNPLUG, RequestType.STATE)
Answer = tuple[ResponseType, BlockState | None]


@dataclass
class Oracle:
    """QEMU 7.2's virtio-mem, restated with a set of plugged block indices."""

    addr: int
    region: int
    bs: int
    margin: int
    requested: int
    rng: random.Random
    plugged: set[int] = field(default_factory=set)
    usable: int = 0
    busy_next: int = 0
    busy_rate: float = 0.0
    broken: bool = False
    config_changes: int = 0

    def __post_init__(self) -> None:
        self.usable = self.usable_for(self.requested)

    def usable_for(self, requested: int) -> int:
        """min(region, requested + margin) rounded up to a block; 0 if nothing requested."""
        if requested == 0:
            return 0
        size = min(self.region, requested + self.margin)
        return (size + self.bs - 1) // self.bs * self.bs

    def blocks(self, gpa: int, nb: int) -> set[int]:
        first = (gpa - self.addr) // self.bs
        return set(range(first, first + nb))

    def valid(self, gpa: int, nb: int) -> bool:
        """Aligned, not empty, no 64-bit overflow, inside [addr, addr + usable)."""
        end = gpa + nb * self.bs
        # QEMU computes addr + usable_region_size in uint64_t: it wraps at 2**64.
        usable_end = (self.addr + self.usable) % TOP
        if gpa % self.bs != 0 or nb == 0 or end >= TOP:
            return False
        return self.addr <= gpa < usable_end and end <= usable_end

    def busy(self) -> bool:
        if self.busy_next:
            self.busy_next -= 1
            return True
        return self.busy_rate > 0 and self.rng.random() < self.busy_rate

    def answer(self, req_type: int, gpa: int, nb: int) -> Answer | None:
        """The answer QEMU gives; None when the device breaks (or is broken)."""
        if self.broken or req_type not in (0, 1, 2, 3):
            if not self.broken:
                self.broken = True
                self.config_changes += 1
            return None
        if req_type == RequestType.UNPLUG_ALL:
            if self.busy():
                return ResponseType.BUSY, None
            self.plugged.clear()
            self.usable = self.usable_for(self.requested)
            return ResponseType.ACK, None
        if not self.valid(gpa, nb):
            return ResponseType.ERROR, None
        blocks = self.blocks(gpa, nb)
        if req_type == RequestType.STATE:
            if blocks <= self.plugged:
                return ResponseType.ACK, BlockState.PLUGGED
            if not blocks & self.plugged:
                return ResponseType.ACK, BlockState.UNPLUGGED
            return ResponseType.ACK, BlockState.MIXED
        if req_type == RequestType.PLUG:
            if (len(self.plugged) + nb) * self.bs > self.requested:
                return ResponseType.NACK, None
            if blocks & self.plugged:
                return ResponseType.ERROR, None
            if self.busy():
                return ResponseType.BUSY, None
            self.plugged |= blocks
            return ResponseType.ACK, None
        if not blocks <= self.plugged:
            return ResponseType.ERROR, None
        if self.busy():
            return ResponseType.BUSY, None
        self.plugged -= blocks
        return ResponseType.ACK, None

    def resize(self, size: int) -> bool:
        """qom-set requested-size; False when QEMU refuses the value."""
        if size < 0 or size % self.bs or size > self.region:
            return False
        if size != self.requested:
            self.usable = max(self.usable, self.usable_for(size))
            self.requested = size
        self.config_changes += 1
        return True

    def system_reset(self) -> None:
        self.plugged.clear()
        self.usable = self.usable_for(self.requested)
        self.broken = False


def raw_request(req_type: int, gpa: int, nb: int, pad: int = 0) -> bytes:
    """24 request bytes; ``pad`` fills the padding fields (the device ignores them)."""
    raw = bytearray(spec.encode_request(RequestType.PLUG, gpa, nb))
    raw[0:2] = req_type.to_bytes(2, "little")
    raw[2:8] = bytes([pad]) * 6
    raw[18:24] = bytes([pad]) * 6
    return bytes(raw)


class ModelRequests(RuleBasedStateMachine):
    """Drives a DeviceModel and an Oracle with the same inputs."""

    model: DeviceModel
    oracle: Oracle

    @initialize(
        bs=st.sampled_from([1 * MiB, 2 * MiB, 128 * MiB, 1 * GiB]),
        nr_blocks=st.integers(1, 600),
        place=st.sampled_from(["low", "high", "top"]),
        slack=st.integers(0, 3),
        margin_blocks=st.sampled_from([None, 0, 1, 7]),
        requested_frac=st.floats(0, 1),
        seed=st.integers(0, 2**32),
    )
    def setup(
        self,
        bs: int,
        nr_blocks: int,
        place: str,
        slack: int,
        margin_blocks: int | None,
        requested_frac: float,
        seed: int,
    ) -> None:
        region = nr_blocks * bs
        addr = {"low": 4 * GiB, "high": bs * 12345, "top": TOP - region - slack * bs}[place]
        margin = 256 * MiB if margin_blocks is None else margin_blocks * bs
        requested = int(nr_blocks * requested_frac) * bs
        self.model = DeviceModel(
            addr=addr,
            region_size=region,
            block_size=bs,
            requested_size=requested,
            usable_margin=margin,
            rng=random.Random(seed),
        )
        self.oracle = Oracle(addr, region, bs, margin, requested, random.Random(seed))
        self.config_changes = 0
        self.model.on_config_change = self._on_config_change

    def _on_config_change(self) -> None:
        self.config_changes += 1

    def send(self, req_type: int, gpa: int, nb: int, pad: int = 0) -> None:
        self.submit_and_check(raw_request(req_type, gpa, nb, pad), req_type, gpa, nb)

    def submit_and_check(self, raw: bytes, req_type: int, gpa: int, nb: int) -> None:
        expected = self.oracle.answer(req_type, gpa, nb)
        try:
            response = self.model.submit(raw)
        except DeviceBroken:
            assert expected is None, f"model broke, oracle answers {expected}"
            return
        assert expected is not None, "oracle broke, model answered"
        resp = spec.VirtioMemResp.from_buffer_copy(response)
        state = BlockState(resp.state) if req_type == RequestType.STATE and resp.type == 0 else None
        assert (ResponseType(resp.type), state) == expected

    # -- range requests, by kind of address --------------------------------------

    def _usable_blocks(self) -> int:
        return self.oracle.usable // self.oracle.bs

    @rule(
        req_type=st.sampled_from(RANGE_TYPES),
        start=st.floats(0, 1, exclude_max=True),
        length=st.floats(0, 1),
    )
    def valid_range(self, req_type: RequestType, start: float, length: float) -> None:
        usable_blocks = self._usable_blocks()
        if usable_blocks == 0:
            self.send(req_type, self.oracle.addr, 1)
            return
        first = int(start * usable_blocks)
        nb = max(1, min(spec.MAX_BLOCKS_PER_REQUEST, int(length * (usable_blocks - first))))
        self.send(req_type, self.oracle.addr + first * self.oracle.bs, nb)

    @rule(
        req_type=st.sampled_from(RANGE_TYPES),
        kind=st.sampled_from(["misaligned", "zero", "overflow", "below", "at_end", "straddle"]),
        index=st.integers(0, 600),
        offset=st.integers(1, GiB - 1),
        nb=st.integers(1, spec.MAX_BLOCKS_PER_REQUEST),
    )
    def invalid_range(
        self, req_type: RequestType, kind: str, index: int, offset: int, nb: int
    ) -> None:
        """Misaligned, zero blocks, overflowing 2**64, or outside the usable region."""
        o = self.oracle
        gpa = o.addr + index * o.bs
        usable_end = o.addr + o.usable
        if kind == "misaligned":
            gpa += max(offset % o.bs, 1)
        elif kind == "zero":
            nb = 0
        elif kind == "overflow":
            gpa = TOP - (index % 4 + 1) * o.bs
        elif kind == "below":
            gpa = o.addr - (index % 4 + 1) * o.bs
        elif kind == "at_end":
            gpa = usable_end + (index % 3) * o.bs
        else:
            gpa, nb = usable_end - o.bs, max(nb % 8, 2)
        self.send(req_type, gpa % TOP, nb)

    @precondition(lambda self: self.oracle.requested > len(self.oracle.plugged) * self.oracle.bs)
    @rule(start=st.floats(0, 1, exclude_max=True), length=st.floats(0, 1))
    def plug_unplugged(self, start: float, length: float) -> None:
        """A PLUG of unplugged blocks that fits ``requested_size`` (ACK unless BUSY)."""
        o = self.oracle
        free = set(range(self._usable_blocks())) - o.plugged
        room = o.requested // o.bs - len(o.plugged)
        if not free:
            return
        first = sorted(free)[int(start * len(free))]
        nb = 1
        while nb < room * length and first + nb in free:
            nb += 1
        self.send(RequestType.PLUG, o.addr + first * o.bs, nb)

    @precondition(lambda self: self.oracle.plugged)
    @rule(start=st.floats(0, 1, exclude_max=True), length=st.floats(0, 1))
    def unplug_plugged(self, start: float, length: float) -> None:
        """An UNPLUG of plugged blocks (ACK unless BUSY)."""
        o = self.oracle
        plugged = sorted(o.plugged)
        first = plugged[int(start * len(plugged))]
        nb = 1
        while nb < len(plugged) * length and first + nb in o.plugged:
            nb += 1
        self.send(RequestType.UNPLUG, o.addr + first * o.bs, nb)

    @rule(start=st.floats(0, 1, exclude_max=True), extra=st.integers(1, 16))
    def plug_beyond_requested(self, start: float, extra: int) -> None:
        o = self.oracle
        room = (o.requested // o.bs) - len(o.plugged)
        usable_blocks = self._usable_blocks()
        first = int(start * max(usable_blocks, 1))
        self.send(RequestType.PLUG, o.addr + first * o.bs, max(room, 0) + extra)

    @rule()
    def unplug_all(self) -> None:
        self.send(RequestType.UNPLUG_ALL, 0, 0)

    @rule(
        req_type=st.integers(0, 3),
        gpa=st.integers(0, TOP - 1),
        nb=st.integers(0, spec.MAX_BLOCKS_PER_REQUEST),
        pad=st.integers(0, 255),
    )
    def any_fields(self, req_type: int, gpa: int, nb: int, pad: int) -> None:
        self.send(req_type, gpa, nb, pad)

    # -- malformed requests: virtio_error --------------------------------------

    @rule(
        length=st.integers(0, spec.VirtioMemReq.SPEC_SIZE),
        req_type=st.integers(4, 0xFFFF),
        then_reset=st.booleans(),
    )
    def malformed(self, length: int, req_type: int, then_reset: bool) -> None:
        """Shorter than 24 bytes, or (at 24 bytes) an unknown type: virtio_error."""
        raw = raw_request(req_type, self.oracle.addr, 1)[:length]
        self.oracle.answer(-1, 0, 0)
        try:
            self.model.submit(raw)
        except DeviceBroken:
            pass
        else:
            raise AssertionError(f"malformed request {raw.hex()} was answered")
        self.model_matches_oracle()
        if then_reset:
            self.device_reset()

    @precondition(lambda self: self.oracle.broken)
    @rule()
    def device_reset(self) -> None:
        """The driver writes status 0: the device answers again, blocks unchanged."""
        self.model.device_reset()
        self.oracle.broken = False

    # -- host side ----------------------------------------------------------------

    @rule(blocks=st.integers(-1, 605), misalign=st.sampled_from([0, 0, 0, 4096, MiB // 2]))
    def resize(self, blocks: int, misalign: int) -> None:
        size = blocks * self.oracle.bs + misalign
        accepted = self.oracle.resize(size)
        try:
            self.model.resize(size)
        except ValueError:
            assert not accepted, f"model refused resize to {size:#x}"
            return
        assert accepted, f"model accepted resize to {size:#x}"

    @rule()
    def system_reset(self) -> None:
        self.model.system_reset()
        self.oracle.system_reset()

    @rule(n=st.integers(0, 2))
    def inject_busy(self, n: int) -> None:
        self.model.busy_next = self.oracle.busy_next = n

    @rule(rate=st.sampled_from([0.0, 0.0, 0.0, 0.25, 1.0]))
    def busy_rate(self, rate: float) -> None:
        self.model.busy_rate = self.oracle.busy_rate = rate

    # -- invariants ---------------------------------------------------------------

    @invariant()
    def sizes_are_consistent(self) -> None:
        m = self.model
        assert m.plugged_size == m.bitmap().count(1) * m.block_size
        assert m.plugged_size <= m.region_size
        assert m.requested_size <= m.usable_region_size <= m.region_size
        assert m.usable_region_size % m.block_size == 0

    @invariant()
    def model_matches_oracle(self) -> None:
        m, o = self.model, self.oracle
        assert m.plugged_blocks() == o.plugged
        assert (m.requested_size, m.usable_region_size) == (o.requested, o.usable)
        assert m.broken == o.broken
        assert m.busy_next == o.busy_next
        assert self.config_changes == o.config_changes

    @invariant()
    def config_is_valid_and_current(self) -> None:
        cfg = DeviceConfig.from_bytes(self.model.read_config())
        o = self.oracle
        assert cfg.plugged_size == len(o.plugged) * o.bs
        assert (cfg.requested_size, cfg.usable_region_size) == (o.requested, o.usable)
        assert (cfg.addr, cfg.region_size, cfg.block_size) == (o.addr, o.region, o.bs)


TestModelRequests = ModelRequests.TestCase
