"""A failure kept as a regression example: written as JSON, read back, replayed."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from vmem_guest.conformance.checker import Checker, Resize
from vmem_guest.conformance.findings import TraceEntry
from vmem_guest.conformance.result import FuzzResult
from vmem_guest.conformance.steps import Step
from vmem_guest.device import RequestChannel
from vmem_guest.sim.device_model import USABLE_EXTENT_X86


def save_example(result: FuzzResult, save_dir: Path) -> Path:
    """Write the report as ``mismatch-<time>-<seed>.json`` (replay with :func:`replay`)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = save_dir / f"mismatch-{stamp}-{result.seed}.json"
    path.write_text(json.dumps(result.as_dict(), indent=2, sort_keys=True) + "\n")
    return path


def load_steps(path: Path) -> list[Step]:
    """The request sequence of a file written by :func:`save_example`."""
    data = json.loads(path.read_text())
    failure = data.get("mismatch") or {}
    return [Step.from_dict(entry["step"]) for entry in failure.get("sequence", [])]


def replay(
    device: RequestChannel,
    steps: Sequence[Step],
    *,
    resize: Resize | None = None,
    usable_margin: int = USABLE_EXTENT_X86,
) -> list[TraceEntry]:
    """Run a saved sequence of concrete steps once, from a clean device and a fresh
    model; raise Mismatch as :func:`~vmem_guest.conformance.run.fuzz` finds it."""
    checker = Checker(device, resize=resize, usable_margin=usable_margin)
    checker.clean()
    trace: list[TraceEntry] = []
    try:
        model = checker.new_model()
        for step in steps:
            checker.run_step(step, model, trace)
    finally:
        checker.clean()
    return trace
