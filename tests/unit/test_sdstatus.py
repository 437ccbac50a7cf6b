"""The agent tells the service manager READY=1, STATUS= on change and STOPPING=1,
read from a real AF_UNIX datagram socket; with no device it is ready and waits;
each converged resize is logged once and timed."""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fake_pci_sysfs import BDF as FAKE_BDF
from fake_pci_sysfs import NET_BDF, FakeKernel
from test_agent import BDF, GIB, MIB, Rig, run_while, wait_for
from test_agent_hotplug import SECOND_BDF, FakeArrivals, FakeUdevMonitor
from test_sdnotify import Manager

from vmem_guest import pci, service
from vmem_guest.agent import Agent
from vmem_guest.errors import UsageError
from vmem_guest.pci_events import PciMonitor
from vmem_guest.sdnotify import NOTIFY_SOCKET, Notifier, socket_address
from vmem_guest.sdstatus import WAITING, SystemdStatus, status_line


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[Manager, Notifier]]:
    path = str(tmp_path / "notify")
    receiver = Manager(path)
    notifier = Notifier(socket_address(path))
    yield receiver, notifier
    notifier.close()
    receiver.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.attached.close()


def statuses(messages: list[str]) -> list[str]:
    return [m.split("STATUS=", 1)[1] for m in messages if "STATUS=" in m]


class Reader:
    """Reads every message the agent sends, in a thread, until STOPPING=1."""

    def __init__(self, receiver: Manager) -> None:
        self.receiver = receiver
        self.messages: list[str] = []
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        while not self.messages or not self.messages[-1].startswith("STOPPING=1"):
            self.messages.append(self.receiver.receive())

    def saw(self, text: str) -> bool:
        return any(text in m for m in list(self.messages))


def test_ready_then_status_on_change_then_stopping(
    rig: Rig, manager: tuple[Manager, Notifier], caplog: pytest.LogCaptureFixture
) -> None:
    receiver, notifier = manager
    reader = Reader(receiver)
    counts: list[int] = []

    def host() -> None:
        wait_for(lambda: reader.saw("READY=1"))
        rig.channel.host_resize(1 * GIB)
        wait_for(lambda: reader.saw("1GiB/1GiB"))
        counts.append(len(reader.messages))
        time.sleep(0.3)
        counts.append(len(reader.messages))  # converged and idle: nothing more sent

    agent = Agent([rig.attached], listener=SystemdStatus(notifier))
    with caplog.at_level("INFO"):
        run_while(agent, host)
    reader.thread.join(10)
    messages = reader.messages
    assert messages[0] == f"READY=1\nSTATUS=requested/plugged: {BDF} 0/0"
    assert counts[0] == counts[1]
    assert messages[-1] == "STOPPING=1\nSTATUS=stopping"
    lines = statuses(messages[1:-1])
    assert lines[-1] == f"requested/plugged: {BDF} 1GiB/1GiB"
    assert lines[0].startswith(f"requested/plugged: {BDF} 1GiB/")  # requested first
    assert all(a != b for a, b in itertools.pairwise(lines))  # only on change
    done = [r.getMessage() for r in caplog.records if "resize done" in r.getMessage()]
    assert len(done) == 1
    assert done[0].startswith(f"{BDF}: resize done: requested 1GiB, plugged 1GiB, remainder 0, ")
    assert done[0].endswith(" s after the config change")
    last = agent.slots[BDF].resize.last
    assert last is not None and last.config_change
    assert (last.requested_bytes, last.plugged_bytes, last.remainder_bytes) == (GIB, GIB, 0)
    assert 0 < last.seconds < 20


def test_with_no_device_the_agent_is_ready_and_serves_one_hot_plugged(
    tmp_path: Path, manager: tuple[Manager, Notifier]
) -> None:
    receiver, notifier = manager
    arrivals = FakeArrivals()
    second = Rig(tmp_path, bdf=SECOND_BDF, addr=8 * GIB)
    got: list[str] = []

    def host() -> None:
        got.append(receiver.receive())
        arrivals.hotplug(second.attached)
        second.channel.host_resize(128 * MIB)
        wait_for(lambda: second.online_bytes() == 128 * MIB)
        while not got or "128MiB/128MiB" not in got[-1]:
            got.append(receiver.receive())

    agent = Agent([], arrivals=arrivals, listener=SystemdStatus(notifier))
    run_while(agent, host)
    arrivals.close()
    second.attached.close()
    assert got[0] == f"READY=1\nSTATUS={WAITING}"
    assert got[-1] == f"STATUS=requested/plugged: {SECOND_BDF} 128MiB/128MiB"


