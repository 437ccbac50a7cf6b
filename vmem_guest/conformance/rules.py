"""The virtio-mem specification as data: one table of rules, :data:`RULES`.

Every normative statement of the memory device section (virtio-spec
``device-types/mem/description.tex``, section 5.15 of virtio 1.2 to 1.4), and
the two transport statements a virtio-mem driver depends on, is one
:class:`Rule`: its section, its level (MUST, SHOULD, MAY), its sentence as the
spec words it, whose obligation it is (device or driver), and, for the
device-side rules a driver can observe, a check function. Read at
oasis-tcs/virtio-spec commit :data:`SPEC_COMMIT` (the memory device text is the
same at tag v1.4-csd01).

A check sees one event and the :class:`~vmem_guest.conformance.observe.DeviceView`
before it, and returns None or what it saw that breaks the rule. Exchange
checks run on every request and its response; config checks on every config
read. Rules without a check say why (``unchecked``) or, for the driver's own
obligations, where the agent keeps them (``kept_by``, file:function).
Statements taken from descriptive text rather than a requirements paragraph
carry ``source="description"`` (docs/spec-oracle.md says how they count).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from typing import Literal

from vmem_guest.conformance.observe import ConfigSeen, DeviceView, Exchange
from vmem_guest.spec import BlockState, RequestType, ResponseType

#: The virtio-spec commit read (2026-04-08), and where the memory device text lives.
SPEC_COMMIT = "15f488c162107f7b52fb2e4d0f36a2349fe9d3a9"
SPEC_SOURCE = "oasis-tcs/virtio-spec:device-types/mem/description.tex"

ExchangeCheck = Callable[[Exchange, DeviceView], str | None]
ConfigCheck = Callable[[ConfigSeen, DeviceView], str | None]

ACK, NACK, BUSY, ERROR = ResponseType.ACK, ResponseType.NACK, ResponseType.BUSY, ResponseType.ERROR
PLUG, UNPLUG = RequestType.PLUG, RequestType.UNPLUG
UNPLUG_ALL, STATE = RequestType.UNPLUG_ALL, RequestType.STATE


class Level(enum.StrEnum):
    """RFC 2119 keyword of a rule."""

    MUST = "MUST"
    SHOULD = "SHOULD"
    MAY = "MAY"


class Side(enum.StrEnum):
    """Whose obligation a rule is."""

    DEVICE = "device"
    DRIVER = "driver"


#: Section numbers and titles (virtio 1.2-1.4 numbering; the memory device is 5.15).
SECTIONS = {
    "5.15": "Memory Device",
    "5.15.4": "Device configuration layout",
    "5.15.4.1": "Device configuration layout: Driver Requirements",
    "5.15.4.2": "Device configuration layout: Device Requirements",
    "5.15.5.1": "Device Initialization: Driver Requirements",
    "5.15.5.2": "Device Initialization: Device Requirements",
    "5.15.6": "Device Operation",
    "5.15.6.1": "Device Operation: Driver Requirements",
    "5.15.6.2": "Device Operation: Device Requirements",
    "5.15.6.3.1": "PLUG request: Driver Requirements",
    "5.15.6.3.2": "PLUG request: Device Requirements",
    "5.15.6.4.1": "UNPLUG request: Driver Requirements",
    "5.15.6.4.2": "UNPLUG request: Device Requirements",
    "5.15.6.5.1": "UNPLUG ALL request: Driver Requirements",
    "5.15.6.5.2": "UNPLUG ALL request: Device Requirements",
    "5.15.6.6.1": "STATE request: Driver Requirements",
    "5.15.6.6.2": "STATE request: Device Requirements",
    "2.5.1": "Device Configuration Space: Driver Requirements",
    "4.1.4.3.1": "Common configuration structure layout: Device Requirements",
    "4.1.4.3.2": "Common configuration structure layout: Driver Requirements",
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One statement of the spec.

    ``id`` is stable (reports and tests name it); ``sentence`` is the spec's
    (LaTeX markup dropped). A device rule has ``on_exchange`` or ``on_config``
    when the oracle checks it, else ``unchecked`` says why; a driver rule has
    ``kept_by``: where the agent keeps it.
    """

    id: str
    section: str
    level: Level
    side: Side
    sentence: str
    on_exchange: ExchangeCheck | None = None
    on_config: ConfigCheck | None = None
    unchecked: str = ""
    kept_by: str = ""
    source: Literal["requirement", "description"] = "requirement"
    #: A config rule that compares the device with the ACKed history: when it fires,
    #: the history no longer describes the device (the oracle forgets block states).
    against_history: bool = False

    @property
    def title(self) -> str:
        return SECTIONS[self.section]

    @property
    def checked(self) -> bool:
        return self.on_exchange is not None or self.on_config is not None

    def cite(self) -> str:
        """``5.15.6.3.2 PLUG request: Device Requirements``."""
        return f"{self.section} {self.title}"


