"""service.attached_devices: the agent (skip_refusal) serves the devices it can trust and
leaves the rest; manual commands (raise_refusal, the default) get all of them or an error."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest

from vmem_guest import planner, service
from vmem_guest.attach import Attached, attach_channel
from vmem_guest.errors import ConfigError
from vmem_guest.sim.channel import SimChannel
from vmem_guest.sim.device_model import DeviceModel
from vmem_guest.sim.kernel import FakeKernelMemory

GIB = 1 << 30
GOOD, BAD = "0000:00:03.0", "0000:00:04.0"


@pytest.fixture
def fake_devices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    kernel = FakeKernelMemory()

    def attach(bdf: str, **kwargs: Any) -> Attached:
        if bdf == BAD:
            raise ConfigError("block_size 0x0 is not a power of two >= 4 KiB", block_size=0)
        model = DeviceModel(addr=4 * GIB, region_size=1 * GIB, block_size=2 << 20)
        return attach_channel(
            bdf,
            SimChannel(model),
            state_dir=kwargs["state_dir"],
            kernel=kernel,
            policy=kwargs["policy"],
            boot_record=tmp_path / "boot-memory",
        )

    monkeypatch.setattr(service, "_kernel", lambda timeout: kernel)
    monkeypatch.setattr(service, "bind_device", lambda dev, allow: "noiommu")
    monkeypatch.setattr(service, "attach", attach)
    return [types.SimpleNamespace(bdf=BAD), types.SimpleNamespace(bdf=GOOD)]


def test_the_agent_serves_the_good_device_and_logs_the_refused_one(
    tmp_path: Path, fake_devices: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    with service.attached_devices(
        fake_devices,
        state_dir=tmp_path / "state",
        policy=planner.DEFAULT_POLICY,
        allow_noiommu=True,
        on_refused=service.skip_refusal,
    ) as attacher:
        assert [item.bdf for item in attacher.attached] == [GOOD]
    assert f"{BAD}: device refused, not serving it: block_size 0x0" in caplog.text


def test_with_every_device_refused_the_refusal_is_raised(
    tmp_path: Path, fake_devices: list[Any]
) -> None:
    with (
        pytest.raises(ConfigError, match="block_size 0x0"),
        service.attached_devices(
            fake_devices[:1],
            state_dir=tmp_path / "state",
            policy=planner.DEFAULT_POLICY,
            allow_noiommu=True,
            on_refused=service.skip_refusal,
        ),
    ):
        pass


def test_manual_commands_do_not_skip_a_refused_device(
    tmp_path: Path, fake_devices: list[Any]
) -> None:
    with (
        pytest.raises(ConfigError),
        service.attached_devices(
            fake_devices,
            state_dir=tmp_path / "state",
            policy=planner.DEFAULT_POLICY,
            allow_noiommu=True,
        ),
    ):
        pass


@pytest.mark.parametrize(
    ("given", "used"),
    [
        (None, 3 * GIB),  # not told: MemTotal at start
        (planner.DEFAULT_KERNEL_MEMORY_BYTES, planner.DEFAULT_KERNEL_MEMORY_BYTES),
        (2 * GIB, 2 * GIB),
    ],
)
def test_kernel_memory_is_measured_only_when_not_given(
    tmp_path: Path,
    fake_devices: list[Any],
    monkeypatch: pytest.MonkeyPatch,
    given: int | None,
    used: int,
) -> None:
    # A caller who asks for exactly the default gets it, not MemTotal.
    monkeypatch.setattr(service, "memtotal_bytes", lambda: 3 * GIB)
    policy = planner.Policy(online=planner.OnlinePolicy.AUTO, kernel_memory_bytes=given)
    with service.attached_devices(
        fake_devices[1:], state_dir=tmp_path / "state", policy=policy, allow_noiommu=True
    ) as attacher:
        assert attacher.attached[0].driver.policy.kernel_memory_bytes == used
        assert attacher.attached[0].driver.policy.online is planner.OnlinePolicy.AUTO
