"""make pressure's pieces that need no VM: the workloads' options, the targets each
driver can reach, and the clocks (time to the in-kernel driver's bytes, the agent's
waits in its log, the printed ratios)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import pressure  # noqa: E402
from vmharness import MiB  # noqa: E402
from vmharness import pressure_timing as timing  # noqa: E402


def test_the_movable_workload_pins_nothing_and_ends_off_the_block_grid() -> None:
    p, _ = pressure.parse_args(["--workload", "movable"])
    assert (p.workload, p.pin_stride, p.shrink_to) == ("movable", 0, 1000 * MiB)
    assert p.shrink_to % (128 * MiB) != 0
    # An option given on the command line wins over the workload's.
    p, _ = pressure.parse_args(["--workload", "movable", "--shrink-to", "512M"])
    assert p.shrink_to == 512 * MiB
    p, _ = pressure.parse_args([])
    assert (p.workload, p.pin_stride, p.shrink_to) == ("pinned", 1 * MiB, 0)


def test_each_driver_reaches_its_own_target() -> None:
    block = 2 * MiB
    assert pressure.reachable("kernel", 1000 * MiB, block, growing=False) == 1000 * MiB
    assert pressure.reachable("vmem_guest", 1000 * MiB, block, growing=False) == 1000 * MiB
    # Whole memory blocks: the block above a shrink's request, below a growth's.
    assert pressure.reachable("vmem_guest_whole", 1000 * MiB, block, growing=False) == 1024 * MiB
    assert pressure.reachable("vmem_guest", 4160 * MiB, block, growing=True) == 4096 * MiB
    assert pressure.reachable("vmem_guest_whole", 0, block, growing=False) == 0


def test_first_reach_is_the_first_sample_with_that_much_gone() -> None:
    samples = [(0.0, 2048 * MiB), (0.5, 1600 * MiB), (1.0, 1024 * MiB), (1.5, 900 * MiB)]
    assert timing.first_reach(samples, 2048 * MiB, 1024 * MiB) == 1.0
    assert timing.first_reach(samples, 2048 * MiB, 400 * MiB) == 0.5
    assert timing.first_reach(samples, 2048 * MiB, 2000 * MiB) is None


LOG = """\
2026-12-07 20:10:00,100 DEBUG vmem_guest.tracker.drv: before the stop
2026-12-07 20:10:05,200 INFO vmem_guest.driver.0000:00:03.0: offline memory9 failed: EBUSY; later
2026-12-07 20:10:05,300 DEBUG vmem_guest.tracker.drv: taking addr=0x1 nb_blocks=1
2026-12-07 20:10:25,300 INFO vmem_guest.driver.0000:00:03.0: MemAvailable rose: refusals end early
not a log line
2026-12-07 20:10:25,800 INFO vmem_guest.resizes: converged
2026-12-07 20:11:00,000 INFO vmem_guest.driver.0000:00:03.0: after QEMU got there
"""


def test_the_agents_waits_are_the_gaps_in_its_log_after_the_stop() -> None:
    waits = timing.agent_waits(LOG, "2026-12-07 20:10:05,000", 21.0)
    assert waits["lines"] == 4
    # Stop -> first line 0.2 s (work); 5.3 -> 25.3: a 20 s wait, ended by the relief.
    assert waits["waits"] == [
        {
            "seconds": 20.0,
            "at_s": 0.3,
            "then": "vmem_guest.driver.0000:00:03.0: MemAvailable rose: refusals end early",
        }
    ]
    assert waits["waited_s"] == 20.0


def test_the_agents_log_window_covers_the_stop_and_the_wait_for_qemu() -> None:
    # The stop took 10 s and QEMU got there 16 s after it: the 20 s wait that began
    # 0.3 s after the stop and the line that ended it lie inside the window; with
    # qemu_s alone (16 s) the window would end before that line and show no wait.
    ended = {"guest_stop": "2026-12-07 20:10:05,000", "qemu_s": 16.0, "stop_s": 10.0}
    assert timing.since_stop(ended) == 26.0
    waits = timing.agent_waits(LOG, ended["guest_stop"], timing.since_stop(ended))
    assert [w["seconds"] for w in waits["waits"]] == [20.0]
    assert timing.agent_waits(LOG, ended["guest_stop"], ended["qemu_s"])["waits"] == []


def test_since_stop_is_none_when_qemu_never_got_there() -> None:
    assert timing.since_stop({"qemu_s": None, "stop_s": 3.0}) is None
    # A result written before stop_s was recorded: qemu_s alone.
    assert timing.since_stop({"qemu_s": 4.5}) == 4.5


def run(samples: list[tuple[float, int]], unplugged: int, ended: float | None) -> dict[str, Any]:
    return {
        "before": {"qemu_size": 2048 * MiB},
        "after": {"samples": samples, "unplugged": unplugged, "last_change_s": samples[-1][0]},
        "ended": {"qemu_s": ended, "timeout": 300.0},
    }


def test_the_timing_lines_put_each_agent_against_the_kernel() -> None:
    kernel = run([(0.0, 2048 * MiB), (6.0, 514 * MiB)], 1534 * MiB, 40.0)
    agent = run([(0.0, 2048 * MiB), (9.0, 514 * MiB)], 1534 * MiB, 20.0)
    agent["agent_waits"] = {"waited_s": 1.5, "waits": [{}]}
    agent["ended"]["stop_s"] = 2.5
    whole = run([(0.0, 2048 * MiB), (3.0, 640 * MiB)], 1408 * MiB, None)
    result = {
        "params": {"sample_every": 0.25},
        "drivers": {"kernel": kernel, "vmem_guest": agent, "vmem_guest_whole": whole},
    }
    lines = timing.timing_lines(result)
    assert lines[0] == "time to the in-kernel driver's unplugged 1534 MiB (QMP every 0.25 s):"
    assert "6.0 s" in lines[1] and lines[1].endswith("ratio 1.00")
    assert "9.0 s" in lines[2] and lines[2].endswith("ratio 1.50")
    assert "never" in lines[3] and lines[3].endswith("ratio n/a")
    assert lines[5].split()[1:4] == ["40.0", "s", "ratio"]
    assert "ratio 0.50 (+ 2.5 s stopping it); the agent waited 1.5 s of it (1 gaps" in lines[6]
    assert "not within 300 s" in lines[7]
    assert agent["after"]["reach_kernel_s"] == pytest.approx(9.0)


# --- reading the agent frozen -------------------------------------------------------


class FrozenVM:
    """The guest as agent_snapshot sees it: shell lines recorded, QEMU's size and
    MemTotal fixed, status read through the guest runner's ``call`` op in this process
    from ``state_dir``."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.lines: list[str] = []

    def sh(self, line: str) -> str:
        self.lines.append(line)
        return ""

    def runner_request(self, request: dict[str, Any]) -> dict[str, Any]:
        from vmharness import guest_runner

        return guest_runner.handle({**request, "args": [str(self.state_dir)]})

    def meminfo(self) -> dict[str, int]:
        return {"MemTotal": 3 << 30}

    def plugged(self, device: str) -> int:
        return 128 * MiB


