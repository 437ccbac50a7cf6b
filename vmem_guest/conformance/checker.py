"""The :class:`Checker`: one device under test, a fresh model per example, step by step.

After every step the checker compares the device's answer and config with the
model's (:mod:`~vmem_guest.conformance.compare`) and raises Mismatch at the
first difference, or DeviceLost when the device stops answering. The spec
oracle (:mod:`~vmem_guest.conformance.oracle`) sees every request and config
read on the way, the clean-up's included; what it finds is kept per rule with
the shortest sequence (:attr:`Checker.spec`) and classifies a mismatch at the
same step, but does not stop the run: a device may break a rule its profile
shares, and the comparison with the profile goes on. Between
examples it brings the device back to where it was: ``requested_size``
restored, UNPLUG_ALL until ACKed, ``plugged_size`` 0.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence

from vmem_guest.conformance.compare import answer_text, config_differences, config_fields
from vmem_guest.conformance.findings import DeviceLost, Difference, Mismatch, TraceEntry
from vmem_guest.conformance.kinds import Action, resolve
from vmem_guest.conformance.oracle import ObservedChannel, Oracle, SpecFindings, Violation
from vmem_guest.conformance.steps import UNPLUG_ALL, Step, request_name
from vmem_guest.device import RequestChannel
from vmem_guest.errors import DeviceBroken, VmemError
from vmem_guest.sim.device_model import USABLE_EXTENT_X86, DeviceModel
from vmem_guest.spec import ResponseType

#: Host-side resize of the device under test: set ``requested_size`` (bytes).
Resize = Callable[[int], None]

#: How often an UNPLUG_ALL that answers BUSY is retried during cleanup, and the
#: first pause (growing linearly): QEMU answers BUSY while a migration runs.
CLEANUP_ATTEMPTS = 20
CLEANUP_BACKOFF = 0.05


@dataclasses.dataclass
class Counts:
    """What a run did."""

    examples: int = 0
    requests_compared: int = 0
    model_only: int = 0
    resizes: int = 0
    cleanup_requests: int = 0
    #: device answers of compared requests, as "PLUG NACK", "STATE ACK MIXED"...
    answers: Counter[str] = dataclasses.field(default_factory=Counter)


class Checker:
    """Runs sequences on the device under test and on a fresh model, step by step.

    ``device`` is the device under test (a RequestChannel: raw bytes in, raw
    bytes out); ``resize`` sets its ``requested_size`` from the host side, or is
    None. ``usable_margin`` is the model's usable-region extent (QEMU on x86:
    256 MiB); ``model_factory`` builds a model (a DeviceModel, or a variant).
    The checker reaches ``device`` through ``observed``, an
    :class:`ObservedChannel`: ``oracle`` checks everything sent and read, ``spec``
    keeps what it found.
    """

    def __init__(
        self,
        device: RequestChannel,
        *,
        resize: Resize | None = None,
        usable_margin: int = USABLE_EXTENT_X86,
        model_factory: Callable[..., DeviceModel] = DeviceModel,
    ) -> None:
        self.oracle = Oracle()
        self.spec = SpecFindings()
        #: What the oracle found at the last step (or clean-up).
        self.last_found: list[Violation] = []
        #: The steps of the example being run, which a rule broken in its clean-up
        #: is reported with.
        self.example_trace: list[TraceEntry] = []
        self.device = device
        self.observed = ObservedChannel(device, self.oracle)
        self.resize = resize
        self.usable_margin = usable_margin
        self.model_factory = model_factory
        self.counts = Counts()
        initial = config_fields(self.observed.read_config())
        self.initial_requested = initial.get("requested_size", 0)
        self._requested = self.initial_requested

    # -- the device under test --

    def _submit(self, raw: bytes, trace: list[TraceEntry], step: Step) -> bytes:
        """The device's answer to ``raw``; DeviceLost when it gives none."""
        try:
            return self.observed.submit(raw)
        except VmemError as exc:
            trace.append(TraceEntry(step, f"no answer: {exc.message}", "-"))
            raise DeviceLost(trace, exc.message) from exc

    def _resize_device(self, resize: Resize, step: Step, trace: list[TraceEntry]) -> None:
        """Set the device's ``requested_size`` to ``step.size``; DeviceLost on failure."""
        try:
            resize(step.size)
        except VmemError as exc:
            trace.append(TraceEntry(step, f"resize failed: {exc.message}", "-"))
            raise DeviceLost(trace, exc.message) from exc
        self._requested = step.size

    def clean(self) -> None:
        """Bring the device back to the example's start: requested restored, UNPLUG_ALL.

        Raises DeviceLost when UNPLUG_ALL is not ACKed (after BUSY retries) or
        ``plugged_size`` is not 0 afterwards. A rule broken here is reported with
        :attr:`example_trace` (the example this clean-up ends), which it resets.
        """
        before, self.example_trace = self.example_trace, []
        trace: list[TraceEntry] = []
        if self.resize is not None and self._requested != self.initial_requested:
            restore = Step("resize", size=self.initial_requested, kind="cleanup")
            self._resize_device(self.resize, restore, trace)
        step = Step("request", UNPLUG_ALL, kind="cleanup")
        answer = ""
        for attempt in range(CLEANUP_ATTEMPTS):
            self.counts.cleanup_requests += 1
            answer = answer_text(self._submit(step.raw(), trace, step), UNPLUG_ALL)
            if answer != ResponseType.BUSY.name:
                break
            time.sleep(CLEANUP_BACKOFF * (attempt + 1))
        plugged = config_fields(self.observed.read_config()).get("plugged_size")
        trace.append(TraceEntry(step, answer, "-"))
        self._violations([*before, *trace])
        if answer != ResponseType.ACK.name or plugged != 0:
            trace[-1] = TraceEntry(step, f"{answer}, plugged_size {plugged}", "ACK, 0")
            raise DeviceLost(trace, f"cleanup UNPLUG_ALL answered {answer}, plugged {plugged}")

    def new_model(self) -> DeviceModel:
        """A model in the device's current state, which must have nothing plugged.

        Geometry and ``requested_size`` come from the device's config. A usable
        region larger than ``requested_size`` implies (the host asked for more
        earlier, and nothing shrank it since) is reached the way QEMU reaches it:
        the model is built for a larger request and resized down, which keeps
        the usable region (a resize only grows it, docs/protocol.md section 1,
        "QEMU specifics"). A usable region no history explains is left to the
        start-of-example comparison to report.
        """
        cfg = config_fields(self.observed.read_config())
        geometry = {
            "addr": cfg["addr"],
            "region_size": cfg["region_size"],
            "block_size": cfg["block_size"],
            "node_id": cfg["node_id"],
            "usable_margin": self.usable_margin,
        }
        requested, usable = cfg["requested_size"], cfg["usable_region_size"]
        model = self.model_factory(requested_size=requested, **geometry)
        earlier = min(cfg["region_size"], max(requested, usable - self.usable_margin))
        earlier -= earlier % cfg["block_size"]
        if usable > model.usable_region_size and earlier > requested:
            model = self.model_factory(requested_size=earlier, **geometry)
            model.resize(requested)
        return model

    # -- one example --

    def run_example(self, actions: Sequence[Action]) -> list[TraceEntry]:
        """Run one sequence from a clean device; raise Mismatch at the first difference.

        The device is cleaned (UNPLUG_ALL) afterwards, unless it was lost
        (DeviceLost propagates with the sequence that lost it).
        """
        self.counts.examples += 1
        trace: list[TraceEntry] = []
        self.example_trace = trace
        start_raw = self.observed.read_config()
        try:
            model = self.new_model()
            start = config_differences(start_raw, model.read_config())
            violations = self._violations(trace)
            if start:
                raise Mismatch(trace, start, violations)
            for action in actions:
                self.run_step(resolve(action, model), model, trace)
            # The way back, compared too: what it leaves behind is checked in this example.
            if self.resize is not None and model.requested_size != self.initial_requested:
                restore = Step("resize", size=self.initial_requested, kind="restore")
                self.run_step(restore, model, trace)
            self.run_step(Step("request", UNPLUG_ALL, kind="end of example"), model, trace)
        except Mismatch as exc:
            exc.start_config = config_fields(start_raw)
            self.clean()
            raise
        except DeviceLost:
            raise  # nothing more is sent to a device that stopped answering
        except BaseException:
            self.clean()
            raise
        self.clean()
        return trace

    def run_step(self, step: Step, model: DeviceModel, trace: list[TraceEntry]) -> None:
        """Run ``step`` on both sides (the model only for a malformed request), then
        compare the answers and the configs; Mismatch at a difference, DeviceLost
        without an answer. The device's config is read after every step, so the
        oracle checks it whatever the answer was."""
        if step.op == "malformed":
            self._model_only(step, model, trace)
            return
        differences: list[Difference] = []
        if step.op == "resize":
            self._resize_step(step, model, trace)
        else:
            differences = self._request_step(step, model, trace)
        device_config = self.observed.read_config()
        violations = self._violations(trace)
        if not differences:
            differences = config_differences(device_config, model.read_config())
        if differences:
            raise Mismatch(trace, differences, violations)

    def _violations(self, trace: Sequence[TraceEntry]) -> list[Violation]:
        """What the oracle found since the last call, kept with ``trace`` so far."""
        found = self.oracle.take()
        self.spec.record(found, trace)
        self.last_found = found
        return found

    def _resize_step(self, step: Step, model: DeviceModel, trace: list[TraceEntry]) -> None:
        if self.resize is None:
            raise ValueError("a resize step needs a resize callback")
        self._resize_device(self.resize, step, trace)
        model.resize(step.size)
        self.counts.resizes += 1
        trace.append(TraceEntry(step, "done", "done"))

    def _request_step(
        self, step: Step, model: DeviceModel, trace: list[TraceEntry]
    ) -> list[Difference]:
        """Send ``step`` to both sides; the difference in their answers, if any."""
        raw = step.raw()
        device_answer = answer_text(self._submit(raw, trace, step), step.req_type)
        model_answer = answer_text(model.submit(raw), step.req_type)
        self.counts.requests_compared += 1
        self.counts.answers[f"{request_name(step.req_type)} {device_answer}"] += 1
        trace.append(TraceEntry(step, device_answer, model_answer))
        if device_answer != model_answer:
            return [Difference("response", device_answer, model_answer)]
        return []

    def _model_only(self, step: Step, model: DeviceModel, trace: list[TraceEntry]) -> None:
        """A request that breaks QEMU's device: the model must refuse it (virtio_error,
        docs/protocol.md section 1) and is reset, as a driver would reset the device."""
        self.counts.model_only += 1
        try:
            answer = answer_text(model.submit(step.raw()), step.req_type)
        except DeviceBroken:
            model.device_reset()
            trace.append(TraceEntry(step, "not sent", "virtio_error (reset)"))
            return
        trace.append(TraceEntry(step, "not sent", answer))
        raise Mismatch(trace, [Difference("model", "virtio_error expected", answer)])
