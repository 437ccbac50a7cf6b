"""Devices that come and go while the agent runs: one added through an Arrivals source
is served from its next step; one whose release the kernel requests (``device_del``:
VFIO's REQ index) is closed and never touched again, and the others carry on."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_agent import GIB, MIB, Rig, run_agent, wait_for

from vmem_guest import service
from vmem_guest.agent import Agent
from vmem_guest.attach import Attached
from vmem_guest.errors import ConfigError, UsageError
from vmem_guest.pci import VirtioMemPci
from vmem_guest.pci_events import PciMonitor
from vmem_guest.service import HotplugArrivals

SECOND_BDF = "0000:00:05.0"


class FakeArrivals:
    """A uevent source the test feeds: each device it hands over is already attached."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.lock = threading.Lock()
        self.pending: list[Attached] = []

    def fileno(self) -> int:
        return self.read_fd

    def hotplug(self, attached: Attached) -> None:
        with self.lock:
            self.pending.append(attached)
        os.write(self.write_fd, b"+")

    def arrived(self) -> list[Attached]:
        os.read(self.read_fd, 64)
        with self.lock:
            new, self.pending = self.pending, []
        return new

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    """The device the agent starts with."""
    made = Rig(tmp_path)
    yield made
    made.attached.close()


def test_a_device_added_is_served_and_one_released_is_let_go(
    rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    second = Rig(tmp_path, bdf=SECOND_BDF, addr=8 * GIB)
    arrivals = FakeArrivals()
    requests_after_release: list[int] = []

    def host() -> None:
        arrivals.hotplug(second.attached)
        second.channel.host_resize(256 * MIB)
        wait_for(lambda: second.online_bytes() == 256 * MIB)
        second.channel.host_resize(0)
        wait_for(lambda: second.online_bytes() == 0 and second.model.plugged_size == 0)
        second.channel.host_unplug_request()  # device_del
        wait_for(lambda: second.attached.closed)
        requests_after_release.append(second.model.requests)
        rig.channel.host_resize(128 * MIB)  # the first device is still served
        wait_for(lambda: rig.online_bytes() == 128 * MIB)

    with caplog.at_level("INFO"):
        agent = run_agent(rig, host, arrivals=arrivals)
    arrivals.close()
    assert list(agent.slots) == [rig.attached.bdf]
    assert second.attached.closed and not rig.attached.closed
    assert f"{SECOND_BDF}: device added at run time; 2 device(s) served" in caplog.text
    assert f"{SECOND_BDF}: device released (hot-unplug); 1 device(s) served" in caplog.text
    assert "still plugged" not in caplog.text  # released with nothing plugged
    assert second.model.requests == requests_after_release[0]  # never touched again
    assert rig.model.plugged_size == 128 * MIB


class FakeUdevDevice:
    def __init__(self, action: str, subsystem: str, sys_name: str) -> None:
        self.action, self.subsystem, self.sys_name = action, subsystem, sys_name


class FakeUdevMonitor:
    """pyudev.Monitor's poll(timeout=0): the queued devices, then None."""

    def __init__(self, devices: list[FakeUdevDevice]) -> None:
        self.devices = devices

    def fileno(self) -> int:
        return 0

    def poll(self, timeout: float) -> FakeUdevDevice | None:
        assert timeout == 0  # never blocks the agent's loop
        return self.devices.pop(0) if self.devices else None


def test_the_monitor_reports_pci_additions_only() -> None:
    monitor = PciMonitor(
        FakeUdevMonitor(
            [
                FakeUdevDevice("add", "pci", "0000:01:00.0"),
                FakeUdevDevice("bind", "pci", "0000:01:00.0"),  # a driver bound: not new
                FakeUdevDevice("add", "virtio", "virtio3"),  # the virtio-pci child
                FakeUdevDevice("remove", "pci", "0000:02:00.0"),
                FakeUdevDevice("add", "pci", "0000:02:00.0"),
            ]
        )
    )
    assert monitor.added() == ["0000:01:00.0", "0000:02:00.0"]
    assert monitor.added() == []
    monitor.close()
    assert monitor.added() == []


class FakeAttacher:
    def __init__(self, served: set[str], refuses: set[str]) -> None:
        self.served, self.refuses = served, refuses
        self.attached: list[str] = []

    def serves(self, bdf: str) -> bool:
        return bdf in self.served

    def attach(self, dev: VirtioMemPci) -> Attached:
        if dev.bdf in self.refuses:
            raise ConfigError("region overlaps boot memory", bdf=dev.bdf)
        self.attached.append(dev.bdf)
        return dev.bdf  # type: ignore[return-value]  # stands for the Attached


def test_arrivals_attach_new_virtio_mem_functions_only(caplog: pytest.LogCaptureFixture) -> None:
    added = ["0000:01:00.0", "0000:02:00.0", "0000:03:00.0", "0000:04:00.0"]
    monitor = PciMonitor(FakeUdevMonitor([FakeUdevDevice("add", "pci", b) for b in added]))

    def lookup(bdf: str) -> VirtioMemPci:
        if bdf == "0000:01:00.0":
            raise UsageError(f"{bdf} is not a virtio-mem device")
        return SimpleNamespace(bdf=bdf)  # type: ignore[return-value]

    attacher = FakeAttacher(served={"0000:02:00.0"}, refuses={"0000:03:00.0"})
    arrivals = HotplugArrivals(monitor, attacher, lookup)  # type: ignore[arg-type]
    with caplog.at_level("INFO"):
        assert arrivals.arrived() == ["0000:04:00.0"]  # type: ignore[comparison-overlap]
    assert attacher.attached == ["0000:04:00.0"]
    assert "0000:03:00.0: hot-plugged device not served: region overlaps boot memory" in (
        caplog.text
    )


def test_a_broken_device_can_still_be_released(rig: Rig) -> None:
    """A broken device's interrupts are no longer watched, its release request is:
    releasing it must not trip over the fds already taken out."""
    agent = Agent([rig.attached])
    agent._register()
    slot = agent.slots[rig.attached.bdf]
    rig.driver.mark_broken("test: broken before the unplug")
    agent._forget(slot)
    agent.release_device(slot)
    assert agent.slots == {} and rig.attached.closed
    agent.close()


@pytest.mark.parametrize(("named", "watched"), [((), True), (("0000:00:03.0",), False)])
def test_the_monitor_starts_before_the_devices_are_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, named: tuple[str, ...], watched: bool
) -> None:
    """A device added while the ones present are listed and attached is queued in the
    monitor, not missed; with --device no monitor is started (only those are served)."""
    events: list[str] = []

    def open_monitor() -> PciMonitor:
        events.append("monitor started")
        return PciMonitor(FakeUdevMonitor([]))

    def select_devices(devices: tuple[str, ...], wait_for_hotplug: bool) -> list[VirtioMemPci]:
        assert wait_for_hotplug is watched  # none present: wait only with a monitor
        events.append("devices listed")
        return []

    @contextlib.contextmanager
    def attached_devices(devices: list[VirtioMemPci], **kwargs: object) -> Iterator[object]:
        yield SimpleNamespace(attached=[])

    def serve(
        attacher: object, path: Path, options: object, monitor: object, notifier: object
    ) -> None:
        events.append("served with a monitor" if monitor is not None else "served")

    monkeypatch.setattr(service.PciMonitor, "open", open_monitor)
    monkeypatch.setattr(service, "select_devices", select_devices)
    monkeypatch.setattr(service, "attached_devices", attached_devices)
    monkeypatch.setattr(service, "no_unevictable_compaction", contextlib.nullcontext)
    monkeypatch.setattr(service, "_serve", serve)
    service.run_agent(service.RunOptions(state_dir=tmp_path, devices=named))
    if watched:
        assert events == ["monitor started", "devices listed", "served with a monitor"]
    else:
        assert events == ["devices listed", "served"]
