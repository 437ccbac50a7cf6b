"""What a short command imports: every guest start of the interpreter pays for it
(under TCG, `import vmem_guest.cli` alone took 6-9 s; docs/startup.md), and `status`
is what people and scripts run in a loop. It must not pull in the agent, the driver
or the transport."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
from vmem_guest import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.startswith("vmem_guest"))))
"""

#: Modules a status read has no use for.
NOT_FOR_STATUS = (
    "vmem_guest.agent",
    "vmem_guest.driver",
    "vmem_guest.service",
    "vmem_guest.inhibit",
    "vmem_guest.transport",
    "vmem_guest.sim.runner",
    "vmem_guest.conformance",
)


def imported_by(args: list[str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True
    )
    modules: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return modules


def test_status_imports_neither_the_agent_nor_the_driver(tmp_path: Path) -> None:
    for args in (["--json"], ["--prometheus"], []):
        modules = imported_by(["status", *args, "--state-dir", str(tmp_path)])
        assert "vmem_guest.status_reads" in modules  # the probe ran the command
        unwanted = [m for m in modules if m.startswith(NOT_FOR_STATUS)]
        assert unwanted == [], (args, unwanted)


def test_the_spelled_out_online_policies_are_the_planners() -> None:
    from vmem_guest import cli, planner

    assert tuple(p.value for p in planner.OnlinePolicy) == cli.ONLINE_POLICIES
    assert cli.ONLINE_POLICIES[0] == planner.Policy().online.value  # the default


def test_status_does_not_import_the_planner(tmp_path: Path) -> None:
    modules = imported_by(["status", "--json", "--state-dir", str(tmp_path)])
    assert "vmem_guest.planner" not in modules
