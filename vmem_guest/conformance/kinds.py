"""What hypothesis draws, :class:`Action`, and how each :class:`Kind` becomes a :class:`Step`.

An action is a kind and raw numbers. :func:`resolve` turns it into a concrete
step against the model's state when the step runs, so that shrinking keeps a
sequence meaningful ("plug some free blocks", not a fixed address). Each kind
has one resolver in :data:`RESOLVERS`. The ranges they build aim at the cases
of the device's checks, in QEMU's order (docs/protocol.md section 1, "Which
answer for which request"): misaligned, empty, overflowing and out-of-range
requests (ERROR), a PLUG beyond ``requested_size`` (NACK), a PLUG of plugged
or an UNPLUG of unplugged blocks (ERROR), and valid requests (ACK).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

from vmem_guest import spec
from vmem_guest.conformance.steps import PLUG, STATE, TOP, UNPLUG, UNPLUG_ALL, Step
from vmem_guest.sim.device_model import DeviceModel

#: Fractions are drawn as integers in [0, SCALE) and scaled to what the model has.
SCALE = 1 << 16


class Kind(enum.StrEnum):
    """How a step is generated; the value is the step's ``kind`` in reports and files."""

    # Drawn with numbers of their own.
    ANY = "any"  # any request type, any 64-bit address, any 16-bit count
    SHORT = "short"  # fewer than 24 bytes: QEMU's virtio_error, the model only
    UNKNOWN_TYPE = "unknown_type"  # type 4 and up: QEMU's virtio_error, the model only
    UNPLUG_ALL = "unplug_all"
    RESIZE = "resize"  # the host sets requested_size (needs a resize callback)
    # Against the model's bitmap.
    STATE_PLUGGED = "state_plugged"
    PLUG_FREE = "plug_free"
    UNPLUG_PLUGGED = "unplug_plugged"
    STATE_AROUND = "state_around"
    PLUG_BEYOND_REQUESTED = "plug_beyond_requested"
    # Range kinds: the request type is drawn (PLUG, UNPLUG or STATE).
    VALID = "valid"
    MISALIGNED = "misaligned"
    ZERO = "zero"
    OVERFLOW = "overflow"
    BELOW = "below"
    AT_USABLE_END = "at_usable_end"
    STRADDLE = "straddle"
    BEYOND_REGION = "beyond_region"


#: The range kinds, in drawing order.
RANGE_KINDS = (
    Kind.VALID,
    Kind.MISALIGNED,
    Kind.ZERO,
    Kind.OVERFLOW,
    Kind.BELOW,
    Kind.AT_USABLE_END,
    Kind.STRADDLE,
    Kind.BEYOND_REGION,
)

#: Request types a range kind draws from.
RANGE_TYPES = (PLUG, UNPLUG, STATE)


@dataclasses.dataclass(frozen=True)
class Action:
    """What hypothesis draws: a kind and raw numbers, resolved into a :class:`Step`.

    ``req_type`` is the request type where the kind draws one; ``a`` and ``b``
    are fractions (in [0, SCALE)) or raw values, as the kind's resolver reads them.
    """

    kind: Kind
    req_type: int = 0
    a: int = 0
    b: int = 0


#: Turns an action into the step for the model's current state.
Resolver = Callable[[Action, DeviceModel], Step]


def resolve(action: Action, model: DeviceModel) -> Step:
    """The concrete step for ``action`` given the model's current state."""
    return RESOLVERS[action.kind](action, model)


# -- helpers ---------------------------------------------------------------------------


def _frac(value: int, n: int) -> int:
    """``value`` in [0, SCALE) scaled to [0, n)."""
    return value * n // SCALE


def _indices(bitmap: bytes, want: int, limit: int) -> list[int]:
    """Indices below ``limit`` whose bitmap byte is ``want``."""
    return [i for i in range(min(limit, len(bitmap))) if bitmap[i] == want]


def _usable_blocks(model: DeviceModel) -> int:
    return model.usable_region_size // model.block_size


def _usable_end(model: DeviceModel) -> int:
    return model.addr + model.usable_region_size


def _room(model: DeviceModel) -> int:
    """Blocks a PLUG may still add before ``plugged_size`` passes ``requested_size``."""
    return model.requested_size // model.block_size - model.plugged_size // model.block_size


def _request(action: Action, req_type: int, addr: int, nb_blocks: int) -> Step:
    """A request step; ``addr`` wraps at 2**64 and ``nb_blocks`` is clamped to a le16
    (spec 5.15.6): the wire cannot carry anything else."""
    nb = max(0, min(nb_blocks, spec.MAX_BLOCKS_PER_REQUEST))
    return Step("request", req_type, addr % TOP, nb, kind=action.kind.value)


# -- kinds with numbers of their own -----------------------------------------------


def _any(action: Action, model: DeviceModel) -> Step:
    return _request(action, action.req_type, action.a, action.b)


def _short(action: Action, model: DeviceModel) -> Step:
    return Step(
        "malformed", action.req_type, model.addr, 1, length=action.a, kind=action.kind.value
    )


def _unknown_type(action: Action, model: DeviceModel) -> Step:
    return Step("malformed", action.req_type, model.addr, 1, kind=action.kind.value)


def _unplug_all(action: Action, model: DeviceModel) -> Step:
    return Step("request", UNPLUG_ALL, kind=action.kind.value)


