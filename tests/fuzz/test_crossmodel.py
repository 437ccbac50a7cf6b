"""Model against model: qemu-10.0's model finds every rule in which another profile's
device differs (docs/device-profiles.md), shrunk and attributed, and nothing else.

The examples a round follow the hypothesis profile (tests/fuzz/settings.py): few in
``ci``, more in ``deep``.
"""

from __future__ import annotations

import os

import pytest

from vmem_guest.conformance.crossmodel import cross_fuzz, report_text
from vmem_guest.sim.profiles import PROFILES, QEMU_10_0

from .settings import DEFAULT_PROFILE, PROFILE_ENV

EXAMPLES = {"ci": 25, "deep": 300}


@pytest.mark.parametrize("device", [name for name in PROFILES if name != "qemu-10.0"])
def test_qemu_model_finds_every_difference_of(device: str) -> None:
    examples = EXAMPLES[os.environ.get(PROFILE_ENV, DEFAULT_PROFILE)]
    report = cross_fuzz(QEMU_10_0, PROFILES[device], examples=examples, seed=1)
    assert report.ok, report_text(report)
    assert sorted(report.found) == sorted(report.expected)
    for finding in report.findings:
        assert finding.sequence or finding.differences, finding
        assert finding.source != "(same as QEMU's)", finding
