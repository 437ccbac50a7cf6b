"""Model against model: the conformance fuzzer with profile P's model against a
simulated device of profile Q (``vmem-guest fuzz --profile P --device-model Q``).

No VM: the device under test is a :class:`~vmem_guest.sim.DeviceModel` with Q's
rules, fresh for every example. The fuzzer finds a difference and shrinks it;
the difference is then *attributed*: the shrunk sequence is replayed with one of
P's rules (then two) replaced by Q's, and the field whose adoption makes it pass
is the behaviour that differs. P adopts it and the fuzzer runs again, until it
finds nothing more. Every rule in which P and Q differ must be found so
(:attr:`CrossReport.missing` otherwise), and every difference found must be one
of them (:attr:`CrossReport.unexplained` otherwise).

Beyond what :class:`~vmem_guest.conformance.checker.Checker` compares, both
sides here also receive the requests that break QEMU's device (short, unknown
type: each side's outcome is compared, then both are reset as a driver would),
host resizes the device refuses, and the count of config interrupts.

Two behaviours need more than 65,535 blocks (counts cast to 16 bits); random
sequences on such a region do not reach them, so a directed probe per behaviour
(:data:`PROBES`) runs after the random rounds, attributed the same way. BUSY is
not injected (it is random on both sides): which requests can answer BUSY, like
features and block sizes, is compared as profile data (:func:`static_differences`).
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections.abc import Callable, Sequence
from typing import Any

from vmem_guest.conformance.checker import Checker
from vmem_guest.conformance.compare import answer_text, config_differences
from vmem_guest.conformance.findings import Difference, Mismatch, TraceEntry
from vmem_guest.conformance.result import FuzzResult
from vmem_guest.conformance.run import _run as run_hypothesis
from vmem_guest.conformance.steps import PLUG, STATE, UNPLUG, UNPLUG_ALL, Step
from vmem_guest.errors import DeviceBroken, DeviceTimeout
from vmem_guest.sim.device_model import USABLE_EXTENT_X86, DeviceModel
from vmem_guest.sim.profiles import DeviceProfile
from vmem_guest.sim.rules import ModelRules
from vmem_guest.spec import ResponseType

MiB, GiB = 1 << 20, 1 << 30
#: The random rounds' device: 1 GiB of 2 MiB blocks (every profile accepts it).
GEOMETRY = {"addr": 4 * GiB, "region_size": 1 * GiB, "block_size": 2 * MiB, "node_id": 0}
#: The probes' device: 65,536 + 64 blocks of 2 MiB (a multiple of 128 MiB).
BIG_BLOCKS = (1 << 16) + 64
BIG_GEOMETRY = {**GEOMETRY, "region_size": BIG_BLOCKS * 2 * MiB}
#: Rules not compared by fuzzing (BUSY is not injected): compared as data.
STATIC_RULES = frozenset({"busy_requests", "busy_unplug_all_when_empty"})
#: Profile fields compared as data (negotiation and configuration).
STATIC_FIELDS = ("default_features", "required_features", "acpi_pxm", "block_sizes")

#: The spec's word on each rule (oasis-tcs/virtio-spec, device-types/mem/description.tex,
#: docs/device-profiles.md): the level at stake when a device departs from QEMU's
#: value, and the subsection. "none": the spec says nothing normative, so a
#: difference there is a difference from the profile only.
SPEC_WORD: dict[str, tuple[str, str]] = {
    "plug_beyond_requested": ("none", "section intro: plug requests 'will be rejected'"),
    "requested_check_first": ("MUST", "PLUG request: ERROR if not aligned or outside usable"),
    "empty_plug_nack": ("MUST", "PLUG request: ERROR if nb_blocks is not greater than 0"),
    "unplug_nack_below_requested": ("MUST", "UNPLUG request: ACK when unplugged; ERROR for 0"),
    "usable_policy": ("none", "configuration layout: the device MAY change it, grow only"),
    "slot_size": ("none", "configuration layout: the device MAY change usable_region_size"),
    "unplug_all_usable": ("MUST", "configuration layout: usable_region_size >= requested_size"),
    "unplug_all_count_u16": ("MUST", "UNPLUG ALL: ACK only if all unplugged; plugged_size"),
    "unplug_all_by_runs": ("MUST", "UNPLUG ALL request: ACK when all unplugged (or BUSY)"),
    "unplug_all_run_u16": ("MUST", "UNPLUG ALL request: plugged_size 0 when ACKed"),
    "short_request": ("none", "device operation: all requests are 24 bytes long"),
    "unknown_request": ("none", "not specified"),
    "reset_forgets_blocks": ("MUST", "device initialization: no block state change on reset"),
    "resize_same_refused": ("none", "configuration layout: MAY notify when nothing changed"),
}


class ModelDevice:
    """A device of profile Q for the checker: a fresh model for every example,
    config interrupts counted."""

    def __init__(self, profile: DeviceProfile, rules: ModelRules, geometry: dict[str, int]):
        self.profile = profile
        self.rules = rules
        self.geometry = geometry
        self.model = self._fresh()
        self.interrupts = 0
        self.refused = False

    def _fresh(self) -> DeviceModel:
        model = DeviceModel(rules=self.rules, rng=random.Random(0), **self.geometry)
        model.on_config_change = self._count
        return model

    def _count(self) -> None:
        self.interrupts += 1

    def renew(self) -> None:
        """A new device in its initial state (the examples are independent)."""
        self.model = self._fresh()
        self.interrupts = 0

    def read_config(self) -> bytes:
        return self.model.read_config()

    def submit(self, request: bytes) -> bytes:
        return self.model.submit(request)

    def resize(self, requested_size: int) -> None:
        """The host's resize; a size the device refuses changes nothing
        (:attr:`refused` says so)."""
        self.refused = False
        try:
            self.model.resize(requested_size)
        except ValueError:
            self.refused = True


def outcome(model: DeviceModel | ModelDevice, raw: bytes, req_type: int) -> str:
    """What a request leads to, as compared: the answer, or why there is none."""
    known = req_type if req_type in (PLUG, UNPLUG, UNPLUG_ALL, STATE) else PLUG
    try:
        return answer_text(model.submit(raw), known)  # an unknown type: its response type
    except DeviceTimeout:
        return "no answer (the device goes on)"
    except DeviceBroken as exc:
        return "no answer, device needs a reset" + (
            " (DEVICE_NEEDS_RESET)" if "protocol violation" in exc.message else ""
        )


class CrossChecker(Checker):
    """A :class:`Checker` whose device is a :class:`ModelDevice`: malformed requests,
    refused resizes and config interrupts are compared too."""

    device: ModelDevice

    def __init__(self, device: ModelDevice, rules: ModelRules) -> None:
        self.rules = rules
        self.model_interrupts = 0
        super().__init__(device, resize=device.resize, usable_margin=USABLE_EXTENT_X86)
        self.model_factory = self._model

    def _model(self, **geometry: Any) -> DeviceModel:
        model = DeviceModel(rules=self.rules, rng=random.Random(0), **geometry)
        model.on_config_change = self._count_model_interrupt
        return model

    def _count_model_interrupt(self) -> None:
        self.model_interrupts += 1

    def clean(self) -> None:
        """A fresh device replaces any clean-up."""
        self.device.renew()
        self.model_interrupts = 0

    def new_model(self) -> DeviceModel:
        model = super().new_model()
        self.model_interrupts = 0
        return model

    def run_step(self, step: Step, model: DeviceModel, trace: list[TraceEntry]) -> None:
        super().run_step(step, model, trace)
        if self.device.interrupts != self.model_interrupts:
            raise Mismatch(
                trace,
                [
                    Difference(
                        "config interrupts", str(self.device.interrupts), str(self.model_interrupts)
                    )
                ],
            )

    def _resize_step(self, step: Step, model: DeviceModel, trace: list[TraceEntry]) -> None:
        self.device.resize(step.size)
        device_side = "refused" if self.device.refused else "done"
        try:
            model.resize(step.size)
            model_side = "done"
        except ValueError:
            model_side = "refused"
        self.counts.resizes += 1
        trace.append(TraceEntry(step, device_side, model_side))

    def _model_only(self, step: Step, model: DeviceModel, trace: list[TraceEntry]) -> None:
        """Both sides get the request; both are reset after it, as a driver would."""
        self.counts.model_only += 1
        raw = step.raw()
        device_side, model_side = (
            outcome(self.device, raw, step.req_type),
            outcome(model, raw, step.req_type),
        )
        self.device.model.device_reset()
        model.device_reset()
        trace.append(TraceEntry(step, device_side, model_side))
        if device_side != model_side:
            raise Mismatch(trace, [Difference("response", device_side, model_side)])


# -- attribution --------------------------------------------------------------------


def replay(
    device_profile: DeviceProfile,
    device_rules: ModelRules,
    rules: ModelRules,
    steps: Sequence[Step],
    geometry: dict[str, int],
) -> Mismatch | None:
    """Run ``steps`` once from a fresh device and model; the mismatch, or None."""
    device = ModelDevice(device_profile, device_rules, geometry)
    checker = CrossChecker(device, rules)
    trace: list[TraceEntry] = []
    try:
        model = checker.new_model()
        start = config_differences(device.read_config(), model.read_config())
        if start:
            raise Mismatch(trace, start)
        for step in steps:
            checker.run_step(step, model, trace)
    except Mismatch as exc:
        return exc
    return None


def attribute(
    q: DeviceProfile,
    rules: ModelRules,
    candidates: Sequence[str],
    steps: Sequence[Step],
    geometry: dict[str, int],
) -> tuple[str, ...]:
    """The fewest of ``candidates`` (one, else two) whose values from ``q`` make
    ``steps`` pass; () when none does."""
    groups: list[tuple[str, ...]] = [(name,) for name in candidates]
    groups += [(a, b) for i, a in enumerate(candidates) for b in candidates[i + 1 :]]
    for group in groups:
        adopted = dataclasses.replace(rules, **{n: getattr(q.rules, n) for n in group})
        if replay(q, q.rules, adopted, steps, geometry) is None:
            return group
    return ()


# -- findings and the report ---------------------------------------------------------


@dataclasses.dataclass
class Finding:
    """One behaviour in which P's model and Q's device differ."""

    fields: tuple[str, ...]
    found_by: str
    profile_value: str
    device_value: str
    source: str
    differences: list[Difference]
    sequence: list[TraceEntry]

    def as_dict(self) -> dict[str, Any]:
        return {
            "fields": list(self.fields),
            "found_by": self.found_by,
            "profile_value": self.profile_value,
            "device_value": self.device_value,
            "source": self.source,
            "spec": {name: list(SPEC_WORD[name]) for name in self.fields if name in SPEC_WORD},
            "differences": [d.as_dict() for d in self.differences],
            "sequence": [t.as_dict() for t in self.sequence],
        }


@dataclasses.dataclass
class CrossReport:
    """What one run of P's model against Q's device found."""

    profile: str
    device_model: str
    seed: int
    examples: int
    expected: list[str]
    findings: list[Finding] = dataclasses.field(default_factory=list)
    unexplained: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    static: list[dict[str, str]] = dataclasses.field(default_factory=list)

    @property
    def found(self) -> list[str]:
        return [name for f in self.findings for name in f.fields]

    @property
    def missing(self) -> list[str]:
        return [name for name in self.expected if name not in self.found]

    @property
    def ok(self) -> bool:
        """Every expected difference found, nothing else."""
        return not self.missing and not self.unexplained

    def as_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile,
            "device_model": self.device_model,
            "seed": self.seed,
            "examples_per_round": self.examples,
            "expected": self.expected,
            "found": self.found,
            "missing": self.missing,
            "unexplained": self.unexplained,
            "findings": [f.as_dict() for f in self.findings],
            "static_differences": self.static,
            "ok": self.ok,
        }


def fuzz_differences(p: DeviceProfile, q: DeviceProfile) -> list[str]:
    """The rules in which P and Q differ that fuzzing must find: not those Q's other
    rules make invisible (a run's 16-bit cast without run-by-run UNPLUG_ALL, the
    block count's 16-bit cast with it, the slot
    size without the slot policy, where the size check goes when beyond-requested
    is ERROR like a range error)."""
    hidden = set(STATIC_RULES)
    if not q.rules.unplug_all_by_runs:
        hidden.add("unplug_all_run_u16")
    else:  # UNPLUG_ALL by runs of UNPLUGs never clears the bitmap by a block count
        hidden.add("unplug_all_count_u16")
    if q.rules.usable_policy != "slot":
        hidden.add("slot_size")
    if q.rules.plug_beyond_requested is ResponseType.ERROR:
        hidden.add("requested_check_first")
    return [name for name in p.rules.differences(q.rules) if name not in hidden]


def static_differences(p: DeviceProfile, q: DeviceProfile) -> list[dict[str, str]]:
    """Profile data and unfuzzed rules in which P and Q differ, with Q's source line."""
    rows = []
    for name in STATIC_FIELDS:
        if getattr(p, name) != getattr(q, name):
            rows.append(_row(name, getattr(p, name), getattr(q, name), p, q))
    for name in sorted(STATIC_RULES):
        if getattr(p.rules, name) != getattr(q.rules, name):
            rows.append(_row(name, getattr(p.rules, name), getattr(q.rules, name), p, q))
    return rows


