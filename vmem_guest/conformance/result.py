"""The outcome of a run, :class:`FuzzResult`, and its report (``vmem-guest fuzz --json``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vmem_guest.conformance import classify
from vmem_guest.conformance.checker import Counts
from vmem_guest.conformance.findings import DeviceLost, Mismatch
from vmem_guest.conformance.oracle import Oracle, SpecFindings, Violation
from vmem_guest.conformance.rules import RULES


@dataclasses.dataclass
class FuzzResult:
    """The outcome of :func:`~vmem_guest.conformance.run.fuzz`.

    ``mismatch`` is the shrunk mismatch (``flaky``: it failed once and passed
    on replay, so it is the last failure seen), ``lost`` the sequence that
    lost the device; ``saved`` where the failure was written; ``device`` the
    PCI address when the device under test is one. ``spec`` holds the rules the
    spec oracle found broken (each with its shortest sequence), ``oracle`` what it
    checked; the report sorts every finding into a class
    (:mod:`~vmem_guest.conformance.classify`).
    """

    seed: int
    max_examples: int
    counts: Counts
    geometry: dict[str, int]
    mismatch: Mismatch | None = None
    lost: DeviceLost | None = None
    flaky: bool = False
    saved: Path | None = None
    device: str = ""
    #: The device profile the model followed (``qemu-7.2``, ``qemu-10.0``).
    profile: str = ""
    #: The device's feature word, when known, and what of it the profile did not expect.
    offered_features: int | None = None
    feature_differences: list[str] = dataclasses.field(default_factory=list)
    spec: SpecFindings = dataclasses.field(default_factory=SpecFindings)
    oracle: Oracle = dataclasses.field(default_factory=Oracle)

    def violations(self) -> list[Violation]:
        """The rules broken, MUST first, then in the rule table's order."""
        return sorted(self.spec.violations(), key=classify.violation_order)

    def classes(self) -> dict[str, int]:
        """Findings per class (:func:`~vmem_guest.conformance.classify.class_counts`)."""
        return classify.class_counts(self.violations(), self.mismatch, self.feature_differences)

    @property
    def mismatches(self) -> int:
        """1 when the run failed (a mismatch, a lost device, or offered features the
        profile does not expect), else 0."""
        return int(
            self.mismatch is not None or self.lost is not None or bool(self.feature_differences)
        )

    def _failure(self) -> dict[str, Any] | None:
        """The report's ``mismatch``: the differences and sequence, or None."""
        if self.mismatch is not None:
            return {
                "differences": [d.as_dict() for d in self.mismatch.differences],
                "sequence": [t.as_dict() for t in self.mismatch.trace],
                "start_config": self.mismatch.start_config,
                "flaky": self.flaky,
                **classify.mismatch_class(self.profile, self.mismatch),
            }
        if self.lost is not None:
            return {
                "device_lost": self.lost.reason,
                "sequence": [t.as_dict() for t in self.lost.trace],
            }
        return None

    def as_dict(self) -> dict[str, Any]:
        """The report: what ran, the device's answers by kind, the failure if any."""
        return {
            "device": self.device,
            "profile": self.profile,
            "offered_features": self.offered_features,
            "feature_differences": self.feature_differences,
            "seed": self.seed,
            "max_examples": self.max_examples,
            "examples": self.counts.examples,
            "requests_compared": self.counts.requests_compared,
            "model_only_requests": self.counts.model_only,
            "resizes": self.counts.resizes,
            "cleanup_requests": self.counts.cleanup_requests,
            "answers": dict(sorted(self.counts.answers.items())),
            "mismatches": self.mismatches,
            "mismatch": self._failure(),
            "saved": str(self.saved) if self.saved else None,
            "geometry": self.geometry,
            "classes": self.classes(),
            "spec_findings": [
                {**v.as_dict(), "occurrences": self.spec.occurrences[v.rule.id]}
                for v in self.violations()
            ],
            "oracle": {
                "rules_checked": sum(rule.checked for rule in RULES),
                "exchanges": self.oracle.exchanges,
                "config_reads": self.oracle.config_reads,
                "config_generation_checked": self.oracle.generations > 0,
            },
        }
