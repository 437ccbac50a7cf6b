"""Hibernation (vmem_guest/hibernate.py): every device's memory given back on request,
the devices held empty until the resume, grown again after it; a refusal leaves the
memory where it was; suspend-then-hibernate and a missing agent are refused."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_agent import ADDR, GIB, MIB, Rig, wait_for
from test_agent_resume import FakeLogind, Suspender, run_suspending
from test_cli import run_main

from vmem_guest import control, hibernate
from vmem_guest.control import AgentError
from vmem_guest.errors import HibernationRefused
from vmem_guest.hotplug import KernelBlockState
from vmem_guest.spec import Feature

PERSISTENT = 1 << Feature.PERSISTENT_SUSPEND
MEMORY_BLOCK = 128 * MIB


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    made.channel.features = PERSISTENT
    yield made
    made.attached.close()


@pytest.fixture
def suspender() -> Iterator[Suspender]:
    made = Suspender()
    yield made
    made.watch.close()


def online_blocks(rig: Rig) -> list[int]:
    return sorted(
        index
        for index, block in rig.kernel.blocks.items()
        if block.state is KernelBlockState.ONLINE
    )


def assert_online_memory_is_plugged(rig: Rig) -> None:
    """The rule a hibernation must keep: STATE PLUGGED under every online block."""
    per_block = MEMORY_BLOCK // rig.model.block_size
    first_block = ADDR // MEMORY_BLOCK
    for index in online_blocks(rig):
        first_sb = (index - first_block) * per_block
        unplugged = [
            sb for sb in range(first_sb, first_sb + per_block) if not rig.model.is_plugged(sb)
        ]
        assert not unplugged, f"memory{index} is online over unplugged device blocks {unplugged}"


def ask(rig: Rig, seconds: float = 30.0) -> dict[str, Any] | None:
    return control.call(rig.socket, control.Hibernate(seconds))


def test_memory_is_given_back_held_through_the_hibernation_and_grown_after_the_resume(
    rig: Rig, suspender: Suspender, caplog: pytest.LogCaptureFixture
) -> None:
    seen: dict[str, Any] = {}

    def host() -> None:
        rig.channel.host_resize(512 * MIB)
        wait_for(lambda: rig.online_bytes() == 512 * MIB)
        seen["answer"] = ask(rig)
        seen["after"] = (rig.model.plugged_size, online_blocks(rig))
        seen["ping"] = control.call(rig.socket, control.Ping())
        # The host asks for more while the guest hibernates: nothing is plugged before
        # the resume (the image must not hold device memory).
        rig.channel.host_resize(1 * GIB)
        wait_for(lambda: "config changed" in caplog.text)
        seen["held"] = rig.model.plugged_size
        # The resume: QEMU started again, every block unplugged, the transport reset.
        suspender.suspend_and_wake(rig.channel, keeps_blocks=False, seconds=120.0)
        wait_for(lambda: rig.online_bytes() == 1 * GIB)
        assert_online_memory_is_plugged(rig)

    with caplog.at_level(logging.INFO):
        run_suspending(rig, suspender, FakeLogind(), host)
    assert seen["answer"]["given_back"] == {rig.attached.bdf: 512 * MIB}
    assert seen["after"] == (0, [])
    assert seen["ping"]["hibernation"] == "memory given back: devices held empty until the resume"
    assert seen["held"] == 0
    assert rig.model.plugged_size == 1 * GIB
    assert "hibernation hold ended (the guest resumed)" in caplog.text
    assert rig.driver.broken_reason is None


def test_a_refused_offline_refuses_the_hibernation_and_keeps_the_memory_in_use(
    rig: Rig, suspender: Suspender, caplog: pytest.LogCaptureFixture
) -> None:
    seen: dict[str, Any] = {}

    def host() -> None:
        rig.channel.host_resize(512 * MIB)
        wait_for(lambda: rig.online_bytes() == 512 * MIB)
        seen["busy"] = online_blocks(rig)[0]  # the lowest: offlined last, after the others
        rig.kernel.refuse_offline = {seen["busy"]}
        with pytest.raises(AgentError) as refused:
            ask(rig)
        seen["error"] = refused.value
        seen["after"] = (rig.model.plugged_size, len(online_blocks(rig)))
        assert_online_memory_is_plugged(rig)
        # Not held: the agent follows the host again at once.
        rig.kernel.refuse_offline = set()
        rig.channel.host_resize(768 * MIB)
        wait_for(lambda: rig.online_bytes() == 768 * MIB)

    with caplog.at_level(logging.INFO):
        run_suspending(rig, suspender, FakeLogind(), host)
    busy = seen["busy"]
    assert seen["error"].message.startswith(
        f"{rig.attached.bdf}: offline memory{busy} failed: EBUSY"
    )
    assert seen["error"].fields == {"device": rig.attached.bdf, "cause": "OfflineRefused"}
    assert seen["after"] == (512 * MIB, 4)  # all or nothing: offlined blocks onlined again
    assert "hibernation refused" in caplog.text


def test_a_manual_agent_with_memory_plugged_refuses(tmp_path: Path) -> None:
    from test_agent import run_agent

    made = Rig(tmp_path)
    seen: dict[str, Any] = {}

    def host() -> None:
        made.channel.host_resize(256 * MIB)
        control.call(made.socket, control.Plug(None, control.Extent(size=256 * MIB)))
        with pytest.raises(AgentError) as refused:
            ask(made)
        seen["message"] = refused.value.message

    try:
        run_agent(made, host, manual=True)
    finally:
        made.attached.close()
    assert "--manual mode with memory plugged" in seen["message"]
    assert made.model.plugged_size == 256 * MIB


class StubDriver:
    """A device that empties in one call (the time it takes is the clock's)."""

    def __init__(self, plugged: int, taken: int = 0) -> None:
        self.plugged = plugged
        self.taken = taken
        self.emptied = False

    @property
    def tracker(self) -> Any:
        fields = {"plugged_bytes": self.plugged, "taken_subblocks": self.taken}
        state = type("State", (), fields)()
        return type("Tracker", (), {"state": state})()

    def unplug_everything(self, sleep: Callable[[float], None]) -> None:
        self.emptied = True


def test_running_out_of_time_refuses_before_the_next_device() -> None:
    times = iter([0.0, 0.0, 75.0])
    first, second = StubDriver(GIB), StubDriver(GIB)
    with pytest.raises(HibernationRefused, match="took over 60 s"):
        hibernate.give_back_all(
            {"a": first, "b": second},  # type: ignore[dict-item]
            broken={},
            seconds=60.0,
            clock=lambda: next(times),
        )
    assert first.emptied and not second.emptied


def test_a_broken_device_holding_memory_refuses() -> None:
    driver = StubDriver(GIB)
    with pytest.raises(HibernationRefused, match="device a is broken"):
        hibernate.give_back_all(
            {},
            broken={"a": "memory lost in suspend"},
            seconds=60.0,
        )
    assert not driver.emptied


def test_holes_in_online_blocks_refuse_before_any_device_is_touched() -> None:
    whole, holed = StubDriver(GIB), StubDriver(GIB, taken=3)
    with pytest.raises(HibernationRefused, match="b: 3 subblocks of online blocks are taken"):
        hibernate.give_back_all(
            {"a": whole, "b": holed},  # type: ignore[dict-item]
            broken={},
            seconds=60.0,
        )
    assert not whole.emptied and not holed.emptied


def test_the_hold_ends_by_itself_when_no_hibernation_comes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    hold = hibernate.Hold(lambda: now[0])
    assert hold.seconds_left() is None
    hold.start()
    assert hold.seconds_left() == hibernate.HOLD_SECONDS
    now[0] += hibernate.HOLD_SECONDS
    with caplog.at_level(logging.WARNING):
        assert hold.seconds_left() is None
    assert "no hibernation came within 300 s" in caplog.text
    hold.start()
    hold.end("the guest resumed")
    assert hold.seconds_left() is None


def test_suspend_then_hibernate_is_refused_outright(tmp_path: Path) -> None:
    with pytest.raises(HibernationRefused, match="suspend-then-hibernate is refused"):
        hibernate.prepare("suspend-then-hibernate", tmp_path)


def test_the_command_refuses_when_no_agent_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(["hibernate-prepare", "--state-dir", str(tmp_path)], capsys)
    assert code == 1 and out == ""
    assert err.startswith("vmem-guest: error: no agent runs (nothing listens at")
    assert len(err.splitlines()) == 1


def test_the_request_round_trips() -> None:
    message = control.message_of(control.Hibernate(60.0))
    assert message == {"op": "hibernate", "seconds": 60}
    assert control.operation_of(message) == control.Hibernate(60.0)
    with pytest.raises(control.UsageError, match="seconds"):
        control.operation_of({"op": "hibernate"})
