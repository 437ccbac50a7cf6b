"""The files in contrib/ agree with the code: the unit runs ``run`` with the options
file, does not restart on the CLI's usage status, the options file names options
``run`` has, the udev rule matches the IDs the agent looks for; and systemd, where
systemd-analyze exists, finds nothing wrong with the unit."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vmem_guest import cli
from vmem_guest.spec import PCI_DEVICE_ID, PCI_VENDOR_ID

CONTRIB = Path(__file__).resolve().parents[2] / "contrib"
UNIT = CONTRIB / "vmem-guest.service"


def settings(text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file (values of a repeated key in order)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_the_unit_runs_the_agent_with_the_options_file() -> None:
    unit = settings(UNIT.read_text())
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["EnvironmentFile"] == ["-/etc/default/vmem-guest"]
    assert unit["ExecStart"] == ["/opt/vmem-guest/bin/vmem-guest run $VMEM_GUEST_OPTS"]
    assert unit["RestartPreventExitStatus"] == [str(cli.EXIT_USAGE)]
    assert unit["Restart"] == ["on-failure"]
    assert unit["RuntimeDirectory"] == ["vmem-guest"]
    assert Path("/run") / unit["RuntimeDirectory"][0] == cli.DEFAULT_STATE_DIR


def test_the_options_file_names_options_run_has() -> None:
    text = (CONTRIB / "vmem-guest.default").read_text()
    assert settings(text)["VMEM_GUEST_OPTS"] == ['""']
    named = set(re.findall(r"(--[a-z][a-z-]+)", text))
    run_options = {opt for param in cli.run.params for opt in param.opts + param.secondary_opts}
    run_options |= set(cli.cli.context_settings["help_option_names"])  # click's own
    assert named - run_options == set()
    assert {"--noiommu", "--online-policy", "--device"} <= named


def test_the_udev_rule_matches_the_ids_the_agent_serves() -> None:
    rules = [
        line
        for line in (CONTRIB / "70-vmem-guest.rules").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules == [
        f'SUBSYSTEM=="pci", ATTR{{vendor}}=="{PCI_VENDOR_ID:#06x}",'
        f' ATTR{{device}}=="{PCI_DEVICE_ID:#06x}", TAG+="systemd",'
        ' ENV{SYSTEMD_WANTS}+="vmem-guest.service"'
    ]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_finds_nothing_wrong_with_the_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` of the unit with an ExecStart that exists here (the
    agent is not installed in /opt on a build host) and no man page lookup."""
    copy = tmp_path / UNIT.name
    copy.write_text(UNIT.read_text().replace("/opt/vmem-guest/bin/vmem-guest", sys.executable))
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_no_ctypes_callback_for_memory_deny_write_execute() -> None:
    """The unit's MemoryDenyWriteExecute=yes holds while the agent creates no ctypes
    callback (for a callback's trampoline libffi may map memory both writable and
    executable; calls into C need none): a callback type in the package would risk it."""
    assert "MemoryDenyWriteExecute=yes" in UNIT.read_text().splitlines()
    package = Path(cli.__file__).resolve().parent
    users = [
        str(path.relative_to(package))
        for path in sorted(package.rglob("*.py"))
        if re.search(r"\b(CFUNCTYPE|PYFUNCTYPE|WINFUNCTYPE)\b", path.read_text())
    ]
    assert users == []


HIBERNATE_UNIT = CONTRIB / "vmem-guest-hibernate@.service"


def test_the_hibernate_unit_runs_before_and_is_required_by_the_sleep_service() -> None:
    """Before= and RequiredBy= the same systemd-%i.service: its failure stops the
    hibernation; the command's options exist and its timeout ends before systemd's."""
    unit = settings(HIBERNATE_UNIT.read_text())
    assert unit["Type"] == ["oneshot"]
    assert unit["Before"] == unit["RequiredBy"] == ["systemd-%i.service"]
    (exec_start,) = unit["ExecStart"]
    program, command, *args = exec_start.split()
    assert (program, command) == ("/opt/vmem-guest/bin/vmem-guest", "hibernate-prepare")
    options = dict(zip(args[::2], args[1::2], strict=True))
    assert options["--sleep"] == "%i"
    known = {opt for param in cli.hibernate_prepare.params for opt in param.opts}
    assert set(options) <= known
    assert int(options["--timeout"]) < int(unit["TimeoutStartSec"][0])


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_finds_nothing_wrong_with_the_hibernate_unit(tmp_path: Path) -> None:
    """``systemd-analyze verify`` of the hibernate instance, as for the agent's unit (given
    as a path beside the template: a bare name would be looked up and checked nowhere)."""
    (tmp_path / HIBERNATE_UNIT.name).write_text(
        HIBERNATE_UNIT.read_text().replace("/opt/vmem-guest/bin/vmem-guest", sys.executable)
    )
    instance = tmp_path / "vmem-guest-hibernate@hibernate.service"
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(instance)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
