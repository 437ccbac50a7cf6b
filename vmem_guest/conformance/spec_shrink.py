"""Shortening the sequence of a rule the device broke while matching its profile.

Hypothesis shrinks what fails the run: a mismatch with the profile's model. A
rule the profile's model breaks too (QEMU's model restates QEMU, departures
included) fails nothing, so the oracle keeps the shortest sequence the run
happened to show (:class:`~vmem_guest.conformance.oracle.SpecFindings`), and
:func:`shrink_violations` then shortens it: it replays the sequence on the
device with one step left out at a time, from a clean device, and keeps every
shorter sequence that still breaks the rule (one greedy pass, bounded by
``max_replays`` per rule). Replays are the same concrete requests the run sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from vmem_guest.conformance.checker import Checker
from vmem_guest.conformance.findings import Mismatch, TraceEntry
from vmem_guest.conformance.steps import Step

#: Replays per rule at most (each: a clean-up, then up to the sequence's length in steps).
MAX_REPLAYS = 60
#: Steps that are not part of an example's sequence (the checker adds them).
_NOT_DRAWN = ("cleanup",)


def shrink_violations(checker: Checker, max_replays: int = MAX_REPLAYS) -> None:
    """Shorten the kept sequence of every rule broken (see the module docstring).

    DeviceLost propagates: nothing more is sent to a device that stopped answering.
    """
    for violation in checker.spec.violations():
        steps = _steps(violation.trace)
        if len(steps) > 1:
            _shrink(checker, violation.rule.id, steps, max_replays)


def _steps(trace: Sequence[TraceEntry]) -> list[Step]:
    return [entry.step for entry in trace if entry.step.kind not in _NOT_DRAWN]


def _shrink(checker: Checker, rule_id: str, steps: list[Step], max_replays: int) -> None:
    index, replays = 0, 0
    while index < len(steps) and replays < max_replays:
        candidate = steps[:index] + steps[index + 1 :]
        replays += 1
        if candidate and _breaks(checker, rule_id, candidate):
            steps = candidate
        else:
            index += 1


def _breaks(checker: Checker, rule_id: str, steps: Sequence[Step]) -> bool:
    """Whether ``steps``, from a clean device, break rule ``rule_id``; the oracle's
    findings are kept as in the run (the shortest sequence wins), their count is not."""
    counted = checker.spec.occurrences.copy()
    trace: list[TraceEntry] = []
    try:
        checker.clean()
        model = checker.new_model()
        for step in steps:
            if step.op == "resize" and checker.resize is None:
                return False
            try:
                checker.run_step(step, model, trace)
            except Mismatch as exc:
                return any(v.rule.id == rule_id for v in exc.violations)
            if any(v.rule.id == rule_id for v in checker.last_found):
                return True
        return False
    finally:
        checker.example_trace = trace
        checker.clean()
        checker.spec.occurrences = counted