def _row(
    name: str, p_value: object, q_value: object, p: DeviceProfile, q: DeviceProfile
) -> dict[str, str]:
    return {
        "field": name,
        "profile_value": _text(p_value),
        "device_value": _text(q_value),
        "source": _source((name,), p, q),
    }


def _text(value: object) -> str:
    if isinstance(value, frozenset):
        names = {0: "PLUG", 1: "UNPLUG", 2: "UNPLUG_ALL", 3: "STATE"}
        return "{" + ", ".join(names.get(v, str(v)) for v in sorted(value)) + "}"
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, int) and not isinstance(value, bool):
        return hex(value)
    return str(value)


def _source(fields: Sequence[str], p: DeviceProfile, q: DeviceProfile) -> str:
    """Where each field's differing value was read (Q's line, else P's)."""
    parts = []
    for name in fields:
        if name in q.sources:
            parts.append(f"{q.name}: {q.source.split()[0]} {q.sources[name]}")
        elif name in p.sources:
            parts.append(f"{p.name}: {p.source.split()[0]} {p.sources[name]}")
    return "; ".join(parts) or "(same as QEMU's)"


#: Directed probes: (the rule it shows, geometry, steps) on a region of more than
#: 65,535 blocks, which random sequences do not reach.
def _probes() -> list[tuple[str, dict[str, int], list[Step]]]:
    base, block = BIG_GEOMETRY["addr"], BIG_GEOMETRY["block_size"]

    def at(index: int) -> int:
        return base + index * block

    # Block 100 lies past the 64 entries a 16-bit count of 65,600 blocks clears. The
    # request covers it whatever the usable region's policy (Firecracker's is the
    # request rounded up to 128 MiB slots: 102 blocks -> 128); the request drops to 0
    # before UNPLUG_ALL (StratoVirt refuses it while requested_size > 0) and comes
    # back after it, to another size than before (Cloud Hypervisor ignores a resize
    # to the current size), since Firecracker's UNPLUG_ALL empties the usable region.
    covering = 102 * block
    return [
        (
            "unplug_all_count_u16",
            BIG_GEOMETRY,
            [
                Step("resize", size=covering, kind="probe"),
                Step("request", PLUG, at(100), 1, kind="probe"),
                Step("resize", size=0, kind="probe"),
                Step("request", UNPLUG_ALL, kind="probe"),
                Step("resize", size=covering - block, kind="probe"),
                Step("request", STATE, at(100), 1, kind="probe"),
            ],
        ),
        (
            "unplug_all_run_u16",
            BIG_GEOMETRY,
            [
                Step("resize", size=(1 << 16) * block, kind="probe"),
                Step("request", PLUG, at(0), 0xFFFF, kind="probe"),
                Step("request", PLUG, at(0xFFFF), 1, kind="probe"),
                Step("resize", size=0, kind="probe"),
                Step("request", UNPLUG_ALL, kind="probe"),
            ],
        ),
    ]


