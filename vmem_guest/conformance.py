"""Differential conformance fuzzing: a virtio-mem device against the QEMU-faithful model.

``vmem-guest fuzz`` generates sequences of raw requests with hypothesis (PLUG,
UNPLUG, UNPLUG_ALL and STATE with ranges that are valid, misaligned, empty,
overflowing 2**64, outside the usable region or the device region, beyond
``requested_size``, plus any 64-bit address and 16-bit count), sends each
sequence to the device under test and to a :class:`~vmem_guest.sim.DeviceModel`
built from the device's own config, and compares after every request: the
response type, the STATE answer, and every config field (``plugged_size``,
``usable_region_size``, ``requested_size``, geometry). A mismatch is shrunk by
hypothesis to a minimal sequence, reported, and saved as a regression example.

What is sent where:

* Requests that would break QEMU's device (``virtio_error``: shorter than 24
  bytes, unknown type) go to the model only; the model must refuse them
  (DeviceBroken) and is then reset, as a driver would reset the device.
* Host resizes (``qom-set requested-size``) need the host. The device under
  test is resized through a ``resize`` callback; without one the fuzzer works
  within the current ``requested_size`` and generates no resizes. In a guest,
  :class:`HostResizeFiles` asks a harness on the host through a shared
  directory (``vmem-guest fuzz --host-resize DIR``, served by
  ``scripts/conformance.py``); the unit tests resize a second model.

The device is left as it was found: the fuzzer starts only when
``plugged_size`` is 0 (it never unplugs memory it did not plug), sends
UNPLUG_ALL after every example (and restores ``requested_size`` when it
resized), and never probes or onlines anything: plugged memory is never
touched by the guest. An UNPLUG_ALL may shrink ``usable_region_size`` to what
the current ``requested_size`` implies (the spec allows it; QEMU does it).

:func:`fuzz` is the engine over any :class:`~vmem_guest.device.RequestChannel`;
:func:`fuzz_pci_device` wraps it for a real PCI function (checks, lock, VFIO).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.errors import Flaky

from vmem_guest import spec
from vmem_guest.device import RequestChannel, parse_response
from vmem_guest.errors import DeviceBroken, ResponseError, TrackerLocked, UsageError, VmemError
from vmem_guest.sim.device_model import USABLE_EXTENT_X86, DeviceModel
from vmem_guest.spec import RequestType, ResponseType

log = logging.getLogger("vmem_guest.conformance")

TOP = 1 << 64
#: Default number of hypothesis examples and the longest generated sequence.
DEFAULT_EXAMPLES = 100
DEFAULT_MAX_STEPS = 40
#: How often an UNPLUG_ALL that answers BUSY is retried during cleanup.
CLEANUP_ATTEMPTS = 20
CLEANUP_BACKOFF = 0.05

#: Config fields compared after every request (the padding is not).
CONFIG_FIELDS = (
    "block_size",
    "node_id",
    "addr",
    "region_size",
    "usable_region_size",
    "plugged_size",
    "requested_size",
)

#: Host-side resize of the device under test: set ``requested_size`` (bytes).
Resize = Callable[[int], None]

_REQUEST_NAMES = {int(t): t.name for t in RequestType}
_PLUG, _UNPLUG = int(RequestType.PLUG), int(RequestType.UNPLUG)
_UNPLUG_ALL, _STATE = int(RequestType.UNPLUG_ALL), int(RequestType.STATE)
_RANGE_TYPES = (_PLUG, _UNPLUG, _STATE)
_SCALE = 1 << 16  # fractions are drawn as integers in [0, _SCALE)


# -- steps: what a sequence is made of ------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    """One concrete input: a request (to both sides), a malformed request (model
    only) or a host resize.

    ``kind`` says how it was generated (``valid``, ``misaligned``, ...), for people.
    """

    op: str  # "request", "malformed" or "resize"
    req_type: int = 0
    addr: int = 0
    nb_blocks: int = 0
    length: int = spec.VirtioMemReq.SPEC_SIZE
    size: int = 0
    kind: str = ""

    def raw(self) -> bytes:
        """The request bytes (truncated to ``length`` for a malformed one)."""
        full = bytearray(spec.encode_request(RequestType.PLUG, self.addr, self.nb_blocks))
        full[0:2] = self.req_type.to_bytes(2, "little")
        return bytes(full[: self.length])

    def describe(self) -> str:
        if self.op == "resize":
            return f"host resize requested-size={self.size:#x}"
        name = _REQUEST_NAMES.get(self.req_type, f"type={self.req_type}")
        text = (
            name
            if self.req_type == _UNPLUG_ALL
            else (f"{name} addr={self.addr:#x} nb_blocks={self.nb_blocks}")
        )
        if self.op == "malformed":
            text += f" ({self.length} bytes, model only)"
        return f"{text} [{self.kind}]" if self.kind else text

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


@dataclasses.dataclass(frozen=True)
class Action:
    """What hypothesis draws: a kind of step and raw numbers, resolved into a
    :class:`Step` against the model's state when the step runs (so shrinking
    keeps sequences meaningful: "plug some free blocks", not a fixed address)."""

    kind: str
    req_type: int = 0
    a: int = 0
    b: int = 0


#: Range kinds whose request type is drawn (PLUG, UNPLUG or STATE).
RANGE_KINDS = (
    "valid",
    "misaligned",
    "zero",
    "overflow",
    "below",
    "at_usable_end",
    "straddle",
    "beyond_region",
)


#: How often each kind is drawn (repeats weigh; the first is where shrinking goes).
WEIGHTED_KINDS = (
    ("state_plugged", 2),
    ("plug_free", 5),
    ("unplug_plugged", 4),
    ("plug_beyond_requested", 1),
    ("unplug_all", 1),
    ("any", 2),
    ("short", 1),
    ("unknown_type", 1),
    ("state_around", 2),
    *((kind, 2 if kind == "valid" else 1) for kind in RANGE_KINDS),
)


def action_strategy(resizable: bool) -> st.SearchStrategy[Action]:
    """One generated step; resizes only when the device under test can be resized."""
    frac = st.integers(0, _SCALE - 1)
    range_params = st.builds(Action, st.just(""), st.sampled_from(_RANGE_TYPES), frac, frac)
    params: dict[str, st.SearchStrategy[Action]] = {
        "any": st.builds(
            Action,
            st.just("any"),
            st.integers(0, 3),
            st.integers(0, TOP - 1),
            st.integers(0, spec.MAX_BLOCKS_PER_REQUEST),
        ),
        "short": st.builds(Action, st.just("short"), st.integers(0, 3), st.integers(0, 23)),
        "unknown_type": st.builds(Action, st.just("unknown_type"), st.integers(4, 0xFFFF)),
        "unplug_all": st.just(Action("unplug_all", _UNPLUG_ALL)),
        "resize": st.builds(Action, st.just("resize"), st.just(0), frac),
    }
    kinds = [kind for kind, weight in WEIGHTED_KINDS for _ in range(weight)]
    if resizable:
        kinds += ["resize"] * 3

    def with_params(kind: str) -> st.SearchStrategy[Action]:
        if kind in params:
            return params[kind]
        return range_params.map(lambda a: dataclasses.replace(a, kind=kind))

    return st.sampled_from(kinds).flatmap(with_params)


def _frac(value: int, n: int) -> int:
    """``value`` in [0, _SCALE) scaled to [0, n)."""
    return value * n // _SCALE


def _runs(bitmap: bytes, want: int, limit: int) -> list[int]:
    """Indices below ``limit`` whose bitmap byte is ``want``."""
    return [i for i in range(min(limit, len(bitmap))) if bitmap[i] == want]


def resolve(action: Action, model: DeviceModel) -> Step:
    """The concrete step for ``action`` given the model's current state."""
    bs = model.block_size
    addr = model.addr
    usable_blocks = model.usable_region_size // bs
    usable_end = addr + model.usable_region_size
    kind, a, b = action.kind, action.a, action.b
    max_nb = spec.MAX_BLOCKS_PER_REQUEST

    def req(req_type: int, gpa: int, nb: int) -> Step:
        return Step("request", req_type, gpa % TOP, max(0, min(nb, max_nb)), kind=kind)

    if kind == "unplug_all":
        return Step("request", _UNPLUG_ALL, kind=kind)
    if kind == "resize":
        return Step("resize", size=_frac(a, model.nr_blocks + 1) * bs, kind=kind)
    if kind == "short":
        return Step("malformed", action.req_type, addr, 1, length=a, kind=kind)
    if kind == "unknown_type":
        return Step("malformed", action.req_type, addr, 1, kind=kind)
    if kind == "any":
        return req(action.req_type, a, b)
    bitmap = model.bitmap()
    if kind in ("plug_free", "unplug_plugged", "state_plugged"):
        want = 0 if kind == "plug_free" else 1
        candidates = _runs(bitmap, want, usable_blocks)
        req_type = {"plug_free": _PLUG, "unplug_plugged": _UNPLUG}.get(kind, _STATE)
        if not candidates:
            return req(req_type, addr, 1)
        first = candidates[_frac(a, len(candidates))]
        room = model.requested_size // bs - model.plugged_size // bs
        longest = max(1, room) if kind == "plug_free" else usable_blocks
        nb = 1
        target = 1 + _frac(b, longest)
        while nb < target and first + nb < usable_blocks and bitmap[first + nb] == want:
            nb += 1
        return req(req_type, addr + first * bs, nb)
    if kind == "state_around":  # a plugged block and its neighbours: often MIXED
        plugged = _runs(bitmap, 1, usable_blocks)
        first = plugged[_frac(a, len(plugged))] if plugged else 0
        first = max(0, first - 1 - b % 2)
        return req(_STATE, addr + first * bs, 2 + b % 8)
    if kind == "plug_beyond_requested":
        room = max(0, model.requested_size // bs - model.plugged_size // bs)
        first = _frac(a, max(usable_blocks, 1))
        return req(_PLUG, addr + first * bs, room + 1 + b % 16)
    first = _frac(a, max(usable_blocks, 1))
    nb = 1 + _frac(b, max(1, min(usable_blocks - first, max_nb)))
    req_type = action.req_type
    if kind == "valid":
        return req(req_type, addr + first * bs, nb)
    if kind == "misaligned":
        offset = (b * 4096) % bs or bs // 2
        return req(req_type, addr + first * bs + offset, 1 + b % 4)
    if kind == "zero":
        return req(req_type, addr + first * bs, 0)
    if kind == "overflow":
        k = a % 4 + 1
        return req(req_type, TOP - k * bs, k - 1 + b % 4)
    if kind == "below":
        return req(req_type, addr - (a % 4 + 1) * bs, 1 + b % 4)
    if kind == "at_usable_end":
        return req(req_type, usable_end + (a % 3) * bs, 1 + b % 4)
    if kind == "straddle":
        k = a % 4 + 1
        return req(req_type, usable_end - k * bs, k + 1 + b % 4)
    if kind == "beyond_region":
        return req(req_type, addr + model.region_size + (a % 3) * bs, 1 + b % 4)
    raise ValueError(f"unknown action kind {kind!r}")


# -- comparing one step ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Difference:
    """One thing the device and the model disagree on."""

    what: str
    device: str
    model: str

    def as_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TraceEntry:
    """A step as it ran: what each side answered."""

    step: Step
    device: str
    model: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step.as_dict(),
            "text": self.step.describe(),
            "device": self.device,
            "model": self.model,
        }


