"""The spec oracle (vmem_guest/conformance/rules.py, oracle.py, classify.py).

Every checked rule has a golden pair: a crafted sequence of config reads and
exchanges that breaks it (the rule fires, and nothing else does) and the same
sequence done right (nothing fires). Then the oracle inside the fuzzer: against
the QEMU-faithful model, against deviating models, and the classes of what it finds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from vmem_guest import conformance, spec
from vmem_guest.conformance.classify import FindingClass, classify
from vmem_guest.conformance.oracle import ObservedChannel, Oracle
from vmem_guest.conformance.report_text import fuzz_report_text
from vmem_guest.conformance.rules import RULES, RULES_BY_ID, SECTIONS, Level, Side
from vmem_guest.sim import DeviceModel
from vmem_guest.spec import BlockState, RequestType, ResponseType

MiB = 1 << 20
GiB = 1 << 30
A = 4 * GiB  # the region's start
B = 2 * MiB  # the block size

PLUG, UNPLUG = RequestType.PLUG, RequestType.UNPLUG
UNPLUG_ALL, STATE = RequestType.UNPLUG_ALL, RequestType.STATE
ACK, NACK, BUSY, ERROR = ResponseType.ACK, ResponseType.NACK, ResponseType.BUSY, ResponseType.ERROR

Event = tuple[Any, ...]


def config(gen: int | None = None, **fields: int) -> Event:
    """A config read: region 1 GiB at 4 GiB, 2 MiB blocks, usable 512 MiB, requested
    256 MiB, nothing plugged, unless ``fields`` say otherwise."""
    values = {
        "block_size": B,
        "addr": A,
        "region_size": GiB,
        "usable_region_size": 512 * MiB,
        "plugged_size": 0,
        "requested_size": 256 * MiB,
        **fields,
    }
    return ("config", bytes(spec.VirtioMemConfig(**values)), gen)


def x(req: RequestType, addr: int, nb: int, answer: ResponseType | int, state: int = 0) -> Event:
    """An exchange: a request and the device's answer."""
    raw = bytes(spec.VirtioMemReq(type=req, addr=addr, nb_blocks=nb))
    response = bytes(spec.VirtioMemResp(type=answer, state=state))
    return ("exchange", raw, response)


def fired(events: Sequence[Event]) -> list[str]:
    """The rule ids the oracle reports for ``events``, in order."""
    oracle = Oracle()
    for event in events:
        if event[0] == "config":
            oracle.observe_config(event[1], event[2])
        else:
            oracle.observe_exchange(event[1], event[2])
    return [v.rule.id for v in oracle.take()]


PLUGGED_ONE = [config(), x(PLUG, A, 1, ACK), config(plugged_size=B)]