PROBES = _probes()


def cross_fuzz(
    p: DeviceProfile,
    q: DeviceProfile,
    *,
    examples: int = 150,
    seed: int = 0,
    max_steps: int = 40,
    progress: Callable[[str], None] | None = None,
) -> CrossReport:
    """Fuzz P's model against Q's device until nothing more differs; see the module."""
    report = CrossReport(p.name, q.name, seed, examples, fuzz_differences(p, q))
    report.static = static_differences(p, q)
    rules = p.rules
    for round_no in range(len(report.expected) + 3):
        device = ModelDevice(q, q.rules, GEOMETRY)
        checker = CrossChecker(device, rules)
        result = _fuzz_once(checker, device, examples, seed + round_no, max_steps)
        if result is None:
            break
        adopted = _adopt(report, p, q, rules, result, GEOMETRY, f"fuzz round {round_no + 1}")
        if progress is not None and report.findings:
            progress(f"round {round_no + 1}: {'+'.join(report.findings[-1].fields)}")
        if adopted is None:
            return report
        rules = adopted
    for name, geometry, steps in PROBES:
        mismatch = replay(q, q.rules, rules, steps, geometry)
        if mismatch is None:
            continue
        adopted = _adopt(report, p, q, rules, mismatch, geometry, f"probe {name}")
        if adopted is None:
            return report
        rules = adopted
    return report