class Mismatch(Exception):
    """The device under test and the model disagree after the last step of ``trace``."""

    def __init__(self, trace: Sequence[TraceEntry], differences: Sequence[Difference]) -> None:
        self.trace = list(trace)
        self.differences = list(differences)
        #: The device's config when the example started (set by Checker.run_example).
        self.start_config: dict[str, int] = {}
        last = self.trace[-1].step.describe() if self.trace else "the start of an example"
        what = "; ".join(f"{d.what}: device {d.device}, model {d.model}" for d in differences)
        super().__init__(f"after {last}: {what}")


class DeviceLost(BaseException):
    """The device under test stopped answering (timeout, broken queue): no shrinking.

    A BaseException so that hypothesis does not catch it as a test failure and
    keep sending requests to a device that cannot answer.
    """

    def __init__(self, trace: Sequence[TraceEntry], reason: str) -> None:
        super().__init__(reason)
        self.trace = list(trace)
        self.reason = reason


def _answer_text(raw: bytes, req_type: int) -> str:
    try:
        response = parse_response(raw, RequestType(req_type))
    except ResponseError as exc:
        return f"invalid response {raw.hex()} ({exc.message})"
    if response.state is not None:
        return f"{response.type.name} {response.state.name}"
    return response.type.name


def _config_fields(raw: bytes) -> dict[str, int]:
    if len(raw) < spec.VirtioMemConfig.SPEC_SIZE:
        return {}
    cfg = spec.VirtioMemConfig.from_buffer_copy(raw[: spec.VirtioMemConfig.SPEC_SIZE])
    return {name: int(getattr(cfg, name)) for name in CONFIG_FIELDS}


