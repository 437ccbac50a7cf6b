"""The ways a hostile device misbehaves (see :mod:`vmem_guest.sim.hostile`).

Kept apart from the channel so the CLI can list them without importing the
simulator.
"""

from __future__ import annotations

import enum


class Fault(enum.Enum):
    """One way to misbehave (the value is its name on a command line)."""

    # The config space (spec 5.15.4).
    BLOCK_SIZE_ZERO = "block-size-zero"
    BLOCK_SIZE_NOT_POW2 = "block-size-not-pow2"
    SIZE_NOT_MULTIPLE = "size-not-multiple"  # requested_size not a multiple of block_size
    REGION_OVERFLOW = "region-overflow"  # addr + region_size beyond 2**64
    REGION_OVERLAPS_BOOT = "region-overlaps-boot"  # addr moved onto boot memory
    USABLE_SHRINKS = "usable-shrinks"  # usable_region_size drops below plugged memory
    # The responses (spec 5.15.6).
    UNKNOWN_RESPONSE = "unknown-response"  # a response type that does not exist
    UNKNOWN_STATE = "unknown-state"  # an ACKed STATE with a state that does not exist
    ERROR_ANSWER = "error-answer"  # ERROR to a valid request
    # The used ring (spec 2.7.8).
    WRONG_USED_ID = "wrong-used-id"
    WRONG_USED_LEN = "wrong-used-len"
    NEVER_ANSWERS = "never-answers"

    @property
    def in_config(self) -> bool:
        return self in _CONFIG_FAULTS


_CONFIG_FAULTS = frozenset(
    {
        Fault.BLOCK_SIZE_ZERO,
        Fault.BLOCK_SIZE_NOT_POW2,
        Fault.SIZE_NOT_MULTIPLE,
        Fault.REGION_OVERFLOW,
        Fault.REGION_OVERLAPS_BOOT,
        Fault.USABLE_SHRINKS,
    }
)