def _fuzz_once(
    checker: CrossChecker, device: ModelDevice, examples: int, seed: int, max_steps: int
) -> Mismatch | None:
    """One hypothesis run; the shrunk mismatch, or None."""
    result = FuzzResult(
        seed=seed, max_examples=examples, counts=checker.counts, geometry={}, profile=""
    )
    run_hypothesis(checker, result, max_steps=max_steps, database=None)
    if result.lost is not None:
        return Mismatch(result.lost.trace, [Difference("device", result.lost.reason, "answers")])
    return result.mismatch


def _adopt(
    report: CrossReport,
    p: DeviceProfile,
    q: DeviceProfile,
    rules: ModelRules,
    mismatch: Mismatch,
    geometry: dict[str, int],
    found_by: str,
) -> ModelRules | None:
    """Attribute ``mismatch``, record it and return P's rules with Q's values adopted;
    None when no rule explains it (recorded as unexplained)."""
    steps = [entry.step for entry in mismatch.trace]
    candidates = [name for name in rules.differences(q.rules) if name not in STATIC_RULES]
    fields = attribute(q, rules, candidates, steps, geometry)
    if not fields:
        report.unexplained.append(
            {
                "found_by": found_by,
                "differences": [d.as_dict() for d in mismatch.differences],
                "sequence": [t.as_dict() for t in mismatch.trace],
            }
        )
        return None
    report.findings.append(
        Finding(
            fields=fields,
            found_by=found_by,
            profile_value=", ".join(_text(getattr(p.rules, n)) for n in fields),
            device_value=", ".join(_text(getattr(q.rules, n)) for n in fields),
            source=_source(fields, p, q),
            differences=list(mismatch.differences),
            sequence=list(mismatch.trace),
        )
    )
    return dataclasses.replace(rules, **{n: getattr(q.rules, n) for n in fields})