def config_differences(device_raw: bytes, model_raw: bytes) -> list[Difference]:
    """Every config field that differs (``config.<field>``), values in hex."""
    device, model = _config_fields(device_raw), _config_fields(model_raw)
    if not device:
        return [Difference("config", f"{len(device_raw)} bytes", "56 bytes")]
    return [
        Difference(f"config.{name}", f"{device[name]:#x}", f"{model[name]:#x}")
        for name in CONFIG_FIELDS
        if device[name] != model[name]
    ]


# -- the checker: one device, many examples -----------------------------------------


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
    256 MiB).
    """

    def __init__(
        self,
        device: RequestChannel,
        *,
        resize: Resize | None = None,
        usable_margin: int = USABLE_EXTENT_X86,
        model_factory: Callable[..., DeviceModel] = DeviceModel,
    ) -> None:
        self.device = device
        self.resize = resize
        self.usable_margin = usable_margin
        self.model_factory = model_factory
        self.counts = Counts()
        initial = _config_fields(device.read_config())
        self.initial_requested = initial.get("requested_size", 0)
        self._requested = self.initial_requested

    # -- the device under test --

    def _submit(self, raw: bytes, trace: list[TraceEntry], step: Step) -> bytes:
        try:
            return self.device.submit(raw)
        except VmemError as exc:
            trace.append(TraceEntry(step, f"no answer: {exc.message}", "-"))
            raise DeviceLost(trace, exc.message) from exc

    def clean(self) -> None:
        """Bring the device back to the example's start: requested restored, UNPLUG_ALL.

        Raises DeviceLost when UNPLUG_ALL is not ACKed (after BUSY retries) or
        ``plugged_size`` is not 0 afterwards.
        """
        trace: list[TraceEntry] = []
        if self.resize is not None and self._requested != self.initial_requested:
            restore = Step("resize", size=self.initial_requested, kind="cleanup")
            try:
                self.resize(self.initial_requested)
            except VmemError as exc:
                trace.append(TraceEntry(restore, f"resize failed: {exc.message}", "-"))
                raise DeviceLost(trace, exc.message) from exc
            self._requested = self.initial_requested
        step = Step("request", _UNPLUG_ALL, kind="cleanup")
        answer = ""
        for attempt in range(CLEANUP_ATTEMPTS):
            self.counts.cleanup_requests += 1
            answer = _answer_text(self._submit(step.raw(), trace, step), _UNPLUG_ALL)
            if answer != ResponseType.BUSY.name:
                break
            time.sleep(CLEANUP_BACKOFF * (attempt + 1))
        plugged = _config_fields(self.device.read_config()).get("plugged_size")
        if answer != ResponseType.ACK.name or plugged != 0:
            trace.append(TraceEntry(step, f"{answer}, plugged_size {plugged}", "ACK, 0"))
            raise DeviceLost(trace, f"cleanup UNPLUG_ALL answered {answer}, plugged {plugged}")

    def new_model(self) -> DeviceModel:
        """A model in the device's current state, which must have nothing plugged.

        Geometry and ``requested_size`` come from the device's config. A usable
        region larger than ``requested_size`` implies (the host asked for more
        earlier, and nothing shrank it since) is reached the way QEMU reaches it:
        the model is built for a larger request and resized down, which keeps
        the usable region. A usable region no history explains is left to the
        start-of-example comparison to report.
        """
        cfg = _config_fields(self.device.read_config())
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
        start_raw = self.device.read_config()
        try:
            model = self.new_model()
            start = config_differences(start_raw, model.read_config())
            if start:
                raise Mismatch(trace, start)
            for action in actions:
                self.run_step(resolve(action, model), model, trace)
            # The way back, compared too: what it leaves behind is checked in this example.
            if self.resize is not None and model.requested_size != self.initial_requested:
                restore = Step("resize", size=self.initial_requested, kind="restore")
                self.run_step(restore, model, trace)
            self.run_step(Step("request", _UNPLUG_ALL, kind="end of example"), model, trace)
        except Mismatch as exc:
            exc.start_config = _config_fields(start_raw)
            self.clean()
            raise
        except DeviceLost:
            raise
        except BaseException:
            self.clean()
            raise
        self.clean()
        return trace

    def run_step(self, step: Step, model: DeviceModel, trace: list[TraceEntry]) -> None:
        if step.op == "malformed":
            self._model_only(step, model, trace)
            return
        if step.op == "resize":
            if self.resize is None:
                raise ValueError("a resize step needs a resize callback")
            try:
                self.resize(step.size)
            except VmemError as exc:
                trace.append(TraceEntry(step, f"resize failed: {exc.message}", "-"))
                raise DeviceLost(trace, exc.message) from exc
            self._requested = step.size
            model.resize(step.size)
            self.counts.resizes += 1
            trace.append(TraceEntry(step, "done", "done"))
        else:
            raw = step.raw()
            device_answer = _answer_text(self._submit(raw, trace, step), step.req_type)
            model_answer = _answer_text(model.submit(raw), step.req_type)
            self.counts.requests_compared += 1
            name = _REQUEST_NAMES.get(step.req_type, str(step.req_type))
            self.counts.answers[f"{name} {device_answer}"] += 1
            trace.append(TraceEntry(step, device_answer, model_answer))
            if device_answer != model_answer:
                raise Mismatch(trace, [Difference("response", device_answer, model_answer)])
        differences = config_differences(self.device.read_config(), model.read_config())
        if differences:
            raise Mismatch(trace, differences)

    def _model_only(self, step: Step, model: DeviceModel, trace: list[TraceEntry]) -> None:
        """A request that breaks QEMU's device: the model must refuse it (virtio_error)."""
        self.counts.model_only += 1
        try:
            answer = _answer_text(model.submit(step.raw()), step.req_type)
        except DeviceBroken:
            model.device_reset()
            trace.append(TraceEntry(step, "not sent", "virtio_error (reset)"))
            return
        trace.append(TraceEntry(step, "not sent", answer))
        raise Mismatch(trace, [Difference("model", "virtio_error expected", answer)])