#: rule id -> (sequences that break it, the same sequence done right).
GOLDEN: dict[str, tuple[list[list[Event]], list[Event]]] = {
    "plug.rejected-at-requested": (
        [[config(requested_size=B), x(PLUG, A, 1, ACK), config(plugged_size=B, requested_size=B),
          x(PLUG, A + B, 1, ACK)]],
        [config(requested_size=B), x(PLUG, A, 1, ACK), config(plugged_size=B, requested_size=B),
         x(PLUG, A + B, 1, NACK)],
    ),
    "config.usable-within-region": (
        [[config(usable_region_size=2 * GiB)]],
        [config(usable_region_size=GiB)],
    ),
    "response.layout": (
        [[config(), x(PLUG, A, 1, 7)],
         [config(), ("exchange", spec.encode_request(PLUG, A, 1), b"\0\0\0\0")]],
        [config(), x(PLUG, A, 1, ACK)],
    ),
    "config.fixed-geometry": (
        [[config(), config(addr=8 * GiB)], [config(), config(node_id=1)]],
        [config(), config(requested_size=512 * MiB)],
    ),
    "config.plugged-size": (
        [[config(), config(plugged_size=B)], [*PLUGGED_ONE, x(PLUG, A + B, 1, NACK),
                                              config(plugged_size=2 * B)]],
        [*PLUGGED_ONE, x(PLUG, A + B, 1, NACK), config(plugged_size=B)],
    ),
    "config.usable-covers-requested": (
        [[config(usable_region_size=256 * MiB, requested_size=512 * MiB)]],
        [config(usable_region_size=512 * MiB, requested_size=512 * MiB)],
    ),
    "config.block-size-power-of-two": (
        [[config(block_size=3 * MiB, addr=3 * GiB, region_size=3 * GiB, usable_region_size=0,
                 requested_size=0)],
         [config(block_size=0)]],
        [config(block_size=1 * MiB)],
    ),
    "config.multiples-of-block-size": (
        [[config(requested_size=3 * MiB)], [config(addr=A + MiB)]],
        [config(requested_size=4 * MiB)],
    ),
    "config.usable-no-shrink": (
        [[config(), config(usable_region_size=256 * MiB)]],
        [config(), x(UNPLUG_ALL, 0, 0, ACK), config(usable_region_size=256 * MiB)],
    ),
    "plug.range-error": (
        [[config(), x(PLUG, A + MiB, 1, NACK)], [config(), x(PLUG, A, 0, ACK)],
         [config(), x(PLUG, A + 512 * MiB - B, 2, NACK)], [config(), x(PLUG, A - B, 1, BUSY)],
         [config(), x(PLUG, (1 << 64) - B, 2, NACK)]],
        [config(), x(PLUG, A + MiB, 1, ERROR), x(PLUG, A, 0, ERROR),
         x(PLUG, A + 512 * MiB - B, 2, ERROR), x(PLUG, A + 512 * MiB - B, 1, ACK)],
    ),
    "plug.plugged-error": (
        [[*PLUGGED_ONE, x(PLUG, A, 1, NACK)], [*PLUGGED_ONE, x(PLUG, A - B + B, 3, BUSY)]],
        [*PLUGGED_ONE, x(PLUG, A, 3, ERROR)],
    ),
    "plug.ack-reflected": (
        [[config(), x(PLUG, A, 1, ACK), config(plugged_size=0)]],
        PLUGGED_ONE,
    ),
    "unplug.range-error": (
        [[config(), x(UNPLUG, A, 0, NACK)], [config(), x(UNPLUG, A + 1, 1, BUSY)]],
        [config(), x(UNPLUG, A, 0, ERROR), x(UNPLUG, A + 1, 1, ERROR)],
    ),
    "unplug.unplugged-error": (
        [[config(), x(UNPLUG, A, 1, ACK)], [*PLUGGED_ONE, x(UNPLUG, A, 2, NACK)]],
        [*PLUGGED_ONE, x(UNPLUG, A, 2, ERROR), x(UNPLUG, A, 1, ACK)],
    ),
    "unplug.ack-reflected": (
        [[*PLUGGED_ONE, x(UNPLUG, A, 1, ACK), config(plugged_size=B)]],
        [*PLUGGED_ONE, x(UNPLUG, A, 1, ACK), config(plugged_size=0)],
    ),
    "unplug-all.ignore-data": (
        [[config(), x(UNPLUG_ALL, A, 1, ERROR)]],
        [config(), x(UNPLUG_ALL, A, 1, ACK), x(UNPLUG_ALL, A + 1, 7, BUSY)],
    ),
    "unplug-all.ack": (
        [[config(), x(UNPLUG_ALL, 0, 0, NACK)], [config(), x(UNPLUG_ALL, 0, 0, ERROR)]],
        [config(), x(UNPLUG_ALL, 0, 0, BUSY), x(UNPLUG_ALL, 0, 0, ACK)],
    ),
    "unplug-all.plugged-zero": (
        [[*PLUGGED_ONE, x(UNPLUG_ALL, 0, 0, ACK), config(plugged_size=B)]],
        [*PLUGGED_ONE, x(UNPLUG_ALL, 0, 0, BUSY), config(plugged_size=B),
         x(UNPLUG_ALL, 0, 0, ACK), config()],
    ),
    "state.range-error": (
        [[config(), x(STATE, A + MiB, 1, ACK)], [config(), x(STATE, A + 512 * MiB, 1, ACK)]],
        [config(), x(STATE, A + MiB, 1, ERROR), x(STATE, A + 512 * MiB, 1, ERROR)],
    ),
    "state.ack": (
        [[config(), x(STATE, A, 1, BUSY)], [config(), x(STATE, A, 1, NACK)]],
        [config(), x(STATE, A, 1, ACK, BlockState.UNPLUGGED)],
    ),
    "state.answer": (
        [[config(), x(STATE, A, 1, ACK, BlockState.PLUGGED)],
         [*PLUGGED_ONE, x(STATE, A, 2, ACK, BlockState.PLUGGED)],
         [config(), x(STATE, A, 1, ACK, 5)]],
        [*PLUGGED_ONE, x(STATE, A, 1, ACK, BlockState.PLUGGED),
         x(STATE, A, 2, ACK, BlockState.MIXED), x(STATE, A + B, 9, ACK, BlockState.UNPLUGGED)],
    ),
    "pci.config-generation": (
        [[config(gen=1), x(PLUG, A, 1, ACK), config(gen=1, plugged_size=B)],
         [config(gen=7), config(gen=7, requested_size=512 * MiB)]],
        [config(gen=1), x(PLUG, A, 1, ACK), config(gen=2, plugged_size=B),
         config(gen=2, plugged_size=B), x(UNPLUG, A, 1, ACK), config(gen=3), config()],
    ),
}  # fmt: skip