def _resize(action: Action, model: DeviceModel) -> Step:
    """A new ``requested_size`` from 0 to the whole region, in blocks."""
    size = _frac(action.a, model.nr_blocks + 1) * model.block_size
    return Step("resize", size=size, kind=action.kind.value)


# -- kinds against the model's bitmap ------------------------------------------------


def _run_of(req_type: int, plugged: bool) -> Resolver:
    """A resolver for a run of blocks that are all plugged (or all free): the
    request is valid, and its answer depends on the device's bookkeeping only."""
    want = int(plugged)

    def resolve_run(action: Action, model: DeviceModel) -> Step:
        usable = _usable_blocks(model)
        bitmap = model.bitmap()
        candidates = _indices(bitmap, want, usable)
        if not candidates:
            return _request(action, req_type, model.addr, 1)
        first = candidates[_frac(action.a, len(candidates))]
        # A PLUG stays within requested_size (NACK is plug_beyond_requested's job).
        longest = max(1, _room(model)) if req_type == PLUG else usable
        target = 1 + _frac(action.b, longest)
        nb = 1
        while nb < target and first + nb < usable and bitmap[first + nb] == want:
            nb += 1
        return _request(action, req_type, model.addr + first * model.block_size, nb)

    return resolve_run


def _state_around(action: Action, model: DeviceModel) -> Step:
    """A plugged block and its neighbours: often MIXED (spec 5.15.6.6)."""
    plugged = _indices(model.bitmap(), 1, _usable_blocks(model))
    first = plugged[_frac(action.a, len(plugged))] if plugged else 0
    first = max(0, first - 1 - action.b % 2)
    return _request(action, STATE, model.addr + first * model.block_size, 2 + action.b % 8)


def _plug_beyond_requested(action: Action, model: DeviceModel) -> Step:
    """More blocks than ``requested_size`` leaves room for: NACK when the range is valid."""
    first = _frac(action.a, max(_usable_blocks(model), 1))
    nb = max(0, _room(model)) + 1 + action.b % 16
    return _request(action, PLUG, model.addr + first * model.block_size, nb)


# -- range kinds: the drawn request type over a range of a given shape ---------------


def _first(action: Action, model: DeviceModel) -> int:
    """A block index inside the usable region (0 when it is empty)."""
    return _frac(action.a, max(_usable_blocks(model), 1))


def _valid(action: Action, model: DeviceModel) -> Step:
    first = _first(action, model)
    room = max(1, min(_usable_blocks(model) - first, spec.MAX_BLOCKS_PER_REQUEST))
    nb = 1 + _frac(action.b, room)
    return _request(action, action.req_type, model.addr + first * model.block_size, nb)


def _misaligned(action: Action, model: DeviceModel) -> Step:
    bs = model.block_size
    offset = (action.b * 4096) % bs or bs // 2
    addr = model.addr + _first(action, model) * bs + offset
    return _request(action, action.req_type, addr, 1 + action.b % 4)


def _zero(action: Action, model: DeviceModel) -> Step:
    addr = model.addr + _first(action, model) * model.block_size
    return _request(action, action.req_type, addr, 0)


def _overflow(action: Action, model: DeviceModel) -> Step:
    """A range whose end passes 2**64 (an overflow QEMU's range check catches)."""
    k = action.a % 4 + 1
    return _request(action, action.req_type, TOP - k * model.block_size, k - 1 + action.b % 4)


def _below(action: Action, model: DeviceModel) -> Step:
    addr = model.addr - (action.a % 4 + 1) * model.block_size
    return _request(action, action.req_type, addr, 1 + action.b % 4)


def _at_usable_end(action: Action, model: DeviceModel) -> Step:
    addr = _usable_end(model) + (action.a % 3) * model.block_size
    return _request(action, action.req_type, addr, 1 + action.b % 4)


def _straddle(action: Action, model: DeviceModel) -> Step:
    """A range across the end of the usable region."""
    k = action.a % 4 + 1
    addr = _usable_end(model) - k * model.block_size
    return _request(action, action.req_type, addr, k + 1 + action.b % 4)


def _beyond_region(action: Action, model: DeviceModel) -> Step:
    addr = model.addr + model.region_size + (action.a % 3) * model.block_size
    return _request(action, action.req_type, addr, 1 + action.b % 4)


#: The one resolver of every kind (tests/unit check that none is missing).
RESOLVERS: dict[Kind, Resolver] = {
    Kind.ANY: _any,
    Kind.SHORT: _short,
    Kind.UNKNOWN_TYPE: _unknown_type,
    Kind.UNPLUG_ALL: _unplug_all,
    Kind.RESIZE: _resize,
    Kind.STATE_PLUGGED: _run_of(STATE, plugged=True),
    Kind.PLUG_FREE: _run_of(PLUG, plugged=False),
    Kind.UNPLUG_PLUGGED: _run_of(UNPLUG, plugged=True),
    Kind.STATE_AROUND: _state_around,
    Kind.PLUG_BEYOND_REQUESTED: _plug_beyond_requested,
    Kind.VALID: _valid,
    Kind.MISALIGNED: _misaligned,
    Kind.ZERO: _zero,
    Kind.OVERFLOW: _overflow,
    Kind.BELOW: _below,
    Kind.AT_USABLE_END: _at_usable_end,
    Kind.STRADDLE: _straddle,
    Kind.BEYOND_REGION: _beyond_region,
}
