"""What a comparison finds: :class:`Difference`, :class:`TraceEntry`, and the two
ways an example fails, :class:`Mismatch` and :class:`DeviceLost`.

Both failures derive from :class:`~vmem_guest.errors.VmemError` (the one
exception root) and carry structured fields for ``--json``; the trace itself
stays on the exception as objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vmem_guest.conformance.steps import Step
from vmem_guest.errors import VmemError

if TYPE_CHECKING:
    from vmem_guest.conformance.oracle import Violation


@dataclasses.dataclass(frozen=True)
class Difference:
    """One thing the device and the model disagree on: ``what`` (``response``,
    ``config.<field>``, ``model``) and each side's value, as text."""

    what: str
    device: str
    model: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TraceEntry:
    """A step as it ran: what each side answered (``-`` or ``not sent`` for none)."""

    step: Step
    device: str
    model: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step.as_dict(),
            "text": self.step.describe(),
            "device": self.device,
            "model": self.model,
        }


def _last_step(trace: Sequence[TraceEntry]) -> str:
    return trace[-1].step.describe() if trace else "the start of an example"


class Mismatch(VmemError):
    """The device under test and the model disagree after the last step of ``trace``.

    Attributes: ``trace`` (the sequence up to the difference), ``differences``,
    ``violations`` (the spec rules the device broke at the last step, which
    classify the mismatch: :mod:`~vmem_guest.conformance.classify`),
    ``start_config`` (the device's config when the example started, set by the
    checker). In ``fields``: ``after`` (the last step, as text), ``differences``
    (as dicts).
    """

    def __init__(
        self,
        trace: Sequence[TraceEntry],
        differences: Sequence[Difference],
        violations: Sequence[Violation] = (),
    ) -> None:
        last = _last_step(trace)
        what = "; ".join(f"{d.what}: device {d.device}, model {d.model}" for d in differences)
        super().__init__(
            f"after {last}: {what}",
            after=last,
            differences=[d.as_dict() for d in differences],
        )
        self.trace = list(trace)
        self.differences = list(differences)
        self.violations = list(violations)
        self.start_config: dict[str, int] = {}


class DeviceLost(VmemError):
    """The device under test stopped answering (timeout, broken queue, failed resize).

    The run stops there: no shrinking, which would keep sending requests to a
    device that cannot answer (:mod:`~vmem_guest.conformance.run` carries it
    through hypothesis). Attributes: ``trace`` (the sequence that lost it),
    ``reason``. In ``fields``: ``reason``, ``after`` (the last step, as text).
    """

    def __init__(self, trace: Sequence[TraceEntry], reason: str) -> None:
        super().__init__(reason, reason=reason, after=_last_step(trace))
        self.trace = list(trace)
        self.reason = reason