def test_every_checked_rule_has_a_golden_pair() -> None:
    checked = {rule.id for rule in RULES if rule.checked}
    assert set(GOLDEN) == checked


@pytest.mark.parametrize("rule_id", sorted(GOLDEN))
def test_rule_fires_on_its_violation_and_only_there(rule_id: str) -> None:
    violating, conforming = GOLDEN[rule_id]
    for events in violating:
        assert fired(events) == [rule_id], events
    assert fired(conforming) == []


def test_the_table_is_complete_and_consistent() -> None:
    ids = [rule.id for rule in RULES]
    assert len(ids) == len(set(ids)) == len(RULES_BY_ID)
    for rule in RULES:
        assert rule.section in SECTIONS
        if rule.level is not Level.MAY or rule.side is Side.DRIVER:
            keyword = "MAY" if rule.level is Level.MAY else str(rule.level)
            assert keyword in rule.sentence or rule.source == "description", rule.id
        if rule.side is Side.DRIVER:
            assert rule.kept_by and not rule.checked, rule.id
            path = rule.kept_by.split(":")[0].split(" ")[0]
            assert path.startswith("vmem_guest/"), rule.id
        else:
            assert rule.checked != bool(rule.unchecked), rule.id
    # Every requirements section of device-types/mem has its rules here.
    sections = {rule.section for rule in RULES}
    assert {"5.15.4.1", "5.15.4.2", "5.15.5.1", "5.15.5.2", "5.15.6.1", "5.15.6.2"} <= sections
    for request in ("3", "4", "5", "6"):
        assert {f"5.15.6.{request}.1", f"5.15.6.{request}.2"} <= sections


def test_driver_rules_name_existing_functions() -> None:
    import importlib

    for rule in RULES:
        if rule.side is not Side.DRIVER:
            continue
        path, _, where = rule.kept_by.partition(":")
        module = importlib.import_module(path.split(" ")[0].removesuffix(".py").replace("/", "."))
        name = where.split(" ")[0]
        target: Any = module
        for part in filter(None, name.split(".")):
            target = getattr(target, part)


def test_a_finding_forgets_block_states_until_unplug_all() -> None:
    """After a broken rule the oracle does not judge later answers by a history the
    device no longer vouches for; an ACKed UNPLUG_ALL makes them known again."""
    events = [*PLUGGED_ONE, x(PLUG, A, 1, ACK)]  # plugged-error: ACK for a plugged block
    assert fired(events) == ["plug.plugged-error"]
    later = [*events, config(plugged_size=B), x(STATE, A, 4, ACK, BlockState.PLUGGED)]
    assert fired(later) == ["plug.plugged-error"]
    again = [*later, x(UNPLUG_ALL, 0, 0, ACK), config(), x(STATE, A, 1, ACK, BlockState.PLUGGED)]
    assert fired(again) == ["plug.plugged-error", "state.answer"]


