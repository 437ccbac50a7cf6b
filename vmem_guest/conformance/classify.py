"""The three classes of a finding, :func:`classify`, and their part of the report.

* **violates a MUST**: the spec oracle found a MUST rule broken
  (:class:`~vmem_guest.conformance.oracle.Violation`, or a model mismatch at a
  step where one was);
* **departs from a SHOULD**: likewise for a SHOULD rule;
* **differs from the profile only**: the device and the profile's model
  disagree, and no rule was broken at that step (a
  :class:`~vmem_guest.conformance.findings.Mismatch` the oracle has nothing to
  say about), or the device offers features the profile does not.

A finding names its rule (section and sentence) or the profile's source: the
model method that gave the answer, which names the QEMU function it restates.
"""

from __future__ import annotations

import enum
from typing import Any

from vmem_guest.conformance.findings import Mismatch
from vmem_guest.conformance.oracle import Violation
from vmem_guest.conformance.rules import RULES, Level
from vmem_guest.spec import RequestType


class FindingClass(enum.StrEnum):
    """How bad a finding is, most severe first."""

    MUST = "violates a MUST"
    SHOULD = "departs from a SHOULD"
    PROFILE = "differs from the profile only"


_SEVERITY = list(FindingClass)
_TABLE_ORDER = {rule.id: index for index, rule in enumerate(RULES)}


def classify(finding: Violation | Mismatch) -> FindingClass:
    """The class of a rule violation or of a model mismatch (see the module docstring)."""
    if isinstance(finding, Violation):
        return FindingClass.MUST if finding.rule.level is Level.MUST else FindingClass.SHOULD
    if finding.violations:
        return min((classify(v) for v in finding.violations), key=_SEVERITY.index)
    return FindingClass.PROFILE


#: Which model method gives the answer a profile-only difference is about: the
#: model restates QEMU's hw/virtio/virtio-mem.c, one method per QEMU function.
_MODEL = "vmem_guest/sim/device_model.py:DeviceModel"
_MODEL_SOURCES = {
    RequestType.PLUG: f"{_MODEL}._state_change_request (QEMU virtio_mem_state_change_request)",
    RequestType.UNPLUG: f"{_MODEL}._state_change_request (QEMU virtio_mem_state_change_request)",
    RequestType.UNPLUG_ALL: f"{_MODEL}._unplug_all_request (QEMU virtio_mem_unplug_all_request)",
    RequestType.STATE: f"{_MODEL}._state_request (QEMU virtio_mem_state_request)",
}
_RESIZE_SOURCE = f"{_MODEL}.resize (QEMU virtio_mem_set_requested_size)"
_START_SOURCE = "vmem_guest/conformance/checker.py:Checker.new_model (the model's start)"


def profile_source(profile: str, mismatch: Mismatch) -> str:
    """Where profile ``profile``'s model takes the answer ``mismatch`` is about."""
    if not mismatch.trace:
        return f"{profile}: {_START_SOURCE}"
    step = mismatch.trace[-1].step
    if step.op == "resize":
        return f"{profile}: {_RESIZE_SOURCE}"
    try:
        source = _MODEL_SOURCES[RequestType(step.req_type)]
    except ValueError:
        source = f"{_MODEL}.submit (QEMU virtio_mem_handle_request: virtio_error)"
    return f"{profile}: {source}"


def violation_order(violation: Violation) -> tuple[int, int]:
    """MUST before SHOULD, then in the order of the rule table."""
    return (_SEVERITY.index(classify(violation)), _TABLE_ORDER[violation.rule.id])


def class_counts(
    violations: list[Violation], mismatch: Mismatch | None, feature_differences: list[str]
) -> dict[str, int]:
    """Findings per class: one per rule broken, the mismatch when no rule explains it,
    one per offered feature the profile does not expect."""
    counts = {str(c): 0 for c in FindingClass}
    for violation in violations:
        counts[classify(violation)] += 1
    if mismatch is not None and classify(mismatch) is FindingClass.PROFILE:
        counts[FindingClass.PROFILE] += 1
    counts[FindingClass.PROFILE] += len(feature_differences)
    return counts


def mismatch_class(profile: str, mismatch: Mismatch) -> dict[str, Any]:
    """The report's words on a mismatch's class: the class, and the rules broken at its
    last step or the profile's source."""
    found = classify(mismatch)
    if found is FindingClass.PROFILE:
        source = profile_source(profile, mismatch)
        return {"class": str(found), "rules": [], "profile_source": source}
    rules = list(dict.fromkeys(f"{v.rule.section} {v.rule.id}" for v in mismatch.violations))
    return {"class": str(found), "rules": rules, "profile_source": None}


def report_lines(report: dict[str, Any]) -> list[str]:
    """The text report's part on classes and rule findings (``vmem-guest fuzz``)."""
    oracle = report["oracle"]
    generation = "yes" if oracle["config_generation_checked"] else "no (channel cannot tell)"
    lines = [
        "",
        f"spec oracle: {oracle['rules_checked']} rules, {oracle['exchanges']} requests and"
        f" {oracle['config_reads']} config reads checked; config_generation checked: {generation}",
        "findings by class:",
    ]
    classes = report["classes"]
    lines += [f"  {name:<30} {classes.get(str(name), 0)}" for name in FindingClass]
    for finding in report["spec_findings"]:
        level = finding["level"]
        lines += [
            "",
            f"{level} {finding['section']} {finding['title']} [{finding['rule']}]"
            f" ({finding['occurrences']} times)",
            f'  "{finding["sentence"]}"',
            f"  seen: {finding['detail']}",
            "  shortest sequence (device answer | model answer):",
        ]
        lines += [
            f"  {i:3}. {e['text']}  ->  {e['device']} | {e['model']}"
            for i, e in enumerate(finding["sequence"], 1)
        ]
    return lines