# -- what a request covers -------------------------------------------------------------


def _why_invalid(cfg: ConfigSeen, ex: Exchange) -> str:
    """Which of the spec's three range conditions ``ex``'s request breaks."""
    req = ex.request
    if cfg.block_size == 0 or req.addr % cfg.block_size:
        return f"addr is not aligned to block_size {cfg.block_size:#x}"
    if req.nb_blocks == 0:
        return "nb_blocks is 0"
    end = cfg.addr + cfg.usable_region_size
    return f"it covers blocks outside the usable region [{cfg.addr:#x}, {end:#x})"


def _answered(ex: Exchange) -> str:
    return f"{ex.request.describe()} answered {ex.answer_text()}"


def _range_error(req_type: RequestType) -> ExchangeCheck:
    """ERROR for a misaligned, empty or out-of-usable-region request of ``req_type``."""

    def check(ex: Exchange, view: DeviceView) -> str | None:
        req, cfg = ex.request, ex.config
        if req.type != req_type or cfg is None or cfg.valid_range(req.addr, req.nb_blocks):
            return None
        if ex.answered(ERROR):
            return None
        return f"{_answered(ex)}, but {_why_invalid(cfg, ex)}"

    return check


def _target_state_error(req_type: RequestType) -> ExchangeCheck:
    """ERROR for a PLUG covering a plugged block, an UNPLUG covering an unplugged one."""
    wrong = 1 if req_type is PLUG else 0

    def check(ex: Exchange, view: DeviceView) -> str | None:
        req, cfg = ex.request, ex.config
        if req.type != req_type or cfg is None or not cfg.valid_range(req.addr, req.nb_blocks):
            return None
        blocks = view.block_range(req.addr, req.nb_blocks)
        if blocks is None or view.plugged is None or ex.answered(ERROR):
            return None
        found = view.plugged.find(wrong, blocks.start, blocks.stop)
        if found == -1:
            return None
        assert view.first is not None
        block_addr = view.first.addr + found * view.first.block_size
        state = "plugged" if wrong else "unplugged"
        return f"{_answered(ex)}, but the block at {block_addr:#x} is already {state}"

    return check


def _unplug_all_ack_or_busy(ex: Exchange, view: DeviceView) -> str | None:
    req = ex.request
    if req.type != UNPLUG_ALL or req.addr or req.nb_blocks or ex.answered(ACK, BUSY):
        return None
    return f"{_answered(ex)}: only ACK, or BUSY when it cannot be processed now"


def _unplug_all_ignores_data(ex: Exchange, view: DeviceView) -> str | None:
    req = ex.request
    if req.type != UNPLUG_ALL or not (req.addr or req.nb_blocks) or ex.answered(ACK, BUSY):
        return None
    return (
        f"UNPLUG_ALL carrying addr={req.addr:#x} nb_blocks={req.nb_blocks} answered"
        f" {ex.answer_text()}: the data must be ignored (ACK or BUSY)"
    )


def _state_acked(ex: Exchange, view: DeviceView) -> str | None:
    req, cfg = ex.request, ex.config
    if req.type != STATE or cfg is None or not cfg.valid_range(req.addr, req.nb_blocks):
        return None
    if ex.answered(ACK):
        return None
    return f"{_answered(ex)}: a valid STATE request is acknowledged (no BUSY for STATE)"