def report_text(report: CrossReport) -> str:
    """The report for people: each difference found, shrunk, with its source line."""
    lines = [
        f"model {report.profile} against device model {report.device_model}"
        f" (seed {report.seed}, {report.examples} examples a round)",
        f"expected differences: {', '.join(report.expected) or 'none'}",
    ]
    for finding in report.findings:
        lines.append("")
        lines.append(
            f"FOUND {'+'.join(finding.fields)} ({finding.found_by}):"
            f" {report.profile} {finding.profile_value} / {report.device_model}"
            f" {finding.device_value}"
        )
        lines.append(f"  source: {finding.source}")
        lines += [
            f"  spec: {SPEC_WORD[name][0]} ({SPEC_WORD[name][1]})"
            for name in finding.fields
            if name in SPEC_WORD
        ]
        lines += [f"  {d.what}: device {d.device}, model {d.model}" for d in finding.differences]
        lines.append("  shrunk sequence (device | model):")
        lines += [
            f"  {i:3}. {e.step.describe()}  ->  {e.device} | {e.model}"
            for i, e in enumerate(finding.sequence, 1)
        ]
    if report.static:
        lines += ["", "profile data that differs (not fuzzed):"]
        lines += [
            f"  {row['field']}: {report.profile} {row['profile_value']} /"
            f" {report.device_model} {row['device_value']}  [{row['source']}]"
            for row in report.static
        ]
    for item in report.unexplained:
        lines += ["", f"UNEXPLAINED difference ({item['found_by']}): {item['differences']}"]
        lines += [f"  {e['text']}  ->  {e['device']} | {e['model']}" for e in item["sequence"]]
    lines.append("")
    lines.append(
        f"found {len(report.found)} of {len(report.expected)} expected"
        f"; missing: {', '.join(report.missing) or 'none'}"
        f"; unexplained: {len(report.unexplained)}"
    )
    return "\n".join(lines)


def cross_fuzz_all(
    p: DeviceProfile, others: Sequence[DeviceProfile], **kwargs: Any
) -> list[CrossReport]:
    """P's model against the device model of every profile in ``others``."""
    return [cross_fuzz(p, q, **kwargs) for q in others if q.name != p.name]
