"""online_path: the agent holds auto_online_blocks at its policy's type while serving,
gives the original back (after a SIGKILL too), and names each device's path."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vmem_guest import planner, render
from vmem_guest.blocks import Zone
from vmem_guest.online_path import auto_online_while_serving, auto_online_word, describe
from vmem_guest.sim.runner import SimOptions, Simulation

MIB = 1 << 20
GIB = 1 << 30
MOVABLE = planner.Policy(online=planner.OnlinePolicy.MOVABLE)
KERNEL = planner.Policy(online=planner.OnlinePolicy.KERNEL)
AUTO = planner.Policy(online=planner.OnlinePolicy.AUTO)


@pytest.fixture
def setting(tmp_path: Path) -> Path:
    path = tmp_path / "sys/devices/system/memory/auto_online_blocks"
    path.parent.mkdir(parents=True)
    path.write_text("offline\n")
    return path


@pytest.mark.parametrize(
    ("policy", "word"),
    [(MOVABLE, "online_movable"), (KERNEL, "online_kernel"), (AUTO, "online_movable")],
)
def test_held_at_the_policy_type_then_given_back(
    tmp_path: Path, setting: Path, policy: planner.Policy, word: str
) -> None:
    assert auto_online_word(policy) == word
    with auto_online_while_serving(policy, tmp_path / "state", setting) as applied:
        assert applied
        assert setting.read_text().strip() == word
    assert setting.read_text().strip() == "offline"


def test_a_kernel_without_the_file_is_served_without_it(tmp_path: Path) -> None:
    absent = tmp_path / "sys/devices/system/memory/auto_online_blocks"
    with auto_online_while_serving(MOVABLE, tmp_path / "state", absent) as applied:
        assert not applied
    assert not absent.exists()


def test_after_a_sigkill_the_next_agent_gives_the_original_back(
    tmp_path: Path, setting: Path
) -> None:
    state = tmp_path / "state"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from vmem_guest import planner, render
        from vmem_guest.online_path import auto_online_while_serving
        with auto_online_while_serving(planner.Policy(), Path({str(state)!r}),
                                       Path({str(setting)!r})):
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    child = subprocess.run([sys.executable, "-c", script], cwd=Path.cwd(), check=False)
    assert child.returncode == -signal.SIGKILL
    assert setting.read_text().strip() == "online_movable"  # the killed agent's value
    with auto_online_while_serving(MOVABLE, state, setting) as applied:
        assert applied and setting.read_text().strip() == "online_movable"
    assert setting.read_text().strip() == "offline"


@pytest.mark.parametrize(
    ("auto_online", "planned", "expected"),
    [
        ("offline", Zone.MOVABLE, "probe then online (online_movable): two writes per block"),
        (
            "online_movable",
            Zone.MOVABLE,
            "auto-online online_movable via probe: one write per block",
        ),
        ("online_kernel", Zone.KERNEL, "auto-online online_kernel via probe: one write per block"),
        (
            "online_kernel",
            Zone.MOVABLE,
            "probe auto-onlines (online_kernel), then offline and online (online_movable):"
            " three writes per block",
        ),
        (
            "online",
            Zone.MOVABLE,
            "probe auto-onlines (online) into the kernel's zone; a block not in MOVABLE is"
            " offlined and onlined (online_movable) again",
        ),
    ],
)
def test_describe_names_the_writes_per_block(
    auto_online: str, planned: Zone, expected: str
) -> None:
    assert describe(auto_online, planned) == expected


def test_the_driver_logs_its_path_at_start_and_when_it_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vmem_guest.driver")
    with Simulation(SimOptions(region_size=1 * GIB, block_size=2 * MIB), tmp_path) as sim:
        started = describe("offline", Zone.MOVABLE)
        assert sim.driver.online_path == started
        assert [
            r.getMessage() for r in caplog.records if "new memory blocks" in r.getMessage()
        ] == [f"new memory blocks: {started} (auto_online_blocks offline)"]
        sim.kernel.auto_online = "online_movable"  # set at run time, as the agent does
        report = sim.resize(512 * MIB)
        assert report.converged and report.online == 512 * MIB
        fast = describe("online_movable", Zone.MOVABLE)
        assert sim.driver.online_path == fast
        logged = [r.getMessage() for r in caplog.records if "new memory blocks" in r.getMessage()]
        assert logged[-1] == f"new memory blocks: {fast} (auto_online_blocks online_movable)"
        assert len(logged) == 2  # once per change, not once per PLUG


def test_status_shows_the_agents_path(tmp_path: Path) -> None:
    with Simulation(SimOptions(region_size=1 * GIB, block_size=2 * MIB), tmp_path) as sim:
        snap = sim.tracker.snapshot()
        path = sim.driver.online_path
        assert f"  new memory blocks: {path}" in render.snapshot_text(snap, None, path).splitlines()
        assert "new memory blocks" not in render.snapshot_text(snap)
        assert render.snapshot_dict(snap, path)["online_path"] == path
        assert render.snapshot_dict(snap)["online_path"] is None
