"""The agent across a suspend: the resume watch in its selector, each device re-initialised
and judged, and logind's sleep inhibitor held while a suspend would lose memory."""

from __future__ import annotations

import contextlib
import os
import select
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_agent import GIB, MIB, Rig, run_while, wait_for

from vmem_guest import control
from vmem_guest._linux.eventfd import EventFd
from vmem_guest._linux.timerfd import ResumeWatch
from vmem_guest.agent import Agent
from vmem_guest.inhibit import ANSWER_TIMEOUT, Lock, SuspendGuard, start_systemd_inhibit
from vmem_guest.sim.channel import SimChannel
from vmem_guest.spec import Feature

PERSISTENT = 1 << Feature.PERSISTENT_SUSPEND


class EventTimer:
    """A ClockSetTimer stand-in: an eventfd the 'kernel' (the test) signals on a clock set."""

    def __init__(self) -> None:
        self.efd = EventFd()
        self.armed = 0

    def fileno(self) -> int:
        return self.efd.fd

    def arm(self) -> None:
        self.armed += 1

    def was_cancelled(self) -> bool:
        return self.efd.drain() > 0

    def close(self) -> None:
        self.efd.close()


class Suspender:
    """Plays the kernel and QEMU: the guest sleeps, QEMU wakes it, the timerfd is cancelled."""

    def __init__(self) -> None:
        self.timer = EventTimer()
        self.slept = 0.0
        self.watch = ResumeWatch(self.timer, sleep_clock=lambda: self.slept)

    def suspend_and_wake(self, channel: SimChannel, *, keeps_blocks: bool, seconds: float) -> None:
        channel.host_suspend_resume(keeps_blocks=keeps_blocks)
        self.slept += seconds
        self.timer.efd.signal()


class FakeLock:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def release(self) -> None:
        self.log.append("release")


class FakeLogind:
    """Inhibit() of a logind that runs (a lock) or does not (a reason)."""

    def __init__(self, running: bool = True) -> None:
        self.running = running
        self.log: list[str] = []

    def take(self, why: str) -> FakeLock | str:
        self.log.append(f"take: {why}")
        return FakeLock(self.log) if self.running else "Failed to connect to bus"


@pytest.fixture
def rigs(tmp_path: Path) -> Iterator[Callable[[int], Rig]]:
    """Rigs whose channel reports ``features`` as negotiated; closed after the test."""
    made: list[Rig] = []

    def make(features: int) -> Rig:
        rig = Rig(tmp_path)
        rig.channel.features = features
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.attached.close()


def grow(rig: Rig, size: int) -> None:
    """The host asks for ``size``; wait until the agent has it online."""
    rig.channel.host_resize(size)
    wait_for(lambda: rig.online_bytes() == size)


@pytest.fixture
def suspender() -> Iterator[Suspender]:
    made = Suspender()
    yield made
    made.watch.close()


def run_suspending(
    rig: Rig,
    suspender: Suspender,
    logind: FakeLogind,
    script: Callable[[], None],
    answer_timeout: float = ANSWER_TIMEOUT,
) -> Agent:
    """test_agent.run_agent with a resume watch and a suspend guard."""
    uid = os.getuid()

    def server(handler: Any) -> control.ControlServer:
        return control.ControlServer(rig.socket, handler, allowed_uids=frozenset({uid}))

    guard = SuspendGuard(logind.take, answer_timeout=answer_timeout)
    agent = Agent([rig.attached], server, resume_watch=suspender.watch, suspend_guard=guard)
    try:
        run_while(agent, script)
    finally:
        guard.close()
    return agent