# -- the hypothesis run ---------------------------------------------------------------


@dataclasses.dataclass
class FuzzResult:
    """The outcome of :func:`fuzz`."""

    seed: int
    max_examples: int
    counts: Counts
    geometry: dict[str, int]
    #: The shrunk mismatch (or the sequence that lost the device), if any.
    mismatch: Mismatch | None = None
    lost: DeviceLost | None = None
    flaky: bool = False
    saved: Path | None = None
    device: str = ""

    @property
    def mismatches(self) -> int:
        return int(self.mismatch is not None or self.lost is not None)

    def as_dict(self) -> dict[str, Any]:
        failure: dict[str, Any] | None = None
        if self.mismatch is not None:
            failure = {
                "differences": [d.as_dict() for d in self.mismatch.differences],
                "sequence": [t.as_dict() for t in self.mismatch.trace],
                "start_config": self.mismatch.start_config,
                "flaky": self.flaky,
            }
        elif self.lost is not None:
            failure = {
                "device_lost": self.lost.reason,
                "sequence": [t.as_dict() for t in self.lost.trace],
            }
        return {
            "device": self.device,
            "seed": self.seed,
            "max_examples": self.max_examples,
            "examples": self.counts.examples,
            "requests_compared": self.counts.requests_compared,
            "model_only_requests": self.counts.model_only,
            "resizes": self.counts.resizes,
            "cleanup_requests": self.counts.cleanup_requests,
            "answers": dict(sorted(self.counts.answers.items())),
            "mismatches": self.mismatches,
            "mismatch": failure,
            "saved": str(self.saved) if self.saved else None,
            "geometry": self.geometry,
        }