def test_a_finding_about_no_block_keeps_block_states() -> None:
    """A stale config_generation, or a rule broken by a refusal (which changes no
    block), leaves the history known: later rules are still checked against it."""
    events = [config(gen=1), x(PLUG, A, 1, ACK), config(gen=1, plugged_size=B)]
    assert fired(events) == ["pci.config-generation"]
    nacked = [*events, x(PLUG, A, 1, NACK), config(gen=1, plugged_size=B)]
    assert fired(nacked) == ["pci.config-generation", "plug.plugged-error"]
    later = [*nacked, x(STATE, A, 1, ACK, BlockState.UNPLUGGED)]
    assert fired(later) == ["pci.config-generation", "plug.plugged-error", "state.answer"]


# -- the oracle in the fuzzer -----------------------------------------------------------


def model(cls: type[DeviceModel] = DeviceModel, requested: int = 512 * MiB) -> DeviceModel:
    return cls(addr=A, region_size=2 * GiB, block_size=B, requested_size=requested)


class NackFirst(DeviceModel):
    """NACKs a PLUG beyond requested_size before validating its range (the order the
    spec's ERROR rule forbids)."""

    def submit(self, request: bytes) -> bytes:
        req = spec.VirtioMemReq.from_buffer_copy(request.ljust(24, b"\0"))
        if req.type == PLUG and self.plugged_size + req.nb_blocks * B > self.requested_size:
            return spec.encode_response(NACK)
        return super().submit(request)


class ErrorBeyondRequested(DeviceModel):
    """ERROR where QEMU answers NACK: a PLUG beyond requested_size (the spec allows it)."""

    def submit(self, request: bytes) -> bytes:
        raw = super().submit(request)
        return spec.encode_response(ERROR) if raw[0] == NACK else raw


class Generations(DeviceModel):
    """A model that tells its config_generation: changed on every config change
    (``every_change``), or only where QEMU changes it, on a host resize."""

    every_change = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.generation, self._seen = 0, b""

    def read_config(self) -> bytes:
        raw = super().read_config()
        if self.every_change and raw != self._seen:
            self.generation = (self.generation + 1) & 0xFF
        self._seen = raw
        return raw

    def resize(self, requested_size: int) -> None:
        super().resize(requested_size)
        self.generation = (self.generation + 1) & 0xFF

    def config_generation(self) -> int:
        return self.generation


class QemuGenerations(Generations):
    every_change = False


def test_the_qemu_model_breaks_one_must_and_matches_itself() -> None:
    """QEMU NACKs a PLUG beyond requested_size before it looks for plugged blocks
    (virtio_mem_state_change_request), where the spec says ERROR: the oracle finds
    it, shortened, while the profile comparison finds nothing."""
    device = model()
    result = conformance.fuzz(device, examples=60, seed=1, resize=device.resize)
    report = result.as_dict()
    assert report["mismatches"] == 0
    assert [f["rule"] for f in report["spec_findings"]] == ["plug.plugged-error"]
    finding = report["spec_findings"][0]
    assert finding["level"] == "MUST" and finding["section"] == "5.15.6.3.2"
    assert len(finding["sequence"]) <= 3
    assert finding["sequence"][-1]["device"] == "NACK"
    assert report["classes"] == {
        "violates a MUST": 1,
        "departs from a SHOULD": 0,
        "differs from the profile only": 0,
    }
    assert report["oracle"]["exchanges"] > 500
    assert report["oracle"]["config_generation_checked"] is False


