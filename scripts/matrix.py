#!/usr/bin/env python3
"""``make test-matrix``: the agent VM tests, ``make conformance`` and ``make chaos N=20`` on
every pair of QEMU {system (7.2), 10.0} x guest Linux {6.1, 6.12}, then one table.

Each suite runs as its own process with ``VMEM_GUEST_QEMU_VERSION`` and
``VMEM_GUEST_LINUX`` set to the pair (scripts/vmharness/host.py), so it boots exactly
what a user choosing that pair would. The table and every suite's output go to
results/matrix/; the exit status is 0 only when every cell passed.

    scripts/matrix.py [--pairs system:6.1,10.0:6.12] [--suites agent,conformance,chaos]
                      [--examples 500] [--kills 20]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from vmharness import paths  # noqa: E402
from vmharness.host import Pair  # noqa: E402

ALL_PAIRS = (
    Pair("system", "6.1"),
    Pair("system", "6.12"),
    Pair("10.0", "6.1"),
    Pair("10.0", "6.12"),
)
SUITES = ("agent", "conformance", "chaos")


@dataclasses.dataclass
class Cell:
    """One suite on one pair."""

    pair: Pair
    suite: str
    passed: bool
    seconds: float
    log: Path
    detail: str = ""


def suite_argv(suite: str, examples: int, kills: int) -> list[str]:
    """The command of ``suite`` (the same ones ``make`` runs)."""
    python = sys.executable
    if suite == "agent":
        return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/vm/test_agent_vm.py"]
    if suite == "conformance":
        return [python, str(HERE / "conformance.py"), "--examples", str(examples)]
    if suite == "chaos":
        return [python, str(HERE / "chaos.py"), "--kills", str(kills)]
    raise SystemExit(f"matrix: unknown suite {suite!r} (suites: {', '.join(SUITES)})")


def run_cell(pair: Pair, suite: str, argv: list[str], out_dir: Path) -> Cell:
    """Run one suite on one pair, its output in ``out_dir``; never raises for a failure."""
    env = {**os.environ, "VMEM_GUEST_QEMU_VERSION": pair.qemu, "VMEM_GUEST_LINUX": pair.linux}
    # An explicit binary would override the pair: the matrix chooses both itself.
    env.pop("VMEM_GUEST_QEMU", None)
    env.pop("VMEM_GUEST_KERNEL", None)
    log = out_dir / f"{pair.label()}-{suite}.log"
    print(f"matrix: {pair.label()} {suite}: {' '.join(argv[1:])}", flush=True)
    started = time.monotonic()
    with open(log, "w") as out:
        rc = subprocess.run(
            argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        ).returncode
    seconds = time.monotonic() - started
    lines = log.read_text(errors="replace").strip().splitlines()
    cell = Cell(pair, suite, rc == 0, seconds, log, lines[-1][:100] if lines else "")
    print(
        f"matrix: {pair.label()} {suite}: {'passed' if cell.passed else 'FAILED'}"
        f" in {seconds:.0f} s ({cell.detail})",
        flush=True,
    )
    return cell


def table(cells: list[Cell], pairs: list[Pair], suites: list[str]) -> str:
    """The pair x suite table in Markdown."""
    by_key = {(c.pair, c.suite): c for c in cells}
    rows = ["| pair | " + " | ".join(suites) + " |", "|---|" + "---|" * len(suites)]
    for pair in pairs:
        marks = []
        for suite in suites:
            cell = by_key.get((pair, suite))
            marks.append(
                "-"
                if cell is None
                else f"{'passed' if cell.passed else 'FAILED'}, {cell.seconds:.0f} s"
            )
        rows.append(f"| {pair.label()} | " + " | ".join(marks) + " |")
    return "\n".join(rows)


def parse_pairs(text: str) -> list[Pair]:
    pairs = []
    for item in text.split(","):
        qemu, _, linux = item.partition(":")
        if not qemu or not linux:
            raise SystemExit(f"matrix: a pair is QEMU:LINUX (system:6.1, 10.0:6.12), got {item!r}")
        pairs.append(Pair(qemu, linux))
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pairs",
        default=",".join(f"{p.qemu}:{p.linux}" for p in ALL_PAIRS),
        help="QEMU:LINUX pairs, comma-separated (default: all four)",
    )
    parser.add_argument("--suites", default=",".join(SUITES), help="of " + ", ".join(SUITES))
    parser.add_argument("--examples", type=int, default=500, help="conformance examples")
    parser.add_argument("--kills", type=int, default=20, help="chaos kills")
    args = parser.parse_args()
    pairs = parse_pairs(args.pairs)
    suites = [s for s in args.suites.split(",") if s]
    for suite in suites:
        suite_argv(suite, args.examples, args.kills)  # rejects an unknown suite up front
    out_dir = paths.results_dir() / "matrix" / datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir.mkdir(parents=True)
    cells = [
        run_cell(pair, suite, suite_argv(suite, args.examples, args.kills), out_dir)
        for pair in pairs
        for suite in suites
    ]
    text = table(cells, pairs, suites)
    (out_dir / "matrix.md").write_text(text + "\n")
    (out_dir / "matrix.json").write_text(
        json.dumps(
            [
                {
                    "pair": c.pair.label(),
                    "suite": c.suite,
                    "passed": c.passed,
                    "seconds": round(c.seconds, 1),
                    "log": str(c.log),
                    "detail": c.detail,
                }
                for c in cells
            ],
            indent=2,
        )
        + "\n"
    )
    print(f"\n{text}\n\nlogs and the table: {out_dir}")
    return 0 if all(c.passed for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