def fuzz(
    device: RequestChannel,
    *,
    examples: int = DEFAULT_EXAMPLES,
    seed: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    resize: Resize | None = None,
    usable_margin: int = USABLE_EXTENT_X86,
    database: Path | None = None,
    save_dir: Path | None = None,
    model_factory: Callable[..., DeviceModel] = DeviceModel,
) -> FuzzResult:
    """Differential fuzzing of ``device`` against the model; see the module docstring.

    ``device`` must have nothing plugged (UsageError otherwise). ``database``:
    a directory for hypothesis's example database (a saved failure is replayed
    first next time); ``save_dir``: where a mismatch is written as JSON.
    """
    cfg = _config_fields(device.read_config())
    if not cfg:
        raise UsageError("the device's config space is shorter than 56 bytes")
    if cfg["plugged_size"]:
        raise UsageError(
            f"the device has {cfg['plugged_size']:#x} bytes plugged: the fuzzer starts only "
            "from an empty device (unplug it first, e.g. vmem-guest unplug-all)"
        )
    checker = Checker(
        device, resize=resize, usable_margin=usable_margin, model_factory=model_factory
    )
    try:
        checker.new_model()
    except ValueError as exc:
        raise UsageError(f"the model cannot stand for this device: {exc}") from None
    if seed is None:
        seed = random.SystemRandom().randrange(1 << 32)
    result = FuzzResult(seed=seed, max_examples=examples, counts=checker.counts, geometry=cfg)
    steps = action_strategy(resize is not None)
    # A uniform length (st.lists alone averages about 6 steps); shrinks to short ones.
    sequences = st.integers(1, max_steps).flatmap(lambda n: st.lists(steps, min_size=n, max_size=n))
    last_failure: list[Mismatch] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=DirectoryBasedExampleDatabase(str(database)) if database else None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
        verbosity=Verbosity.quiet,
        phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
        print_blob=False,
    )
    @given(sequences)
    def one_example(actions: list[Action]) -> None:
        try:
            checker.run_example(actions)
        except Mismatch as exc:
            last_failure[:] = [exc]
            raise

    test = hypothesis_seed(seed)(one_example)
    try:
        checker.clean()  # usable_region_size as the current requested_size implies
        test()
    except Mismatch as exc:
        result.mismatch = exc
    except Flaky:
        # Failed once, then passed on replay: report the last failure seen.
        result.mismatch = last_failure[0] if last_failure else None
        result.flaky = True
    except DeviceLost as exc:
        result.lost = exc
    if result.mismatches and save_dir is not None:
        result.saved = save_example(result, save_dir)
    return result