def test_a_must_violation_classifies_the_mismatch() -> None:
    result = conformance.fuzz(model(NackFirst, requested=0), examples=30, seed=3, max_steps=10)
    text = fuzz_report_text(result.as_dict())
    assert "MISMATCH (shrunk; violates a MUST):" in text
    assert "  rule broken: 5.15.6.3.2 plug.range-error" in text
    assert "findings by class:" in text
    assert "MUST 5.15.6.3.2 PLUG request: Device Requirements [plug.range-error]" in text
    assert result.mismatch is not None
    assert classify(result.mismatch) is FindingClass.MUST
    failure = result.as_dict()["mismatch"]
    assert failure["class"] == "violates a MUST"
    assert any("plug.range-error" in rule for rule in failure["rules"]), failure
    assert failure["profile_source"] is None


class UsableZeroAfterUnplugAll(DeviceModel):
    """Sets usable_region_size to 0 on UNPLUG_ALL, whatever requested_size is."""

    def _unplug_all(self) -> None:
        super()._unplug_all()
        self._usable, self._usable_end, self._config = 0, self.addr, None


def test_a_mismatch_names_each_rule_broken_once() -> None:
    """The first example starts (two config reads) on a usable region smaller than
    requested_size: one MUST, named once, classifies the start-of-example mismatch."""
    result = conformance.fuzz(model(UsableZeroAfterUnplugAll), examples=5, seed=1)
    assert result.mismatch is not None and not result.mismatch.trace
    failure = result.as_dict()["mismatch"]
    assert failure["class"] == "violates a MUST"
    assert failure["rules"] == ["5.15.4.2 config.usable-covers-requested"]
    assert result.spec.occurrences["config.usable-covers-requested"] >= 2


def test_a_difference_the_spec_allows_is_profile_only() -> None:
    result = conformance.fuzz(model(ErrorBeyondRequested), examples=30, seed=3, max_steps=10)
    assert result.mismatch is not None
    assert not result.mismatch.violations
    assert classify(result.mismatch) is FindingClass.PROFILE
    failure = result.as_dict()["mismatch"]
    text = fuzz_report_text(result.as_dict())
    assert "MISMATCH (shrunk; differs from the profile only):" in text
    assert f"  profile source: {failure['profile_source']}" in text
    assert failure["class"] == "differs from the profile only"
    assert "virtio_mem_state_change_request" in failure["profile_source"]
    assert failure["profile_source"].startswith("qemu-7.2: ")
    assert result.classes()["differs from the profile only"] == 1


def test_config_generation_is_checked_when_the_channel_tells_it() -> None:
    right = model(Generations)
    result = conformance.fuzz(right, examples=20, seed=4, resize=right.resize)
    assert result.as_dict()["oracle"]["config_generation_checked"] is True
    assert "pci.config-generation" not in result.spec.shortest
    qemu_like = model(QemuGenerations)
    result = conformance.fuzz(qemu_like, examples=20, seed=4, resize=qemu_like.resize)
    # Both of QEMU's departures, the stale generation hiding nothing.
    assert set(result.spec.shortest) == {"pci.config-generation", "plug.plugged-error"}
    found = result.spec.shortest["pci.config-generation"]
    assert "plugged_size changed" in found.detail
    assert [e.step.describe() for e in found.trace][-1].startswith("PLUG")


def test_observed_channel_passes_everything_through() -> None:
    device, oracle = model(), Oracle()
    channel = ObservedChannel(device, oracle)
    assert channel.read_config() == device.read_config()
    answer = channel.submit(spec.encode_request(PLUG, A, 1))
    assert answer == spec.encode_response(ACK)
    channel.read_config()
    assert (oracle.exchanges, oracle.config_reads, oracle.generations) == (1, 2, 0)
    assert oracle.take() == []


def test_the_doc_holds_the_rule_table() -> None:
    from pathlib import Path

    from vmem_guest.conformance.rules_doc import table

    page = (Path(__file__).parents[2] / "docs" / "spec-oracle.md").read_text()
    start = page.index("<!-- rules table")
    start = page.index("\n", start) + 2
    end = page.index("\n<!-- end of rules table -->")
    assert page[start:end] == table(), "run python -m vmem_guest.conformance.rules_doc"