def mid_write_tracker(state_dir: Path) -> Path:
    """A real owner's state file, left as a SIGSTOP inside a write section leaves it."""
    from vmem_guest.blocks import Geometry
    from vmem_guest.tracker import Tracker, TrackerIdentity
    from vmem_guest.tracker.layout import GENERATION, GENERATION_OFFSET

    geometry = Geometry(
        addr=4 << 30, region_size=1 << 30, block_size=2 * MiB, memory_block_size=128 * MiB
    )
    with Tracker.open(state_dir, TrackerIdentity("0000:00:04.0", geometry)) as tracker:
        path = tracker.path
    data = bytearray(path.read_bytes())
    generation = GENERATION.unpack_from(data, GENERATION_OFFSET)[0]
    GENERATION.pack_into(data, GENERATION_OFFSET, generation | 1)
    path.write_bytes(bytes(data))
    return path


def test_a_state_file_inside_a_write_reads_as_mid_write(tmp_path: Path) -> None:
    """The reader's own error, through the runner, is told apart from other failures."""
    from vmharness.guest_agent import StateMidWrite, status_document

    mid_write_tracker(tmp_path)
    with pytest.raises(StateMidWrite, match="no stable snapshot"):
        status_document(FrozenVM(tmp_path))  # type: ignore[arg-type]


def test_a_freeze_inside_a_state_write_is_thawed_and_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI saw the agent stopped inside a write of its state file: every read of that
    freeze fails. The snapshot thaws it and freezes it again; each STOP has its CONT."""
    from vmharness.guest_agent import StateMidWrite

    view = {"intent": None, "online_size": 128 * MiB}
    answers: list[dict[str, Any] | None] = [None, None, view]

    def agent_view(vm: object) -> dict[str, Any]:
        answer = answers.pop(0)
        if answer is None:
            raise StateMidWrite("vmem-guest status --json: TrackerError: no stable snapshot")
        return answer

    monkeypatch.setattr(pressure, "agent_view", agent_view)
    monkeypatch.setattr(pressure, "region_online", lambda vm: [33])
    vm = FrozenVM(tmp_path)
    got, check, online = pressure.agent_snapshot(vm)  # type: ignore[arg-type]
    assert (got, online, check["frozen_tries"]) == (view, [33], 3)
    assert check["qemu_size"] == 128 * MiB
    stops = [line for line in vm.lines if "kill -STOP" in line]
    conts = [line for line in vm.lines if "kill -CONT" in line]
    assert len(stops) == len(conts) == 3
    answers[:] = [None] * 3
    with pytest.raises(AssertionError, match="inside a state write 3 times"):
        pressure.agent_snapshot(vm, tries=3)  # type: ignore[arg-type]