def save_example(result: FuzzResult, save_dir: Path) -> Path:
    """Write the failure as ``mismatch-<time>-<seed>.json`` (replay with :func:`replay`)."""
    save_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = save_dir / f"mismatch-{stamp}-{result.seed}.json"
    path.write_text(json.dumps(result.as_dict(), indent=2, sort_keys=True) + "\n")
    return path


def replay(
    device: RequestChannel,
    steps: Sequence[Step],
    *,
    resize: Resize | None = None,
    usable_margin: int = USABLE_EXTENT_X86,
) -> list[TraceEntry]:
    """Run a saved sequence of concrete steps once; raise Mismatch as :func:`fuzz` finds it."""
    checker = Checker(device, resize=resize, usable_margin=usable_margin)
    checker.clean()
    trace: list[TraceEntry] = []
    try:
        model = checker.new_model()
        for step in steps:
            checker.run_step(step, model, trace)
    finally:
        checker.clean()
    return trace


def load_steps(path: Path) -> list[Step]:
    """The request sequence of a file written by :func:`save_example`."""
    data = json.loads(path.read_text())
    failure = data.get("mismatch") or {}
    return [Step.from_dict(entry["step"]) for entry in failure.get("sequence", [])]


# -- host resizes from a guest: a file rendezvous with a harness on the host ----------


