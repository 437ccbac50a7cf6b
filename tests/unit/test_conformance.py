"""The conformance fuzzer (vmem_guest/conformance/) against device models.

A DeviceModel stands in for the device under test: against an identical model
the fuzzer finds nothing; against a model that deviates from QEMU in one rule
it finds the deviation and shrinks it to a minimal sequence.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from vmem_guest import conformance, spec
from vmem_guest.conformance.kinds import Action, Kind, resolve
from vmem_guest.conformance.pci_runner import device_lock
from vmem_guest.conformance.steps import Step
from vmem_guest.errors import UsageError
from vmem_guest.sim import DeviceModel
from vmem_guest.spec import RequestType, ResponseType

MiB = 1 << 20
GiB = 1 << 30


def device(requested: int = 512 * MiB, cls: type[DeviceModel] = DeviceModel) -> DeviceModel:
    return cls(addr=4 * GiB, region_size=2 * GiB, block_size=2 * MiB, requested_size=requested)


class NackIsError(DeviceModel):
    """A device that answers ERROR where QEMU answers NACK (PLUG beyond requested_size)."""

    def submit(self, request: bytes) -> bytes:
        raw = super().submit(request)
        if raw[0] == ResponseType.NACK:
            return spec.encode_response(ResponseType.ERROR)
        return raw


class UsableGrowsOnlyWhenNeeded(DeviceModel):
    """A device that grows the usable region on resize only when requested_size needs it
    (QEMU grows it to requested_size + 256 MiB)."""

    def resize(self, requested_size: int) -> None:
        usable = self.usable_region_size
        super().resize(requested_size)
        if requested_size <= usable:
            self._usable, self._usable_end = usable, self.addr + usable
            self._config = None


def test_identical_model_has_no_mismatch(tmp_path: Path) -> None:
    real = device()
    result = conformance.fuzz(real, examples=60, seed=1, save_dir=tmp_path)
    assert result.mismatches == 0, result.as_dict()
    assert result.counts.requests_compared > 100
    assert result.counts.model_only > 0
    assert real.plugged_size == 0
    assert not list(tmp_path.iterdir())
    answers = result.counts.answers
    for expected in ("PLUG ACK", "PLUG NACK", "PLUG ERROR", "UNPLUG ACK", "UNPLUG ERROR"):
        assert answers[expected] > 0, answers
    for state in ("PLUGGED", "UNPLUGGED", "MIXED"):
        assert answers[f"STATE ACK {state}"] > 0, answers


def test_resizes_from_the_host_side_have_no_mismatch() -> None:
    real = device(requested=256 * MiB)
    result = conformance.fuzz(real, examples=60, seed=2, resize=real.resize)
    assert result.mismatches == 0, result.as_dict()
    assert result.counts.resizes > 0
    assert (real.plugged_size, real.requested_size) == (0, 256 * MiB)


def test_deviation_is_found_and_shrunk(tmp_path: Path) -> None:
    real = device(cls=NackIsError)
    result = conformance.fuzz(real, examples=100, seed=3, save_dir=tmp_path)
    assert result.mismatches == 1
    assert result.mismatch is not None
    (difference,) = result.mismatch.differences
    assert (difference.what, difference.device, difference.model) == ("response", "ERROR", "NACK")
    steps = [entry.step for entry in result.mismatch.trace]
    assert len(steps) == 1, [s.describe() for s in steps]
    assert steps[0].req_type == RequestType.PLUG
    assert real.plugged_size == 0
    # Saved as a regression example that replays to the same mismatch.
    assert result.saved is not None and result.saved.parent == tmp_path
    saved = json.loads(result.saved.read_text())
    assert saved["mismatches"] == 1
    with pytest.raises(conformance.Mismatch):
        conformance.replay(device(cls=NackIsError), conformance.load_steps(result.saved))
    assert conformance.replay(device(), conformance.load_steps(result.saved))


def test_usable_region_deviation_is_found_with_host_resizes() -> None:
    real = device(requested=256 * MiB, cls=UsableGrowsOnlyWhenNeeded)
    result = conformance.fuzz(real, examples=100, seed=4, resize=real.resize, max_steps=10)
    assert result.mismatch is not None
    assert [d.what for d in result.mismatch.differences] == ["config.usable_region_size"]
    # Shrunk to a few steps (say: resize 2M, UNPLUG_ALL, resize 256M) ending in a resize.
    trace = result.mismatch.trace
    assert len(trace) <= 4, [entry.step.describe() for entry in trace]
    assert trace[-1].step.op == "resize"
    assert (real.plugged_size, real.requested_size) == (0, 256 * MiB)


def test_refuses_a_device_with_plugged_memory() -> None:
    real = device()
    real.submit(spec.encode_request(RequestType.PLUG, 4 * GiB, 1))
    with pytest.raises(UsageError, match="plugged"):
        conformance.fuzz(real, examples=1)
    assert real.plugged_size == 2 * MiB


def test_device_that_stops_answering_is_reported_without_shrinking() -> None:
    class Dies(DeviceModel):
        def submit(self, request: bytes) -> bytes:
            if self.requests > 30:
                from vmem_guest.errors import DeviceTimeout

                raise DeviceTimeout("no answer within 5 s")
            return super().submit(request)

    result = conformance.fuzz(device(cls=Dies), examples=50, seed=5)
    assert result.lost is not None and result.mismatches == 1
    last = result.lost.trace[-1]
    assert "no answer" in last.device
    assert last.step.kind != "cleanup"  # the sequence that lost it, not the clean-up after
    assert result.counts.examples > 1


def test_resolve_kinds_give_the_intended_requests() -> None:
    model = device()
    bs, usable_end = model.block_size, model.addr + model.usable_region_size
    zero = resolve(Action(Kind.ZERO, RequestType.STATE, 0, 0), model)
    assert zero.nb_blocks == 0
    mis = resolve(Action(Kind.MISALIGNED, RequestType.PLUG, 0, 1), model)
    assert mis.addr % bs
    end = resolve(Action(Kind.AT_USABLE_END, RequestType.PLUG, 0, 0), model)
    assert end.addr == usable_end
    over = resolve(Action(Kind.OVERFLOW, RequestType.UNPLUG, 3, 2), model)
    assert over.addr + over.nb_blocks * bs > (1 << 64) - 1
    beyond = resolve(Action(Kind.PLUG_BEYOND_REQUESTED, 0, 0, 0), model)
    assert beyond.nb_blocks * bs > model.requested_size
    short = resolve(Action(Kind.SHORT, RequestType.PLUG, 10), model)
    assert short.op == "malformed" and len(short.raw()) == 10


def test_step_round_trips_through_json() -> None:
    step = Step("request", RequestType.STATE, 4 * GiB, 3, kind="valid")
    assert Step.from_dict(json.loads(json.dumps(step.as_dict()))) == step
    assert step.describe() == "STATE addr=0x100000000 nb_blocks=3 [valid]"


def test_device_lock_refuses_a_second_owner(tmp_path: Path) -> None:
    with (
        device_lock(tmp_path, "0000:00:03.0"),
        pytest.raises(UsageError, match="owned by another"),
        device_lock(tmp_path, "0000:00:03.0"),
    ):
        pass
    with device_lock(tmp_path, "0000:00:03.0"):
        assert (tmp_path / "0000:00:03.0.lock").exists()


def serve_resizes(directory: Path, real: DeviceModel, stop: threading.Event) -> None:
    """The host side of HostResizeFiles, as tests/vm runs it with QMP."""
    while not stop.is_set():
        for request in sorted(directory.glob("resize-*.json")):
            done = request.with_suffix(".done")
            if done.exists():
                continue
            size = json.loads(request.read_text())["size"]
            try:
                real.resize(size)
                answer: dict[str, object] = {"ok": True}
            except ValueError as exc:
                answer = {"ok": False, "error": str(exc)}
            done.write_text(json.dumps(answer))
        time.sleep(0.001)


def test_host_resizes_through_files(tmp_path: Path) -> None:
    real = device(requested=256 * MiB)
    stop = threading.Event()
    host = threading.Thread(target=serve_resizes, args=(tmp_path, real, stop), daemon=True)
    host.start()
    try:
        resize = conformance.HostResizeFiles(tmp_path, timeout=10)
        result = conformance.fuzz(real, examples=10, seed=8, resize=resize, max_steps=10)
    finally:
        stop.set()
        host.join()
    assert result.mismatches == 0, result.as_dict()
    assert result.counts.resizes > 0 and resize.count >= result.counts.resizes
    assert (real.plugged_size, real.requested_size) == (0, 256 * MiB)


def test_host_resize_refused_or_unanswered(tmp_path: Path) -> None:
    resize = conformance.HostResizeFiles(tmp_path, timeout=0.05)
    with pytest.raises(UsageError, match="did not answer"):
        resize(2 * MiB)
    (tmp_path / "resize-2.done").write_text(json.dumps({"ok": False, "error": "too big"}))
    with pytest.raises(UsageError, match="too big"):
        resize(4 * MiB)