def _state_matches_history(ex: Exchange, view: DeviceView) -> str | None:
    req, cfg = ex.request, ex.config
    if req.type != STATE or not ex.answered(ACK):
        return None
    if cfg is None or not cfg.valid_range(req.addr, req.nb_blocks):
        return None  # an ACK where ERROR is due: state.range-error reports it
    state = ex.state
    if state is None:
        return None  # a response too short for a state: response.layout reports it
    try:
        answered = BlockState(state)
    except ValueError:
        return f"{_answered(ex)}: state {state} is none of PLUGGED, UNPLUGGED, MIXED"
    blocks = view.block_range(req.addr, req.nb_blocks)
    expected = view.state_of(blocks) if blocks is not None else None
    if expected is None or answered is expected:
        return None
    return f"{_answered(ex)}, but the ACKed requests so far leave them {expected.name}"


def _response_layout(ex: Exchange, view: DeviceView) -> str | None:
    if ex.request.type not in set(RequestType):
        return None
    kind = ex.response_type
    if len(ex.response) >= 10 and kind in set(ResponseType):
        return None
    return f"{ex.request.describe()}: response {ex.response.hex()} ({len(ex.response)} bytes)"


def _plug_beyond_requested(ex: Exchange, view: DeviceView) -> str | None:
    cfg = ex.config
    if ex.request.type != PLUG or cfg is None or not ex.answered(ACK):
        return None
    if cfg.plugged_size < cfg.requested_size:
        return None
    return (
        f"{_answered(ex)} with plugged_size {cfg.plugged_size:#x} >= requested_size"
        f" {cfg.requested_size:#x}"
    )


# -- config reads --------------------------------------------------------------------

_GEOMETRY = ("block_size", "node_id", "addr", "region_size")
_MULTIPLES = ("addr", "region_size", "usable_region_size", "plugged_size", "requested_size")


def _fixed_geometry(cfg: ConfigSeen, view: DeviceView) -> str | None:
    first = view.first
    if first is None or cfg.geometry == first.geometry:
        return None
    changed = [
        f"{name} {getattr(first, name):#x} -> {getattr(cfg, name):#x}"
        for name in _GEOMETRY
        if getattr(first, name) != getattr(cfg, name)
    ]
    return "changed without a system reset: " + ", ".join(changed)


def _block_size_power_of_two(cfg: ConfigSeen, view: DeviceView) -> str | None:
    bs = cfg.block_size
    if bs and not bs & (bs - 1):
        return None
    return f"block_size {bs:#x} is not a power of two"


def _multiples_of_block_size(cfg: ConfigSeen, view: DeviceView) -> str | None:
    bs = cfg.block_size
    if not bs:
        return None  # the power-of-two rule reports a zero block size
    odd = [f"{name} {getattr(cfg, name):#x}" for name in _MULTIPLES if getattr(cfg, name) % bs]
    return f"not multiples of block_size {bs:#x}: {', '.join(odd)}" if odd else None


def _usable_covers_requested(cfg: ConfigSeen, view: DeviceView) -> str | None:
    if cfg.usable_region_size >= cfg.requested_size:
        return None
    return (
        f"usable_region_size {cfg.usable_region_size:#x} < requested_size {cfg.requested_size:#x}"
    )


def _usable_within_region(cfg: ConfigSeen, view: DeviceView) -> str | None:
    if cfg.usable_region_size <= cfg.region_size:
        return None
    return f"usable_region_size {cfg.usable_region_size:#x} > region_size {cfg.region_size:#x}"


def _usable_shrinks_only_on_unplug_all(cfg: ConfigSeen, view: DeviceView) -> str | None:
    last = view.last
    if last is None or cfg.usable_region_size >= last.usable_region_size:
        return None
    if any(ex.request.type == UNPLUG_ALL for ex in view.since_read):
        return None
    after = view.since_read[-1].request.describe() if view.since_read else "no request"
    return (
        f"usable_region_size shrank {last.usable_region_size:#x} ->"
        f" {cfg.usable_region_size:#x} after {after}"
    )


def _last_state_change(view: DeviceView) -> int | None:
    """The type of the last ACKed PLUG, UNPLUG or UNPLUG_ALL since the last config read."""
    for ex in reversed(view.since_read):
        if ex.answered(ACK) and ex.request.type in (PLUG, UNPLUG, UNPLUG_ALL):
            return ex.request.type
    return None


