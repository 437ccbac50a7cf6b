"""The spec oracle: every request, response and config read checked against :data:`RULES`.

:class:`ObservedChannel` sits between the fuzzer and the device under test and
hands each exchange and each config read to an :class:`Oracle`, which runs the
checks of :mod:`~vmem_guest.conformance.rules` against a
:class:`~vmem_guest.conformance.observe.DeviceView` built from the device's own
answers. No model of any implementation takes part: a finding here is the
spec's word, whatever profile the fuzzer compares with.

The checker takes the oracle's new :class:`Violation` objects after every step
(:meth:`Oracle.take`), gives them the sequence that led there, and keeps, per
rule, the shortest such sequence seen in the run (:class:`SpecFindings`).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from vmem_guest.conformance.findings import TraceEntry
from vmem_guest.conformance.observe import ConfigSeen, DeviceView, Exchange, Request
from vmem_guest.conformance.rules import CONFIG_RULES, EXCHANGE_RULES, Rule
from vmem_guest.spec import ResponseType


@runtime_checkable
class GenerationSource(Protocol):
    """A channel that can tell the transport's ``config_generation`` (spec 4.1.4.3)."""

    def config_generation(self) -> int:
        """The ``config_generation`` the device presents now."""


@dataclasses.dataclass(frozen=True)
class Violation:
    """A rule the device broke: what was seen, and the sequence that led there."""

    rule: Rule
    detail: str
    trace: tuple[TraceEntry, ...] = ()

    def with_trace(self, trace: Sequence[TraceEntry]) -> Violation:
        return dataclasses.replace(self, trace=tuple(trace))

    def as_dict(self) -> dict[str, Any]:
        rule = self.rule
        return {
            "rule": rule.id,
            "section": rule.section,
            "title": rule.title,
            "level": str(rule.level),
            "source": rule.source,
            "sentence": rule.sentence,
            "detail": self.detail,
            "sequence": [entry.as_dict() for entry in self.trace],
        }


class Oracle:
    """Checks every observed exchange and config read; see the module docstring.

    ``exchanges`` and ``config_reads`` count what was checked, ``generations``
    the config reads that came with a ``config_generation``.
    """

    def __init__(self) -> None:
        self.view = DeviceView()
        self.exchanges = 0
        self.config_reads = 0
        self.generations = 0
        self._pending: list[Violation] = []

    def observe_exchange(self, request: bytes, response: bytes) -> None:
        """One request and the device's response, checked, then recorded in the view."""
        self.exchanges += 1
        exchange = Exchange(Request.parse(request), bytes(response), self.view.last)
        found = [
            Violation(rule, detail)
            for rule in EXCHANGE_RULES
            if rule.on_exchange is not None
            and (detail := rule.on_exchange(exchange, self.view)) is not None
        ]
        self.view.apply(exchange)
        # A refusal (NACK, BUSY, ERROR) changed nothing, whatever rule it broke; after
        # any other answer that broke one, the blocks' states are in doubt.
        refused = exchange.answered(ResponseType.NACK, ResponseType.BUSY, ResponseType.ERROR)
        self._found(found, doubt=bool(found) and not refused)

    def observe_config(self, raw: bytes, generation: int | None = None) -> None:
        """One config read, checked, then taken as the view's reference."""
        config = ConfigSeen.parse(raw, generation)
        if config is None:
            return  # too short to hold the fields: the fuzzer refuses such a device
        self.config_reads += 1
        self.generations += generation is not None
        found = [
            Violation(rule, detail)
            for rule in CONFIG_RULES
            if rule.on_config is not None
            and (detail := rule.on_config(config, self.view)) is not None
        ]
        self.view.read(config)
        self._found(found, doubt=any(v.rule.against_history for v in found))

    def _found(self, found: list[Violation], *, doubt: bool) -> None:
        """Keep ``found``. ``doubt``: the device's answer leaves its blocks' states in
        doubt (an ACK that broke a rule, a ``plugged_size`` or STATE the history
        does not explain), so the view forgets them until an ACKed UNPLUG_ALL: no
        train of findings from one cause. A rule that says nothing about blocks
        (``config_generation``, say) leaves them known."""
        self._pending.extend(found)
        if doubt:
            self.view.forget()

    def take(self) -> list[Violation]:
        """The violations found since the last call (without a sequence yet)."""
        found, self._pending = self._pending, []
        return found


class ObservedChannel:
    """A :class:`~vmem_guest.device.RequestChannel` that shows everything to an oracle.

    The ``config_generation`` is read right after each config read when the
    channel can tell it (:class:`GenerationSource`).
    """

    def __init__(self, inner: Any, oracle: Oracle) -> None:
        self.inner = inner
        self.oracle = oracle

    def read_config(self) -> bytes:
        raw: bytes = self.inner.read_config()
        generation = None
        if isinstance(self.inner, GenerationSource):
            generation = self.inner.config_generation()
        self.oracle.observe_config(raw, generation)
        return raw

    def submit(self, request: bytes) -> bytes:
        response: bytes = self.inner.submit(request)
        self.oracle.observe_exchange(request, response)
        return response


@dataclasses.dataclass
class SpecFindings:
    """The run's violations: per rule, how often, and the shortest sequence seen."""

    shortest: dict[str, Violation] = dataclasses.field(default_factory=dict)
    occurrences: Counter[str] = dataclasses.field(default_factory=Counter)

    def record(self, violations: Iterable[Violation], trace: Sequence[TraceEntry]) -> None:
        for violation in violations:
            rule_id = violation.rule.id
            self.occurrences[rule_id] += 1
            kept = self.shortest.get(rule_id)
            if kept is None or len(trace) < len(kept.trace):
                self.shortest[rule_id] = violation.with_trace(trace)

    def violations(self) -> list[Violation]:
        """One per rule broken, each with the shortest sequence seen."""
        return list(self.shortest.values())
