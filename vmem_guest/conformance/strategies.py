"""The hypothesis strategies: one :class:`Action`, and a sequence of them.

Every kind is drawn with the weight :data:`WEIGHTS` gives it; hypothesis
shrinks towards the first kind of the table and towards small numbers, so a
shrunk sequence is short and plain.
"""

from __future__ import annotations

from hypothesis import strategies as st

from vmem_guest import spec
from vmem_guest.conformance.kinds import RANGE_KINDS, RANGE_TYPES, SCALE, Action, Kind
from vmem_guest.conformance.steps import TOP, UNPLUG_ALL

#: How often each kind is drawn, in drawing order (the first is where shrinking goes).
#: ``resize`` is drawn only when the device under test can be resized.
WEIGHTS: dict[Kind, int] = {
    Kind.STATE_PLUGGED: 2,
    Kind.PLUG_FREE: 5,
    Kind.UNPLUG_PLUGGED: 4,
    Kind.PLUG_BEYOND_REQUESTED: 1,
    Kind.UNPLUG_ALL: 1,
    Kind.ANY: 2,
    Kind.SHORT: 1,
    Kind.UNKNOWN_TYPE: 1,
    Kind.STATE_AROUND: 2,
    **{kind: 2 if kind is Kind.VALID else 1 for kind in RANGE_KINDS},
    Kind.RESIZE: 3,
}


def _fraction() -> st.SearchStrategy[int]:
    return st.integers(0, SCALE - 1)


def _params(kind: Kind) -> st.SearchStrategy[Action]:
    """The numbers ``kind`` draws: its own for the kinds of the first group of
    :class:`Kind`, else a request type of RANGE_TYPES and two fractions."""
    fraction = _fraction()
    if kind is Kind.ANY:
        address = st.integers(0, TOP - 1)
        count = st.integers(0, spec.MAX_BLOCKS_PER_REQUEST)
        return st.builds(Action, st.just(kind), st.integers(0, 3), address, count)
    if kind is Kind.SHORT:  # a request shorter than its 24 bytes
        length = st.integers(0, spec.VirtioMemReq.SPEC_SIZE - 1)
        return st.builds(Action, st.just(kind), st.integers(0, 3), length)
    if kind is Kind.UNKNOWN_TYPE:  # le16 types above STATE
        return st.builds(Action, st.just(kind), st.integers(4, 0xFFFF))
    if kind is Kind.UNPLUG_ALL:
        return st.just(Action(kind, UNPLUG_ALL))
    if kind is Kind.RESIZE:
        return st.builds(Action, st.just(kind), st.just(0), fraction)
    return st.builds(Action, st.just(kind), st.sampled_from(RANGE_TYPES), fraction, fraction)


def drawn_kinds(resizable: bool) -> list[Kind]:
    """What a kind is drawn from: each kind as often as its weight, in table order."""
    return [
        kind
        for kind, weight in WEIGHTS.items()
        if resizable or kind is not Kind.RESIZE
        for _ in range(weight)
    ]


def action_strategy(resizable: bool) -> st.SearchStrategy[Action]:
    """One generated step; resizes only when the device under test can be resized."""
    params = {kind: _params(kind) for kind in WEIGHTS}
    return st.sampled_from(drawn_kinds(resizable)).flatmap(params.__getitem__)


def sequence_strategy(max_steps: int, resizable: bool) -> st.SearchStrategy[list[Action]]:
    """A sequence of 1 to ``max_steps`` actions, its length uniform (``st.lists``
    alone averages about 6 steps); it shrinks to short ones."""
    steps = action_strategy(resizable)
    return st.integers(1, max_steps).flatmap(lambda n: st.lists(steps, min_size=n, max_size=n))
