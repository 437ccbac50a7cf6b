"""The conformance package's seams: the kinds table, the strategies, the failures
under the one exception root, the tracker lock and the service's device selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmem_guest import conformance, pci, service
from vmem_guest.conformance.findings import Difference, TraceEntry
from vmem_guest.conformance.kinds import RANGE_KINDS, RESOLVERS, Action, Kind, resolve
from vmem_guest.conformance.pci_runner import device_lock
from vmem_guest.conformance.steps import Step, request_name
from vmem_guest.conformance.strategies import WEIGHTS, drawn_kinds
from vmem_guest.errors import DeviceTimeout, UsageError, VmemError
from vmem_guest.sim import DeviceModel
from vmem_guest.spec import RequestType
from vmem_guest.tracker import device_locked

MiB = 1 << 20
GiB = 1 << 30
BDF = "0000:00:03.0"


def model(requested: int = 512 * MiB) -> DeviceModel:
    return DeviceModel(
        addr=4 * GiB, region_size=2 * GiB, block_size=2 * MiB, requested_size=requested
    )


def test_every_kind_has_one_resolver_and_a_weight() -> None:
    assert set(RESOLVERS) == set(Kind)
    assert set(WEIGHTS) == set(Kind)
    assert all(weight > 0 for weight in WEIGHTS.values())
    assert set(RANGE_KINDS) <= set(Kind)


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_resolves_to_a_step_named_for_it(kind: Kind) -> None:
    device = model()
    device.submit(Step("request", RequestType.PLUG, 4 * GiB, 3).raw())  # something plugged
    for a, b in ((0, 0), (1 << 15, 7), ((1 << 16) - 1, (1 << 16) - 1)):
        step = resolve(Action(kind, RequestType.UNPLUG, a, b), device)
        assert step.kind == kind.value and type(step.kind) is str
        assert (step.op == "resize") == (kind is Kind.RESIZE)
        assert 0 <= step.addr < 1 << 64 and 0 <= step.nb_blocks <= 0xFFFF


def test_model_only_kinds_are_malformed_and_the_rest_are_not() -> None:
    device = model()
    for kind in Kind:
        step = resolve(Action(kind, 9, 10, 1), device)
        assert (step.op == "malformed") == (kind in (Kind.SHORT, Kind.UNKNOWN_TYPE)), kind


def test_every_kind_is_drawn_and_resizes_only_with_a_callback() -> None:
    assert set(drawn_kinds(resizable=True)) == set(Kind)
    assert set(drawn_kinds(resizable=False)) == set(Kind) - {Kind.RESIZE}
    assert drawn_kinds(resizable=True).count(Kind.PLUG_FREE) == WEIGHTS[Kind.PLUG_FREE]
    assert drawn_kinds(resizable=True)[0] is Kind.STATE_PLUGGED  # where shrinking goes


def test_request_names() -> None:
    assert request_name(RequestType.UNPLUG_ALL) == "UNPLUG_ALL"
    assert request_name(7) == "type=7"


def test_failures_sit_under_the_one_root_with_structured_fields() -> None:
    step = Step("request", RequestType.PLUG, 4 * GiB, 1, kind="valid")
    trace = [TraceEntry(step, "ERROR", "NACK")]
    mismatch = conformance.Mismatch(trace, [Difference("response", "ERROR", "NACK")])
    assert isinstance(mismatch, VmemError)
    assert mismatch.as_dict() == {
        "error": "Mismatch",
        "message": f"after {step.describe()}: response: device ERROR, model NACK",
        "after": step.describe(),
        "differences": [{"what": "response", "device": "ERROR", "model": "NACK"}],
    }
    lost = conformance.DeviceLost(trace, "no answer within 5 s")
    assert isinstance(lost, VmemError)
    assert lost.as_dict()["reason"] == lost.reason == "no answer within 5 s"
    assert lost.trace == trace


def test_a_lost_device_gets_nothing_after_the_request_it_did_not_answer() -> None:
    """hypothesis would shrink a failure it caught, sending more requests: it must not
    see DeviceLost as one."""

    class Dies(DeviceModel):
        unanswered = 0

        def submit(self, request: bytes) -> bytes:
            if self.requests > 30:
                self.unanswered += 1
                raise DeviceTimeout("no answer within 5 s")
            return super().submit(request)

    real = Dies(addr=4 * GiB, region_size=2 * GiB, block_size=2 * MiB, requested_size=512 * MiB)
    result = conformance.fuzz(real, examples=50, seed=5)
    assert result.lost is not None and result.mismatch is None
    assert real.unanswered == 1


def test_device_lock_is_the_trackers_lock(tmp_path: Path) -> None:
    with (
        device_locked(tmp_path, BDF),
        pytest.raises(UsageError, match="owned by another"),
        device_lock(tmp_path, BDF),
    ):
        pass
    with (
        device_lock(tmp_path, BDF),
        pytest.raises(VmemError, match="locked"),
        device_locked(tmp_path, BDF),
    ):
        pass


def fake_device(bdf: str) -> pci.VirtioMemPci:
    return pci.VirtioMemPci(bdf, None, None, None, -1, 1, Path("/nonexistent") / bdf)


def test_pci_runner_refuses_several_devices_before_locking_any(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen: list[tuple[str, ...]] = []

    def select_devices(devices: tuple[str, ...]) -> list[pci.VirtioMemPci]:
        chosen.append(devices)
        return [fake_device(BDF), fake_device("0000:00:04.0")]

    monkeypatch.setattr(service, "select_devices", select_devices)
    with pytest.raises(UsageError, match=r"choose a device with --device .*00:03\.0, 0000:00:04"):
        conformance.fuzz_pci_device(None, allow_noiommu=True, state_dir=tmp_path)
    assert chosen == [()]
    assert not list(tmp_path.iterdir())


def test_pci_runner_uses_the_services_selection_and_refuses_an_in_kernel_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pci_dir = tmp_path / "sys" / BDF
    (pci_dir / "virtio1").mkdir(parents=True)
    (tmp_path / "virtio_mem").mkdir()
    (pci_dir / "virtio1" / "driver").symlink_to(tmp_path / "virtio_mem")
    dev = pci.VirtioMemPci(BDF, "virtio-pci", None, None, -1, 1, pci_dir)
    monkeypatch.setattr(
        service, "select_devices", lambda devices: [dev] if devices == (BDF,) else []
    )

    def bind_device(dev: pci.VirtioMemPci, allow_noiommu: bool) -> str:
        raise AssertionError("bound a device the in-kernel driver owns")

    monkeypatch.setattr(service, "bind_device", bind_device)
    with pytest.raises(UsageError, match="in-kernel virtio_mem driver"):
        conformance.fuzz_pci_device(BDF, allow_noiommu=True, state_dir=tmp_path / "state")
    # The lock was taken (and given back): the refusal came from inside it.
    assert (tmp_path / "state" / f"{BDF}.lock").exists()