#: How long a guest waits for the host to carry out a resize.
HOST_RESIZE_TIMEOUT = 60.0


class HostResizeFiles:
    """A :data:`Resize` callback for a guest: ask a host-side harness through files.

    ``directory`` is shared with the host (the test VM's writable 9p share). For
    each resize the guest writes ``resize-<n>.json`` (``{"size": bytes}``, by
    rename so it appears whole) and waits for the host to set ``requested-size``
    (QMP ``qom-set``) and write ``resize-<n>.done`` (``{"ok": true}`` or
    ``{"error": text}``). The host side is ``scripts/vmharness`` code in
    tests/vm; nothing here talks to QMP.
    """

    def __init__(self, directory: Path, timeout: float = HOST_RESIZE_TIMEOUT) -> None:
        self.directory = directory
        self.timeout = timeout
        self.count = 0

    def __call__(self, size: int) -> None:
        self.count += 1
        request = self.directory / f"resize-{self.count}.json"
        done = request.with_suffix(".done")
        partial = request.with_suffix(".tmp")
        partial.write_text(json.dumps({"size": size}))
        os.rename(partial, request)
        deadline = time.monotonic() + self.timeout
        while not done.exists():
            if time.monotonic() > deadline:
                raise UsageError(
                    f"the host did not answer resize request {request} in {self.timeout:g} s"
                )
            time.sleep(0.005)
        answer = json.loads(done.read_text() or "{}")
        if not answer.get("ok"):
            raise UsageError(f"the host refused resize to {size:#x}: {answer.get('error')}")


# -- the real device ------------------------------------------------------------------


@contextlib.contextmanager
def device_lock(state_dir: Path, bdf: str) -> Iterator[None]:
    """Hold the device's tracker lock (the one the agent holds) while fuzzing.

    UsageError when another process (the agent, a manual command) owns the device.
    """
    from vmem_guest.tracker import device_locked

    try:
        with device_locked(state_dir, bdf):
            yield
    except TrackerLocked as exc:
        holder = exc.fields.get("holder_pid") or "?"
        raise UsageError(
            f"device {bdf} is owned by another vmem-guest process (pid {holder}); "
            "stop the agent before fuzzing its device",
            device=bdf,
        ) from None