def _plugged_size_after(cause: int | None) -> ConfigCheck:
    """``plugged_size`` against the ACKed history, for the reads after ``cause``
    (the last ACKed state change since the previous read; None: none)."""

    def check(cfg: ConfigSeen, view: DeviceView) -> str | None:
        expected = view.plugged_bytes()
        if expected is None or _last_state_change(view) != cause:
            return None
        if cfg.plugged_size == expected:
            return None
        after = f"after an ACKed {RequestType(cause).name}" if cause is not None else "with no"
        if cause is None:
            after += " ACKed state change since the last read"
        return (
            f"plugged_size {cfg.plugged_size:#x} {after}; the ACKed requests make it {expected:#x}"
        )

    return check


def _generation_changes(cfg: ConfigSeen, view: DeviceView) -> str | None:
    last = view.last
    if last is None or cfg.generation is None or last.generation is None:
        return None
    if cfg.raw == last.raw or cfg.generation != last.generation:
        return None
    changed = [
        name
        for name in (*_GEOMETRY, "usable_region_size", "plugged_size", "requested_size")
        if getattr(cfg, name) != getattr(last, name)
    ] or ["padding"]
    after = view.since_read[-1].request.describe() if view.since_read else "no request"
    return (
        f"config_generation still {cfg.generation} after {after} although"
        f" {', '.join(changed)} changed since the last read"
    )


# -- the table ---------------------------------------------------------------------

_MUST, _SHOULD, _MAY = Level.MUST, Level.SHOULD, Level.MAY
_DEVICE, _DRIVER = Side.DEVICE, Side.DRIVER

_NO_MEMORY = "the fuzzer never reads or writes the region's memory"
_NO_INTERRUPTS = "the fuzzer reads no interrupts"
_NO_RESETS = "the fuzzer never resets the device or the system"
_PERMISSION = "a permission: no answer it allows is a finding"
_ZERO_PADDING = "the fuzzer sends PLUG, UNPLUG and STATE with zero padding"
_RANGE_RULE = (
    "The device MUST reject requests with VIRTIO_MEM_RESP_ERROR if addr is not aligned"
    " to the block_size in the device configuration, if nb_blocks is not greater than"
    " 0, or if any memory block outside of the usable device-managed memory region is"
    " covered by the request."
)
_IGNORE_REST = (
    "The device MUST ignore anything except the request type and the request-specific"
    " data in a request."
)
_IGNORE_PADDING = "The device MUST ignore the padding in the request-specific data in a request."
_MAY_BUSY = (
    "The device MAY reject requests with VIRTIO_MEM_RESP_BUSY if the request can"
    " currently not be processed."
)
_RESPONSE_TYPE_ONLY = "The driver MUST ignore anything except the response type in a response."
_PARSE_RESPONSE = "vmem_guest/device.py:parse_response"


def _request_rules(name: str, section: str, req_type: RequestType) -> list[Rule]:
    """The rules PLUG and UNPLUG share (5.15.6.3 and 5.15.6.4), and their own."""
    target = "plugged" if req_type is PLUG else "unplugged"
    driver = section[:-1] + "1"
    return [
        Rule(f"{name}.ignore-fields", section, _MUST, _DEVICE, _IGNORE_REST,
             unchecked=_ZERO_PADDING),
        Rule(f"{name}.ignore-padding", section, _MUST, _DEVICE, _IGNORE_PADDING,
             unchecked=_ZERO_PADDING),
        Rule(f"{name}.range-error", section, _MUST, _DEVICE, _RANGE_RULE,
             on_exchange=_range_error(req_type)),
        Rule(f"{name}.{target}-error", section, _MUST, _DEVICE,
             "The device MUST reject requests with VIRTIO_MEM_RESP_ERROR if any memory"
             f" block covered by the request is already {target}.",
             on_exchange=_target_state_error(req_type)),
        Rule(f"{name}.busy", section, _MAY, _DEVICE, _MAY_BUSY, unchecked=_PERMISSION),
        Rule(f"{name}.ack-reflected", section, _MUST, _DEVICE,
             "The device MUST acknowledge requests with VIRTIO_MEM_RESP_ACK in case all"
             f" memory blocks were successfully {target}.  The device MUST reflect the change"
             " in the device configuration plugged_size.",
             on_config=_plugged_size_after(req_type), against_history=True),
        Rule(f"{name}.driver-response-type", driver, _MUST, _DRIVER, _RESPONSE_TYPE_ONLY,
             kept_by=_PARSE_RESPONSE),
    ]  # fmt: skip


