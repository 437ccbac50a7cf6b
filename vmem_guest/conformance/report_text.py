"""A conformance run's report as text: what ``vmem-guest fuzz`` prints, and what the
conformance image (``vmm_image``) writes to its console."""

from __future__ import annotations

from typing import Any

from vmem_guest import render
from vmem_guest.conformance.classify import report_lines
from vmem_guest.units import format_size

__all__ = ["fuzz_report_text"]


def fuzz_report_text(report: dict[str, Any]) -> str:
    """The text ``vmem-guest fuzz`` prints for ``report`` (``FuzzResult.as_dict``):
    the run's figures, the device's answers, the shrunk mismatch if any, then the
    findings by class (:func:`~vmem_guest.conformance.classify.report_lines`)."""
    geometry = report["geometry"]
    rows = [
        ("device", report["device"]),
        ("profile", report["profile"]),
        ("block size", format_size(geometry["block_size"])),
        ("requested", format_size(geometry["requested_size"])),
        ("seed", report["seed"]),
        ("examples", report["examples"]),
        ("requests compared", report["requests_compared"]),
        ("model-only requests", report["model_only_requests"]),
        ("host resizes", report["resizes"]),
        ("mismatches", report["mismatches"]),
    ]
    lines = [render.table(("", "value"), rows), "", "device answers:"]
    lines += [f"  {name:<24} {count}" for name, count in report["answers"].items()]
    if report["feature_differences"]:
        lines += ["", "OFFERED FEATURES DIFFER FROM THE PROFILE:"]
        lines += [f"  {text}" for text in report["feature_differences"]]
    failure = report["mismatch"]
    if failure:
        if "device_lost" in failure:
            lines += ["", f"DEVICE LOST: {failure['device_lost']}"]
        else:
            lines += ["", f"MISMATCH (shrunk; {failure['class']}):"]
            lines += [
                f"  {d['what']}: device {d['device']}, model {d['model']}"
                for d in failure["differences"]
            ]
            lines += [f"  rule broken: {rule}" for rule in failure["rules"]]
            if failure["profile_source"]:
                lines.append(f"  profile source: {failure['profile_source']}")
        lines.append("  sequence (device answer | model answer):")
        lines += [
            f"  {i:3}. {e['text']}  ->  {e['device']} | {e['model']}"
            for i, e in enumerate(failure["sequence"], 1)
        ]
        if report["saved"]:
            lines.append(f"  saved to {report['saved']}")
    lines += report_lines(report)
    return "\n".join(lines)