def test_qemu_7_2_wake_up_under_online_memory_breaks_the_device_and_says_so(
    rigs: Callable[[int], Rig], suspender: Suspender, caplog: pytest.LogCaptureFixture
) -> None:
    rig = rigs(0)
    logind = FakeLogind()

    def host() -> None:
        grow(rig, 512 * MIB)
        wait_for(lambda: len(logind.log) == 1)  # the lock is taken once memory is plugged
        suspender.suspend_and_wake(rig.channel, keeps_blocks=False, seconds=30.0)
        wait_for(lambda: rig.driver.broken_reason is not None)

    with caplog.at_level("INFO"):
        run_suspending(rig, suspender, logind, host)
    assert rig.channel.reinitializations == 1
    reason = rig.driver.broken_reason or ""
    assert "memory lost in suspend" in reason and "reboot the guest" in reason
    assert "resumed from suspend (slept 30.0 s; transport reset on 0000:00:03.0)" in caplog.text
    assert "suspend blocked: logind sleep inhibitor held" in caplog.text
    assert logind.log[0].startswith("take: virtio-mem memory plugged on 0000:00:03.0")
    assert suspender.timer.armed == 1  # re-armed after the cancellation


def test_qemu_10_wake_up_keeps_the_blocks_and_the_agent_follows_on(
    rigs: Callable[[int], Rig], suspender: Suspender, caplog: pytest.LogCaptureFixture
) -> None:
    rig = rigs(PERSISTENT)
    logind = FakeLogind()
    seen: dict[str, object] = {}

    def host() -> None:
        grow(rig, 512 * MIB)
        suspender.suspend_and_wake(rig.channel, keeps_blocks=True, seconds=5.0)
        wait_for(lambda: rig.channel.reinitializations == 1)
        grow(rig, 1 * GIB)
        seen["ping"] = control.call(rig.socket, control.Ping())

    with caplog.at_level("INFO"):
        run_suspending(rig, suspender, logind, host)
    assert rig.driver.broken_reason is None
    assert rig.model.plugged_size == 1 * GIB
    assert logind.log == []  # PERSISTENT_SUSPEND: no lock needed
    assert "STATE over 1 runs: 256 still PLUGGED, 0 lost" in caplog.text
    assert seen["ping"]["suspend"] == "suspend allowed: nothing plugged would be lost"  # type: ignore[index]


def test_a_clock_set_without_a_suspend_touches_no_device(
    rigs: Callable[[int], Rig], suspender: Suspender, caplog: pytest.LogCaptureFixture
) -> None:
    rig = rigs(0)

    def host() -> None:
        suspender.timer.efd.signal()  # settimeofday: cancelled, nothing slept, no reset
        wait_for(lambda: "clock set, no suspend" in caplog.text)

    with caplog.at_level("INFO"):
        run_suspending(rig, suspender, FakeLogind(), host)
    assert rig.channel.reinitializations == 0


def test_a_short_sleep_is_caught_by_the_reset_transport(
    rigs: Callable[[int], Rig], suspender: Suspender
) -> None:
    rig = rigs(0)

    def host() -> None:
        # The RTC measured 0 s, but QEMU reset the device: still a resume.
        suspender.suspend_and_wake(rig.channel, keeps_blocks=False, seconds=0.0)
        wait_for(lambda: rig.channel.reinitializations == 1)
        grow(rig, 256 * MIB)

    run_suspending(rig, suspender, FakeLogind(), host)
    assert rig.driver.broken_reason is None  # nothing was plugged: nothing lost


def test_guard_takes_once_releases_when_nothing_is_at_risk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logind = FakeLogind()
    guard = SuspendGuard(logind.take)
    with caplog.at_level("INFO"):
        guard.update([])
        assert "suspend allowed: no device without PERSISTENT_SUSPEND" in caplog.text
        guard.update(["a"])
        guard.update(["a"])
        assert guard.description == "suspend blocked: logind sleep inhibitor held"
        guard.update(["a", "b"])  # still held: not taken twice
        guard.update([])
    assert [entry.split(":")[0] for entry in logind.log] == ["take", "release"]
    assert "inhibitor released" in caplog.text


