"""The agent against a device that lies or breaks the ring (vmem_guest.sim.hostile).

Each misbehaviour is tried twice: from the first config read (the device must
be refused at attach, before any request, tracker or probe) and in the middle
of a grow (the agent must mark the device broken with a reason that names the
fault, stop sending requests, and never have onlined memory it was not ACKed).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from test_agent import run_while, wait_for
from test_cli import run_main

from vmem_guest import bootmem, planner
from vmem_guest.agent import Agent
from vmem_guest.attach import Attached, attach_channel
from vmem_guest.driver import Outcome
from vmem_guest.errors import ConfigError, ResponseError
from vmem_guest.sim.device_model import DeviceModel
from vmem_guest.sim.faults import Fault
from vmem_guest.sim.hostile import HostileChannel
from vmem_guest.sim.kernel import FakeKernelMemory
from vmem_guest.tracker import TrackerReader

MIB = 1 << 20
GIB = 1 << 30
MEMORY_BLOCK = 128 * MIB
ADDR = 4 * GIB
BOOT_MEMORY = 1 * GIB
BDF = "0000:00:03.0"

#: What the refusal or the broken reason must say, per fault.
REASONS: dict[Fault, str] = {
    Fault.BLOCK_SIZE_ZERO: r"block_size 0x0 is not a power of two",
    Fault.BLOCK_SIZE_NOT_POW2: r"block_size 0x600000 is not a power of two",
    Fault.SIZE_NOT_MULTIPLE: r"requested_size 0x[0-9a-f]+ is not a multiple of block_size",
    Fault.REGION_OVERFLOW: r"overflows the address space",
    Fault.REGION_OVERLAPS_BOOT: r"overlaps boot memory|region changed under the driver",
    Fault.USABLE_SHRINKS: r"(plugged|requested)_size exceeds usable_region_size"
    r"|shrank below plugged blocks",
    Fault.UNKNOWN_RESPONSE: r"unknown response type 7",
    Fault.UNKNOWN_STATE: r"unknown block state 9",
    Fault.ERROR_ANSWER: r"answered ERROR",
    Fault.WRONG_USED_ID: r"used id 7, expected 0",
    Fault.WRONG_USED_LEN: r"used len 4, expected 10",
    Fault.NEVER_ANSWERS: r"no answer within|timed out",
}


class HostileRig:
    """A kernel with 1 GiB of boot memory and a 2 GiB device at 4 GiB behind a HostileChannel."""

    def __init__(self, tmp: Path, fault: Fault, honest_requests: int) -> None:
        self.kernel = FakeKernelMemory(MEMORY_BLOCK)
        self.kernel.add_boot_memory(0, BOOT_MEMORY)
        self.model = DeviceModel(addr=ADDR, region_size=2 * GIB, block_size=2 * MIB)
        self.channel = HostileChannel(
            self.model, fault, honest_requests=honest_requests, boot_memory_addr=0
        )
        self.state_dir = tmp / "state"
        self.boot_record = tmp / "boot-memory"

    def attach(self) -> Attached:
        return attach_channel(
            BDF,
            self.channel,
            state_dir=self.state_dir,
            kernel=self.kernel,
            policy=planner.DEFAULT_POLICY,
            boot_record=self.boot_record,
        )

    def unacked_online(self) -> list[int]:
        return self.channel.unacked_online(self.kernel)


#: USABLE_SHRINKS needs plugged memory to shrink below: it is tried mid-run only.
AT_ATTACH = [f for f in Fault if f.in_config and f is not Fault.USABLE_SHRINKS]


@pytest.mark.parametrize("fault", AT_ATTACH, ids=lambda f: f.value)
def test_a_lying_config_is_refused_at_attach_before_anything_is_done(
    tmp_path: Path, fault: Fault
) -> None:
    rig = HostileRig(tmp_path, fault, honest_requests=0)
    with pytest.raises(ConfigError, match=REASONS[fault]):
        rig.attach()
    assert rig.model.requests == 0
    assert rig.kernel.probes == []
    assert not rig.state_dir.exists() or not list(rig.state_dir.glob("*.state"))
    assert rig.channel.interrupt_fd() == -1  # the channel was closed


def test_the_boot_memory_record_is_taken_once_per_boot(tmp_path: Path) -> None:
    rig = HostileRig(tmp_path, Fault.REGION_OVERLAPS_BOOT, honest_requests=1 << 30)
    attached = rig.attach()
    attached.close()
    first = bootmem.BootMemory.from_json(rig.boot_record.read_text())
    assert first.ranges == ((0, BOOT_MEMORY),)
    # Memory added later in the same boot is not boot memory...
    rig.kernel.probe(ADDR)
    assert bootmem.load_or_record(rig.kernel, rig.boot_record) == first
    # ...but after a reboot the record is taken again.
    rig.kernel.reboot()
    again = bootmem.load_or_record(rig.kernel, rig.boot_record)
    assert again.boot_id != first.boot_id and again.ranges == ((0, BOOT_MEMORY),)


def run_agent_until_broken(rig: HostileRig, attached: Attached) -> tuple[str, int, int]:
    """Grow to 512 MiB, then 1 GiB; return (reason, requests when broken, requests at the end).

    Each grow is one PLUG (the planner plugs a whole run at once): with one honest
    request, a response or ring fault hits the second PLUG, and a config fault
    starts, with a config interrupt, right after the first.
    """
    seen: dict[str, int] = {}
    path = attached.tracker.path

    def broken() -> bool:
        with TrackerReader.open(path) as reader:
            return reader.snapshot().broken

    def grown_or_broken() -> bool:
        with TrackerReader.open(path) as reader:
            snap = reader.snapshot()
        return snap.broken or snap.online_bytes == 512 * MIB

    def host() -> None:
        rig.channel.host_resize(512 * MIB)
        wait_for(grown_or_broken)
        rig.channel.host_resize(1 * GIB)
        wait_for(broken)
        seen["at_broken"] = rig.model.requests
        rig.channel.host_resize(512 * MIB)  # a config interrupt it must not act on
        time.sleep(0.3)
        seen["at_end"] = rig.model.requests

    agent = Agent([attached], None)
    run_while(agent, host)
    (slot,) = agent.slots.values()
    assert slot.broken is not None
    return slot.broken, seen["at_broken"], seen["at_end"]


#: UNKNOWN_STATE only bites where STATE is asked: at start, with memory plugged.
MID_GROW = [f for f in Fault if f is not Fault.UNKNOWN_STATE]


@pytest.mark.parametrize("fault", MID_GROW, ids=lambda f: f.value)
def test_a_device_that_turns_hostile_mid_grow_is_no_longer_touched(
    tmp_path: Path, fault: Fault
) -> None:
    rig = HostileRig(tmp_path, fault, honest_requests=1)
    attached = rig.attach()
    try:
        reason, at_broken, at_end = run_agent_until_broken(rig, attached)
    finally:
        attached.close()
    assert re.search(REASONS[fault], reason), reason
    assert at_end == at_broken, "requests after the device was marked broken"
    assert rig.unacked_online() == []
    # It did grow honestly first, so the check above is about real online memory.
    assert rig.channel.acked_plugged


def test_the_broken_reason_reaches_the_tracker(tmp_path: Path) -> None:
    rig = HostileRig(tmp_path, Fault.UNKNOWN_RESPONSE, honest_requests=1)
    attached = rig.attach()
    try:
        run_agent_until_broken(rig, attached)
        with TrackerReader.open(attached.tracker.path) as reader:
            snap = reader.snapshot()
    finally:
        attached.close()
    assert snap.broken and "unknown response type" in snap.broken_reason


def test_a_state_answer_that_does_not_exist_is_refused_at_restart(tmp_path: Path) -> None:
    rig = HostileRig(tmp_path, Fault.UNKNOWN_STATE, honest_requests=1 << 30)
    attached = rig.attach()
    try:
        rig.channel.host_resize(512 * MIB)
        attached.driver.config_changed()
        while attached.driver.step().outcome is Outcome.PROGRESS:
            pass
    finally:
        attached.close()  # the agent stops; memory stays plugged and online
    assert rig.model.plugged_size == 512 * MIB
    # Restarted, the agent rebuilds its state with STATE requests: the device lies.
    acked = rig.channel.acked_plugged
    rig.channel = HostileChannel(rig.model, Fault.UNKNOWN_STATE)
    rig.channel.acked_plugged = acked
    with pytest.raises(ResponseError, match=REASONS[Fault.UNKNOWN_STATE]):
        rig.attach()
    assert rig.unacked_online() == []


# --- the same through ``vmem-guest sim --misbehave`` --------------------------------


def run_sim(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return run_main(["sim", *args], capsys)


def test_sim_reports_the_step_at_which_the_device_was_dropped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_sim(
        capsys, "--resize", "512M,1G,0", "--misbehave", "wrong-used-len",
        "--honest-requests", "1", "--json",
    )  # fmt: skip
    reports = [json.loads(line) for line in out.splitlines()]
    assert code == 1
    assert [r["broken"] for r in reports] == [False, True]  # no step 3: it stopped
    assert reports[0]["converged"] and reports[0]["plugged"] == 512 * MIB
    assert reports[1]["error"] == "used len 4, expected 10"
    assert err == "vmem-guest: error: device broken at step 2: used len 4, expected 10\n"


def test_sim_refuses_a_region_over_boot_memory_in_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_sim(capsys, "--resize", "1G", "--misbehave", "region-overlaps-boot")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "overlaps boot memory 0x0-0x40000000" in err


def test_sim_without_a_fault_is_unchanged(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_sim(capsys, "--resize", "1G,1000M", "--json")
    reports = [json.loads(line) for line in out.splitlines()]
    assert (code, err) == (0, "")
    assert [r["plugged"] for r in reports] == [1 * GIB, 1000 * MIB]
    assert [r["error"] for r in reports] == ["", ""]