def kernel_virtio_driver(pci_dir: Path) -> str | None:
    """The virtio driver (``virtio_mem``) bound under a PCI function, if any."""
    for child in sorted(pci_dir.glob("virtio*")):
        link = child / "driver"
        if link.exists():
            return os.path.basename(os.readlink(link))
    return None


def online_blocks_in(
    memory_root: Path, addr: int, region_size: int, memory_block_size: int
) -> list[int]:
    """Online memory blocks overlapping [addr, addr + region_size)."""
    first = addr // memory_block_size
    last = (addr + region_size - 1) // memory_block_size
    found = []
    for index in range(first, last + 1):
        state = memory_root / f"memory{index}" / "state"
        try:
            if state.read_text().strip() == "online":
                found.append(index)
        except FileNotFoundError:
            continue
    return found


def fuzz_pci_device(
    bdf: str | None,
    *,
    allow_noiommu: bool,
    state_dir: Path,
    examples: int = DEFAULT_EXAMPLES,
    seed: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    results_dir: Path | None = None,
    resize: Resize | None = None,
) -> FuzzResult:
    """``vmem-guest fuzz``: the engine against a real virtio-mem PCI function.

    ``resize``: how to change the device's ``requested_size`` from the host
    (:class:`HostResizeFiles` with a harness); None: no resizes.

    Refuses (UsageError) when the device is owned by another vmem-guest process,
    bound to the in-kernel virtio-mem driver, has memory online or anything
    plugged. Binds it to vfio-pci like the agent, raw requests only, nothing
    probed or onlined; UNPLUG_ALL after every example.
    """
    from vmem_guest import discovery
    from vmem_guest.hotplug import SYSFS_MEMORY, SysfsMemory
    from vmem_guest.transport.channel import PciChannel
    from vmem_guest.transport.dma import no_unevictable_compaction
    from vmem_guest.transport.vfio import Mode

    if bdf is None:
        found = discovery.list_devices()
        if len(found) != 1:
            names = ", ".join(d.bdf for d in found) or "none"
            raise UsageError(f"choose a device with --device (virtio-mem devices: {names})")
        bdf = found[0].bdf
    dev = discovery.get_device(bdf)
    results = results_dir or state_dir / "conformance"
    with device_lock(state_dir, dev.bdf):
        owner = kernel_virtio_driver(dev.sysfs_path)
        if owner is not None:
            raise UsageError(
                f"{dev.bdf} is driven by the in-kernel {owner} driver: it owns the device's "
                "memory; the fuzzer needs a device no driver uses"
            )
        discovery.bind(dev.bdf, allow_noiommu=allow_noiommu)
        kind = discovery.get_device(dev.bdf).iommu_kind
        mode: Mode = "type1" if kind == "type1" else "noiommu"
        memory_block = SysfsMemory().block_size()
        with no_unevictable_compaction():
            with PciChannel.open(dev.bdf, mode=mode) as channel:
                cfg = _config_fields(channel.read_config())
                online = online_blocks_in(
                    SYSFS_MEMORY, cfg["addr"], cfg["region_size"], memory_block
                )
                if online:
                    raise UsageError(
                        f"memory blocks {online} of {dev.bdf}'s region are online: the "
                        "fuzzer runs only on a device whose memory nobody uses"
                    )
                log.info("fuzzing %s: %s", dev.bdf, cfg)
                result = fuzz(
                    channel,
                    examples=examples,
                    seed=seed,
                    max_steps=max_steps,
                    resize=resize,
                    database=results / "hypothesis",
                    save_dir=results,
                )
            result.device = dev.bdf
            if result.lost is not None:
                # Closing reset the device (status 0 keeps blocks): try UNPLUG_ALL again.
                log.warning("device lost; trying UNPLUG_ALL after a reset")
                with (
                    contextlib.suppress(VmemError),
                    PciChannel.open(dev.bdf, mode=mode) as fresh,
                ):
                    fresh.submit(spec.encode_request(RequestType.UNPLUG_ALL))
            return result