def test_guard_without_logind_warns_once_and_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    logind = FakeLogind(running=False)
    guard = SuspendGuard(logind.take)
    with caplog.at_level("WARNING"):
        guard.update(["a"])
        guard.update([])
        guard.update(["a"])  # tried again, not warned again
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert (
        "no sleep inhibitor (Failed to connect to bus): cannot block suspend" in warnings[0].message
    )
    assert "root can still suspend" in warnings[0].message
    assert len(logind.log) == 2
    assert guard.description.startswith("suspend NOT blocked (Failed to connect to bus)")


def fake_program(tmp_path: Path, body: str) -> tuple[str, ...]:
    path = tmp_path / "systemd-inhibit"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return (str(path),)


def fake_systemd_inhibit(
    tmp_path: Path, *, first: str = "", seen: Path | None = None
) -> tuple[str, ...]:
    """Like the real one: run ``first``, take the lock (here: note each option in
    ``seen``), then run the command."""
    note = f'echo "$a" >> {seen}; ' if seen is not None else ""
    return fake_program(
        tmp_path,
        f'{first}\nfor a; do case "$a" in --*) {note}shift;; *) break;; esac; done\nexec "$@"',
    )


def systemd_inhibit(why: str, program: tuple[str, ...]) -> Lock | str:
    """Start taking the lock with ``program``, as the agent does, and wait for the answer
    (the agent's selector does the waiting)."""
    pending = start_systemd_inhibit(why, program=program, booted=lambda: True)
    if isinstance(pending, str):
        return pending
    select.select([pending.fileno()], [], [], 30)
    return pending.finish()


def test_systemd_inhibit_holds_the_lock_while_its_child_runs(tmp_path: Path) -> None:
    seen = tmp_path / "argv"
    program = fake_systemd_inhibit(tmp_path, seen=seen)
    lock = systemd_inhibit("why not", program)
    assert not isinstance(lock, str)
    assert seen.read_text().split("\n")[:4] == [
        "--what=sleep",
        "--mode=block",
        "--who=vmem-guest",
        "--why=why not",
    ]
    pid = lock.proc.pid  # type: ignore[attr-defined]
    os.kill(pid, 0)  # still holding
    lock.release()
    assert lock.proc.returncode == 0  # type: ignore[attr-defined]  # cat saw the pipe close


def test_systemd_inhibit_reports_why_it_could_not(tmp_path: Path) -> None:
    program = fake_program(tmp_path, 'echo "Failed to connect to bus: No such file" >&2; exit 1')
    reason = systemd_inhibit("x", program)
    assert reason == f"{program[0]} exited 1: Failed to connect to bus: No such file"
    assert systemd_inhibit("x", (str(tmp_path / "absent"),)).endswith(  # type: ignore[union-attr]
        "cannot run: No such file or directory"
    )


class FakePending:
    """A lock being taken: a pipe the test writes the answer into, as logind would."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.read_fd, self.write_fd = os.pipe()

    def fileno(self) -> int:
        return self.read_fd

    def answer(self) -> None:
        os.write(self.write_fd, b"held\n")

    def finish(self) -> FakeLock:
        assert os.read(self.read_fd, 16) == b"held\n"
        self.close()
        return FakeLock(self.log)

    def cancel(self) -> None:
        self.log.append("cancel")
        self.close()

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


class SlowLogind(FakeLogind):
    """Inhibit() whose answer comes when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[FakePending] = []

    def take(self, why: str) -> FakePending:  # type: ignore[override]
        self.log.append(f"take: {why}")
        self.pending.append(FakePending(self.log))
        return self.pending[-1]


def test_guard_waits_for_the_answer_without_blocking_and_cancels_what_is_not_needed() -> None:
    logind = SlowLogind()
    guard = SuspendGuard(logind.take)
    guard.update(["a"])
    assert guard.lock is None and guard.fileno() == logind.pending[0].read_fd
    assert guard.description.startswith("suspend block being taken")
    logind.pending[0].answer()
    guard.on_readable()
    assert guard.fileno() is None
    assert guard.description == "suspend blocked: logind sleep inhibitor held"
    guard.update([])
    guard.update(["b"])  # taken again ...
    guard.update([])  # ... and no longer needed before its answer
    assert guard.lock is None and guard.fileno() is None
    assert [entry.split(":")[0] for entry in logind.log] == ["take", "release", "take", "cancel"]