RULES: tuple[Rule, ...] = (
    # 5.15 and 5.15.4: descriptive text the oracle holds the device to.
    Rule("plug.rejected-at-requested", "5.15", _SHOULD, _DEVICE,
         "Once the plugged_size is greater or equal to the requested_size, requests to"
         " plug memory blocks will be rejected by the device.",
         on_exchange=_plug_beyond_requested, source="description"),
    Rule("config.usable-within-region", "5.15.4", _MUST, _DEVICE,
         "usable_region_size is the size of the usable device-managed memory region."
         "  Can grow up to region_size.",
         on_config=_usable_within_region, source="description"),
    Rule("response.layout", "5.15.6", _MUST, _DEVICE,
         "All responses are 10 bytes long [...] Possible response types, in general, are:"
         " VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_RESP_NACK, VIRTIO_MEM_RESP_BUSY,"
         " VIRTIO_MEM_RESP_ERROR.",
         on_exchange=_response_layout, source="description"),
    # 5.15.4.1 / 5.15.4.2: the config space.
    Rule("config.driver-no-write", "5.15.4.1", _MUST, _DRIVER,
         "The driver MUST NOT write to device configuration fields.",
         kept_by="vmem_guest/transport/virtio_pci.py:VirtioPciTransport.read_config"
                 " (the device config window is only ever read)"),
    Rule("config.driver-ignore-padding", "5.15.4.1", _MUST, _DRIVER,
         "The driver MUST ignore the value of padding.",
         kept_by="vmem_guest/device.py:DeviceConfig.from_bytes (padding is not parsed)"),
    Rule("config.driver-ignore-node-id", "5.15.4.1", _MUST, _DRIVER,
         "The driver MUST ignore the value of node_id without VIRTIO_MEM_F_ACPI_PXM.",
         kept_by="vmem_guest/driver.py:DeviceDriver._online_block (the node of onlined"
                 " memory is the kernel's, from the probe; node_id is only displayed)"),
    Rule("config.may-change-sizes", "5.15.4.2", _MAY, _DEVICE,
         "The device MAY change usable_region_size and requested_size.",
         unchecked=_PERMISSION),
    Rule("config.fixed-geometry", "5.15.4.2", _MUST, _DEVICE,
         "The device MUST NOT change block_size, node_id, addr, and region_size, except"
         " during a system reset.",
         on_config=_fixed_geometry),
    Rule("config.plugged-size", "5.15.4.2", _MUST, _DEVICE,
         "The device MUST change plugged_size to reflect the size of plugged memory blocks.",
         on_config=_plugged_size_after(None), against_history=True),
    Rule("config.usable-covers-requested", "5.15.4.2", _MUST, _DEVICE,
         "The device MUST set usable_region_size to requested_size or greater.",
         on_config=_usable_covers_requested),
    Rule("config.block-size-power-of-two", "5.15.4.2", _MUST, _DEVICE,
         "The device MUST set block_size to a power of two.",
         on_config=_block_size_power_of_two),
    Rule("config.multiples-of-block-size", "5.15.4.2", _MUST, _DEVICE,
         "The device MUST set addr, region_size, usable_region_size, plugged_size,"
         " requested_size to multiples of block_size.",
         on_config=_multiples_of_block_size),
    Rule("config.region-size-not-negative", "5.15.4.2", _MUST, _DEVICE,
         "The device MUST set region_size to 0 or greater.",
         unchecked="holds for every le64: nothing a device could get wrong"),
    Rule("config.usable-no-shrink", "5.15.4.2", _MUST, _DEVICE,
         "The device MUST NOT shrink usable_region_size, except when processing an UNPLUG"
         " ALL request, or during a system reset.",
         on_config=_usable_shrinks_only_on_unplug_all),
    Rule("config.notify-size-change", "5.15.4.2", _MUST, _DEVICE,
         "The device MUST send a configuration update notification when changing"
         " usable_region_size or requested_size, except when processing an UNPLUG ALL"
         " request.",
         unchecked=_NO_INTERRUPTS),
    Rule("config.no-notify-plugged-size", "5.15.4.2", _SHOULD, _DEVICE,
         "The device SHOULD NOT send a configuration update notification when changing"
         " plugged_size.",
         unchecked=_NO_INTERRUPTS),
    Rule("config.may-notify", "5.15.4.2", _MAY, _DEVICE,
         "The device MAY send a configuration update notification even if nothing changed.",
         unchecked=_PERMISSION),
    # 5.15.5: initialization.
    Rule("init.driver-accept-inaccessible", "5.15.5.1", _SHOULD, _DRIVER,
         "The driver SHOULD accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE if it is offered"
         " and the driver supports it.",
         kept_by="vmem_guest/transport/channel.py:select_features"),
    Rule("init.driver-unplug-all", "5.15.5.1", _SHOULD, _DRIVER,
         "The driver SHOULD issue UNPLUG ALL requests until successful if the device still"
         " has memory plugged and the plugged memory is not in use.",
         kept_by="vmem_guest/driver.py:DeviceDriver.start (_unplug_all_unused)"),
    Rule("init.may-fail-without-inaccessible", "5.15.5.2", _MAY, _DEVICE,
         "A device MAY fail to operate further if VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE is"
         " not accepted.",
         unchecked=_PERMISSION),
    Rule("init.reset-keeps-blocks", "5.15.5.2", _MUST, _DEVICE,
         "The device MUST NOT change the state of memory blocks during device reset.",
         unchecked=_NO_RESETS),
    Rule("init.reset-keeps-memory", "5.15.5.2", _MUST, _DEVICE,
         "The device MUST NOT modify memory or memory properties of plugged memory blocks"
         " during device reset.",
         unchecked=_NO_MEMORY),
    Rule("init.offer-persistent-suspend", "5.15.5.2", _SHOULD, _DEVICE,
         "The device SHOULD offer VIRTIO_MEM_F_PERSISTENT_SUSPEND if the platform supports"
         " suspending (deep sleep, suspend-to-RAM) with plugged memory blocks.",
         unchecked="needs the platform's suspend support, which a driver cannot see"),
    # 5.15.6.1 / 5.15.6.2: operation.
    Rule("op.driver-no-write-unplugged", "5.15.6.1", _MUST, _DRIVER,
         "The driver MUST NOT write memory or modify memory properties of unplugged"
         " memory blocks.",
         kept_by="vmem_guest/driver.py:DeviceDriver._online_block (_require_plugged: only"
                 " fully plugged memory blocks are probed and onlined)"),
    Rule("op.driver-no-read-outside-usable", "5.15.6.1", _MUST, _DRIVER,
         "The driver MUST NOT read memory or query memory properties of unplugged memory"
         " blocks outside usable_region_size.",
         kept_by="vmem_guest/driver.py:DeviceDriver._online_block (_require_plugged)"),
    Rule("op.driver-no-dma-unplugged", "5.15.6.1", _MUST, _DRIVER,
         "The driver MUST NOT read memory or query memory properties of unplugged memory"
         " blocks inside usable_region_size via DMA.",
         kept_by="vmem_guest/transport/dma.py:PhysBuffer.check_outside (the request"
                 " buffer never lies in a device region)"),
    Rule("op.driver-no-cpu-read-unplugged", "5.15.6.1", _SHOULD, _DRIVER,
         "If VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE has not been negotiated, the driver SHOULD"
         " NOT read memory or query memory properties of unplugged memory blocks inside"
         " usable_region_size via the CPU.",
         kept_by="vmem_guest/driver.py:DeviceDriver._online_block (_require_plugged)"),
    Rule("op.driver-no-read-inaccessible", "5.15.6.1", _MUST, _DRIVER,
         "If VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE has been negotiated, the driver MUST NOT"
         " read memory or query memory properties of unplugged memory blocks.",
         kept_by="vmem_guest/driver.py:DeviceDriver._online_block (_require_plugged)"),
    Rule("op.driver-unplug-unused", "5.15.6.1", _MUST, _DRIVER,
         "The driver MUST NOT request unplug of memory blocks while corresponding memory"
         " or memory properties are still in use.",
         kept_by="vmem_guest/driver.py:DeviceDriver._unplug (offline or taken first:"
                 " _verify_taken)"),
    Rule("op.driver-initialize", "5.15.6.1", _SHOULD, _DRIVER,
         "The driver SHOULD initialize memory blocks after plugging them, the content is"
         " undefined.",
         kept_by="vmem_guest/driver.py:DeviceDriver._online_block (onlined memory goes to"
                 " Linux's page allocator, which initializes pages it hands out)"),
    Rule("op.driver-react-to-resize", "5.15.6.1", _SHOULD, _DRIVER,
         "The driver SHOULD react to resize requests from the device (requested_size in"
         " the device configuration changed) by (un)plugging memory blocks.",
         kept_by="vmem_guest/driver.py:DeviceDriver.config_changed"),
    Rule("op.driver-plug-usable", "5.15.6.1", _SHOULD, _DRIVER,
         "The driver SHOULD only plug memory blocks it can actually use.",
         kept_by="vmem_guest/planner.py (plugs whole memory blocks it then onlines)"),
    Rule("op.driver-no-suspend", "5.15.6.1", _MUST, _DRIVER,
         "If VIRTIO_MEM_F_PERSISTENT_SUSPEND has not been negotiated, the driver MUST NOT"
         " allow the guest to enter a suspended state (deep sleep, suspend-to-RAM).",
         kept_by="vmem_guest/inhibit.py:SuspendGuard.update"),
    Rule("op.same-memory-properties", "5.15.6.2", _MUST, _DEVICE,
         "The device MUST provide the exact same memory properties with the exact same"
         " semantics for device memory the platform provides in the same configuration"
         " for comparable RAM.",
         unchecked=_NO_MEMORY),
    Rule("op.may-modify-unplugged", "5.15.6.2", _MAY, _DEVICE,
         "The device MAY modify memory of unplugged memory blocks or reset memory"
         " properties of such memory blocks to platform defaults at any time.",
         unchecked=_PERMISSION),
    Rule("op.keep-plugged-memory", "5.15.6.2", _MUST, _DEVICE,
         "The device MUST NOT modify memory or memory properties of plugged memory blocks.",
         unchecked=_NO_MEMORY),
    Rule("op.plugged-accessible", "5.15.6.2", _MUST, _DEVICE,
         "The device MUST allow the driver to read and write memory and to query and"
         " modify memory attributes of plugged memory blocks.",
         unchecked=_NO_MEMORY),
    Rule("op.unplugged-readable", "5.15.6.2", _MUST, _DEVICE,
         "If VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE has not been negotiated, the device MUST"
         " allow the driver to read memory and to query memory properties of unplugged"
         " memory blocks inside usable_region_size via the CPU.",
         unchecked=_NO_MEMORY),
    Rule("op.may-change-on-system-reset", "5.15.6.2", _MAY, _DEVICE,
         "The device MAY change the state of memory blocks during system resets.",
         unchecked=_PERMISSION),
    Rule("op.unplug-on-system-reset", "5.15.6.2", _SHOULD, _DEVICE,
         "The device SHOULD unplug all memory blocks during system resets.",
         unchecked=_NO_RESETS),
    Rule("op.persistent-suspend", "5.15.6.2", _MUST, _DEVICE,
         "If VIRTIO_MEM_F_PERSISTENT_SUSPEND has been negotiated, the device MUST NOT not"
         " change the state of memory blocks when suspending or when waking up from"
         " suspended state (deep sleep, suspend-to-RAM).",
         unchecked="the fuzzer never suspends the guest"),
    # 5.15.6.3 / 5.15.6.4: PLUG and UNPLUG.
    *_request_rules("plug", "5.15.6.3.2", PLUG),
    *_request_rules("unplug", "5.15.6.4.2", UNPLUG),
    # 5.15.6.5: UNPLUG ALL.
    Rule("unplug-all.driver-response-type", "5.15.6.5.1", _MUST, _DRIVER,
         "The driver MUST ignore any data in a response except the response type.",
         kept_by=_PARSE_RESPONSE),
    Rule("unplug-all.ignore-data", "5.15.6.5.2", _MUST, _DEVICE,
         "The device MUST ignore any data in a request except the request type.",
         on_exchange=_unplug_all_ignores_data),
    Rule("unplug-all.ignore-padding", "5.15.6.5.2", _MUST, _DEVICE, _IGNORE_PADDING,
         unchecked="the fuzzer sends UNPLUG_ALL with zero padding"),
    Rule("unplug-all.busy", "5.15.6.5.2", _MAY, _DEVICE, _MAY_BUSY, unchecked=_PERMISSION),
    Rule("unplug-all.ack", "5.15.6.5.2", _MUST, _DEVICE,
         "The device MUST acknowledge requests with VIRTIO_MEM_RESP_ACK in case all memory"
         " blocks were successfully unplugged.",
         on_exchange=_unplug_all_ack_or_busy),
    Rule("unplug-all.plugged-zero", "5.15.6.5.2", _MUST, _DEVICE,
         "The device MUST set plugged_size to 0 in case the request is acknowledged with"
         " VIRTIO_MEM_RESP_ACK.",
         on_config=_plugged_size_after(UNPLUG_ALL), against_history=True),
    Rule("unplug-all.may-modify-usable", "5.15.6.5.2", _MAY, _DEVICE,
         "The device MAY modify usable_region_size before responding with"
         " VIRTIO_MEM_RESP_ACK.",
         unchecked=_PERMISSION),
    # 5.15.6.6: STATE.
    Rule("state.driver-response-data", "5.15.6.6.1", _MUST, _DRIVER,
         "The driver MUST ignore anything except the response type and the"
         " request-specific data in a response.",
         kept_by=_PARSE_RESPONSE),
    Rule("state.driver-ignore-unless-ack", "5.15.6.6.1", _MUST, _DRIVER,
         "The driver MUST ignore the request-specific data in a response in case the"
         " response type is not VIRTIO_MEM_RESP_ACK.",
         kept_by=_PARSE_RESPONSE),
    Rule("state.ignore-fields", "5.15.6.6.2", _MUST, _DEVICE, _IGNORE_REST,
         unchecked=_ZERO_PADDING),
    Rule("state.ignore-padding", "5.15.6.6.2", _MUST, _DEVICE, _IGNORE_PADDING,
         unchecked=_ZERO_PADDING),
    Rule("state.range-error", "5.15.6.6.2", _MUST, _DEVICE, _RANGE_RULE,
         on_exchange=_range_error(STATE)),
    Rule("state.ack", "5.15.6.6.2", _MUST, _DEVICE,
         "The device MUST acknowledge requests with VIRTIO_MEM_RESP_ACK, supplying the"
         " state of the memory blocks.",
         on_exchange=_state_acked),
    Rule("state.answer", "5.15.6.6.2", _MUST, _DEVICE,
         "The device MUST set the state type in the response to VIRTIO_MEM_STATE_PLUGGED if"
         " all requested memory blocks are plugged.  The device MUST set the state type in"
         " the response to VIRTIO_MEM_STATE_UNPLUGGED if all requested memory blocks are"
         " unplugged.  Otherwise, the device MUST set state type in the response to"
         " VIRTIO_MEM_STATE_MIXED.",
         on_exchange=_state_matches_history),
    # The transport: reading the config space consistently.
    Rule("pci.config-generation", "4.1.4.3.1", _MUST, _DEVICE,
         "The device MUST present a changed config_generation after the driver has read a"
         " device-specific configuration value which has changed since any part of the"
         " device-specific configuration was last read.",
         on_config=_generation_changes),
    Rule("pci.driver-no-write-generation", "4.1.4.3.2", _MUST, _DRIVER,
         "The driver MUST NOT write to device_feature, num_queues, config_generation,"
         " queue_notify_off or queue_notif_config_data.",
         kept_by="vmem_guest/transport/virtio_pci.py:VirtioPciTransport.read_config"
                 " (config_generation is only read)"),
    Rule("config.driver-read-generation", "2.5.1", _SHOULD, _DRIVER,
         "Drivers MUST NOT assume reads from fields greater than 32 bits wide are atomic,"
         " nor are reads from multiple fields: drivers SHOULD read device configuration"
         " space fields like so: [read config_generation before and after, until equal]",
         kept_by="vmem_guest/transport/virtio_pci.py:VirtioPciTransport.read_config"),
)  # fmt: skip

RULES_BY_ID: dict[str, Rule] = {rule.id: rule for rule in RULES}
EXCHANGE_RULES = tuple(rule for rule in RULES if rule.on_exchange is not None)
CONFIG_RULES = tuple(rule for rule in RULES if rule.on_config is not None)
