"""The device model's switches: where virtio-mem implementations answer differently.

:class:`~vmem_guest.sim.device_model.DeviceModel` follows QEMU
(``hw/virtio/virtio-mem.c``) unless a :class:`ModelRules` says otherwise. Each
field is one behaviour a driver can see through requests and config reads; its
default is QEMU's. Which implementation sets which value, and the source line
it comes from, is in :mod:`vmem_guest.sim.profiles` (``DeviceProfile.sources``)
and in docs/device-profiles.md. Behaviours a driver cannot see through requests
(offered features, accepted block sizes, activation) are profile data, not rules.

The fields are independent switches, so that a difference between two profiles
can be adopted one field at a time (:mod:`vmem_guest.conformance.crossmodel`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from vmem_guest.spec import RequestType, ResponseType

#: How the usable region follows ``requested_size`` (on creation and on a resize):
#: ``extent``: QEMU, requested + a fixed extent (256 MiB on x86), aligned up, grows
#: only; ``region``: always the whole region; ``slot``: ``requested_size`` rounded
#: up to the slot size whenever it is smaller than ``requested_size``.
UsablePolicy = Literal["extent", "region", "slot"]

#: What an ACKed UNPLUG_ALL leaves as ``usable_region_size``: ``requested``: what the
#: usable policy gives for the current ``requested_size`` (QEMU; the whole region
#: again under the ``region`` policy); ``zero``: 0, whatever ``requested_size`` is.
UnplugAllUsable = Literal["requested", "zero"]

#: What a request the device cannot parse (shorter than 24 bytes, or of an unknown
#: type) leads to: ``virtio_error``: the device marks itself broken and raises
#: DEVICE_NEEDS_RESET (no answer); ``dies``: the request thread ends, no answer and
#: none to any later request until a reset, no notification; ``unanswered``: that
#: request is never answered, later ones are; ``empty``: used with length 0 (no
#: response bytes); ``error``: answered ERROR.
Malformed = Literal["virtio_error", "dies", "unanswered", "empty", "error"]

#: Requests QEMU can answer BUSY (a migration runs, a discard or preallocation failed).
ALL_BUSY = frozenset({int(RequestType.PLUG), int(RequestType.UNPLUG), int(RequestType.UNPLUG_ALL)})

#: 2**16: ``nb_blocks`` is a le16; counts truncated to 16 bits wrap at this.
U16_WRAP = 1 << 16


@dataclasses.dataclass(frozen=True)
class ModelRules:
    """One implementation's answers where implementations differ (defaults: QEMU)."""

    #: The answer to a PLUG that would take ``plugged_size`` past ``requested_size``.
    plug_beyond_requested: ResponseType = ResponseType.NACK
    #: That check comes before the range checks (a misaligned or out-of-range PLUG
    #: beyond ``requested_size`` is then NACKed instead of ERROR).
    requested_check_first: bool = False
    #: A PLUG of 0 blocks is NACKed (before any other check) instead of ERROR.
    empty_plug_nack: bool = False
    #: An UNPLUG that would take ``plugged_size`` below ``requested_size``, or of 0
    #: blocks, is NACKed before any other check.
    unplug_nack_below_requested: bool = False
    #: How the usable region follows ``requested_size`` (:data:`UsablePolicy`).
    usable_policy: UsablePolicy = "extent"
    #: The slot size of the ``slot`` policy, in bytes.
    slot_size: int = 128 << 20
    #: ``usable_region_size`` after an ACKed UNPLUG_ALL (:data:`UnplugAllUsable`).
    unplug_all_usable: UnplugAllUsable = "requested"
    #: UNPLUG_ALL clears only the first ``nr_blocks mod 2**16`` blocks of the bitmap
    #: (the whole count cast to 16 bits) and still sets ``plugged_size`` to 0.
    unplug_all_count_u16: bool = False
    #: UNPLUG_ALL unplugs run by run, lowest first, through the UNPLUG checks (so it
    #: answers what an UNPLUG would, NACK included), at most 65,535 blocks at a time.
    unplug_all_by_runs: bool = False
    #: With ``unplug_all_by_runs``: each run's whole length is cast to 16 bits; a run
    #: whose length wraps to 0 ends UNPLUG_ALL with ACK, the run left plugged.
    unplug_all_run_u16: bool = False
    #: Requests that can answer BUSY at all (``busy_next`` / ``busy_rate`` apply to
    #: these only); empty: the device never answers BUSY.
    busy_requests: frozenset[int] = ALL_BUSY
    #: BUSY can apply to an UNPLUG_ALL with nothing plugged (QEMU up to 8.0).
    busy_unplug_all_when_empty: bool = True
    #: A request shorter than 24 bytes (:data:`Malformed`).
    short_request: Malformed = "virtio_error"
    #: A request of a type above STATE (:data:`Malformed`).
    unknown_request: Malformed = "virtio_error"
    #: A device reset forgets which blocks are plugged (the bitmap starts empty
    #: again) while ``plugged_size`` keeps its value.
    reset_forgets_blocks: bool = False
    #: The host's resize to the current ``requested_size`` is refused (no config
    #: interrupt) instead of accepted and notified.
    resize_same_refused: bool = False

    def differences(self, other: ModelRules) -> list[str]:
        """Names of the fields whose values differ from ``other``'s, in field order."""
        return [
            field.name
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(other, field.name)
        ]


QEMU_RULES = ModelRules()