def test_a_broken_device_shows_as_broken(rig: Rig) -> None:
    agent = Agent([rig.attached])
    try:
        rig.driver.mark_broken("test: ERROR answer")
        assert status_line(agent.slots) == f"requested/plugged: {BDF} broken"
    finally:
        agent.close()


def test_without_a_service_manager_nothing_is_computed(rig: Rig) -> None:
    class Exploding:
        def __getattr__(self, name: str) -> object:
            raise AssertionError("the status line was built with no one to send it to")

    status = SystemdStatus(Notifier(None))
    status.changed(Exploding())  # type: ignore[arg-type]
    assert status.sent is None


# --- run without --device and no device present ------------------------------------


@pytest.fixture
def no_virtio_mem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    """A PCI tree with a network function only: the fake kernel's virtio-mem function
    taken out (it is found before, so the empty list is no accident of the tree)."""
    fake = FakeKernel(tmp_path / "tree")
    real = pci.list_devices
    assert [d.bdf for d in real(fake.sys, use_udev=False)] == [FAKE_BDF]
    (fake.sys / "bus/pci/devices" / FAKE_BDF).unlink()
    shutil.rmtree(fake.devdir(FAKE_BDF))
    assert [p.name for p in (fake.sys / "bus/pci/devices").iterdir()] == [NET_BDF]
    monkeypatch.setattr(pci, "list_devices", lambda: real(fake.sys, use_udev=False))
    return fake


def test_select_devices_waits_only_when_told_to(
    no_virtio_mem: FakeKernel, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(UsageError, match=r"no virtio-mem device \(1af4:1058\) found"):
        service.select_devices(())
    with caplog.at_level("INFO", logger="vmem_guest.service"):
        assert service.select_devices((), wait_for_hotplug=True) == []
    assert [r.getMessage() for r in caplog.records] == [
        "no virtio-mem device (1af4:1058) yet: waiting for one to be hot-plugged"
    ]


def test_a_named_device_that_is_missing_stays_a_usage_error(
    no_virtio_mem: FakeKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pci.get_device
    monkeypatch.setattr(pci, "get_device", lambda bdf: real(bdf, no_virtio_mem.sys, use_udev=False))
    with pytest.raises(UsageError, match=f"no PCI device {FAKE_BDF}"):
        service.select_devices((FAKE_BDF,), wait_for_hotplug=True)


def test_run_with_no_device_is_ready_waits_and_stops_on_sigterm(
    tmp_path: Path,
    no_virtio_mem: FakeKernel,
    manager: tuple[Manager, Notifier],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``vmem-guest run`` end to end but for the kernel: no device, a uevent monitor,
    NOTIFY_SOCKET set; the agent says READY=1 and waits until SIGTERM."""
    receiver, _notifier = manager
    monkeypatch.setenv(NOTIFY_SOCKET, receiver.sock.getsockname())
    read_fd, write_fd = os.pipe()  # the monitor's fd: never readable, no uevent comes

    class QuietMonitor(FakeUdevMonitor):
        def fileno(self) -> int:
            return read_fd

    monkeypatch.setattr(service.PciMonitor, "open", lambda: PciMonitor(QuietMonitor([])))
    monkeypatch.setattr(service, "no_unevictable_compaction", contextlib.nullcontext)

    @contextlib.contextmanager
    def attached_devices(devices: list[object], **kwargs: object) -> Iterator[object]:
        assert devices == []
        yield SimpleNamespace(attached=[])

    monkeypatch.setattr(service, "attached_devices", attached_devices)
    got: list[str] = []

    def sigterm_once_ready() -> None:
        got.append(receiver.receive())
        os.kill(os.getpid(), signal.SIGTERM)
        got.append(receiver.receive())

    thread = threading.Thread(target=sigterm_once_ready)
    thread.start()
    with caplog.at_level("INFO"):
        service.run_agent(service.RunOptions(state_dir=tmp_path / "state"))
    thread.join(10)
    os.close(read_fd)
    os.close(write_fd)
    assert got == [f"READY=1\nSTATUS={WAITING}", "STOPPING=1\nSTATUS=stopping"]
    assert "waiting for one to be hot-plugged" in caplog.text
    assert "agent running: 0 device(s)" in caplog.text