def test_a_lock_logind_never_answers_is_given_up_on_and_retried_on_a_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logind = SlowLogind()
    now = [100.0]
    guard = SuspendGuard(logind.take, clock=lambda: now[0], answer_timeout=10.0)
    guard.update(["a"])
    assert guard.seconds_left() == 10.0
    now[0] += 4.0
    guard.update(["a"])
    assert guard.fileno() == logind.pending[0].read_fd and guard.seconds_left() == 6.0
    now[0] += 6.0
    with caplog.at_level("WARNING"):
        guard.update(["a"])
    assert guard.fileno() is None and guard.seconds_left() is None and guard.lock is None
    assert logind.log[-1] == "cancel"  # the child is ended, not left running
    assert guard.description == (
        "suspend NOT blocked (no answer to the inhibitor request in 10 s); root can still suspend"
    )
    assert "no sleep inhibitor (no answer to the inhibitor request in 10 s)" in caplog.text
    guard.update(["a", "b"])  # the devices at risk changed: asked again
    assert guard.fileno() == logind.pending[1].read_fd
    guard.close()


def test_the_agent_gives_up_on_an_unanswered_lock_without_another_event(
    rigs: Callable[[int], Rig], suspender: Suspender, caplog: pytest.LogCaptureFixture
) -> None:
    rig = rigs(0)
    logind = SlowLogind()

    def host() -> None:
        grow(rig, 512 * MIB)  # converged: only the inhibitor's deadline can wake the loop
        wait_for(lambda: "no answer to the inhibitor request in 0.3 s" in caplog.text)
        assert logind.log[-1] == "cancel"  # before run_suspending closes the guard

    with caplog.at_level("WARNING"):
        agent = run_suspending(rig, suspender, logind, host, answer_timeout=0.3)
    assert agent.suspend_guard is not None and agent.suspend_guard.pending is None
    assert len(logind.pending) == 1


def test_the_plug_does_not_wait_for_logind(
    rigs: Callable[[int], Rig], suspender: Suspender, caplog: pytest.LogCaptureFixture
) -> None:
    rig = rigs(0)
    logind = SlowLogind()

    def host() -> None:
        grow(rig, 512 * MIB)  # while logind has not answered: the plug is done all the same
        assert "suspend blocked" not in caplog.text
        logind.pending[0].answer()  # the answer arrives through the agent's selector
        wait_for(lambda: "suspend blocked: logind sleep inhibitor held" in caplog.text)

    with caplog.at_level("INFO"):
        run_suspending(rig, suspender, logind, host)
    assert len(logind.pending) == 1
    assert logind.log[-1] == "release"  # run_suspending closes the guard


def test_start_systemd_inhibit_returns_before_the_program_answers(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    # Answers only once the test creates the gate file: a start that waited would hang.
    program = fake_systemd_inhibit(tmp_path, first=f"while [ ! -e {gate} ]; do sleep 0.01; done")
    pending = start_systemd_inhibit("why", program=program, booted=lambda: True)
    assert not isinstance(pending, str)
    assert not select.select([pending.fileno()], [], [], 0)[0]  # nothing to read yet
    gate.touch()
    select.select([pending.fileno()], [], [], 30)
    lock = pending.finish()
    assert not isinstance(lock, str)
    lock.release()
    assert start_systemd_inhibit("x", program=(str(tmp_path / "absent"),), booted=lambda: True) == (
        f"{tmp_path / 'absent'} cannot run: No such file or directory"
    )


def test_without_systemd_nothing_is_started(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    program = fake_program(tmp_path, f"touch {ran}; exit 1")
    reason = start_systemd_inhibit("x", program=program, booted=lambda: False)
    assert reason == "systemd is not running (/run/systemd/system is absent)"
    assert not ran.exists()  # no child per plug where no logind can answer
