"""What operators read: ``vmem-guest status`` exit codes, its JSON document (against
docs/status-json.md) and its Prometheus metrics (parsed strictly), and the agent's
``--metrics-file``."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import signal
import threading
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from test_agent import GIB, MIB, Rig, run_while, wait_for
from test_cli import run_main

from vmem_guest import health, metrics, render, service
from vmem_guest.agent import Agent
from vmem_guest.spec import RequestType
from vmem_guest.tracker import TrackerIdentity, TrackerReader, TrackerSnapshot, list_trackers
from vmem_guest.tracker.snapshot import Intent

DOCS = Path(__file__).resolve().parents[2] / "docs"
LOG = logging.getLogger("test.status_outputs")


def status(state_dir: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[int, str]:
    code, out, err = run_main(["status", "--state-dir", str(state_dir), *flags], capsys)
    assert "Traceback" not in err
    return code, out


def snapshot_of(state_dir: Path) -> TrackerSnapshot:
    (path,) = list_trackers(state_dir)
    with TrackerReader.open(path) as reader:
        return reader.snapshot()


@pytest.fixture
def converged_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A tracker after a grow to 1 GiB then a shrink to 1000 MiB (a holed block)."""
    code, _, err = run_main(["sim", "--resize", "1G,1000M", "--state-dir", str(tmp_path)], capsys)
    assert code == 0, err
    return tmp_path


# --- exit status -------------------------------------------------------------------


def test_exit_status_ok_when_converged(
    converged_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for flags in ((), ("--json",), ("--prometheus",)):
        code, out = status(converged_dir, capsys, *flags)
        assert code == health.StatusExit.OK, flags
        assert out


def test_exit_status_4_for_a_remainder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 100 MiB is less than one 128 MiB memory block: nothing can be plugged for it.
    code, _, err = run_main(["sim", "--resize", "100M", "--state-dir", str(tmp_path)], capsys)
    assert code == 0, err
    code, out = status(tmp_path, capsys)
    assert code == 4
    assert "not converged: plugged 0 of requested 100MiB (remainder 100MiB)" in out
    code, out = status(tmp_path, capsys, "--json")
    document = json.loads(out)
    assert (code, document["status"]) == (4, "not_converged")
    assert document["devices"][0]["not_converged"] == [
        "plugged 0 of requested 100MiB (remainder 100MiB)"
    ]
    code, out = status(tmp_path, capsys, "--prometheus")
    assert code == 4
    assert parse_exposition(out)["vmem_guest_converged"].samples == {(("device", "sim0"),): 0.0}


def test_exit_status_3_for_a_broken_device(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(
        [
            *("sim", "--resize", "1G,2G", "--misbehave", "error-answer"),
            *("--honest-requests", "1", "--state-dir", str(tmp_path)),
        ],
        capsys,
    )
    assert code == 1 and "device broken at step 2" in err
    code, out = status(tmp_path, capsys)
    assert code == 3
    assert "BROKEN: PLUG answered ERROR" in out
    code, out = status(tmp_path, capsys, "--json")
    document = json.loads(out)
    assert (code, document["status"]) == (3, "broken")
    (device,) = document["devices"]
    assert device["broken"] and not device["converged"]
    code, out = status(tmp_path, capsys, "--prometheus")
    assert code == 3
    assert parse_exposition(out)["vmem_guest_broken"].samples == {(("device", "sim0"),): 1.0}


def test_broken_outranks_not_converged(converged_dir: Path) -> None:
    snap = snapshot_of(converged_dir)
    broken = dataclasses.replace(snap, broken=True, broken_reason="device timeout")
    growing = dataclasses.replace(snap, requested_size=snap.requested_size + 128 * MIB)
    assert health.exit_status([snap]) is health.StatusExit.OK
    assert health.exit_status([growing, snap]) is health.StatusExit.NOT_CONVERGED
    assert health.exit_status([growing, broken]) is health.StatusExit.BROKEN
    assert health.exit_status([broken, growing]) is health.StatusExit.BROKEN
    assert health.exit_status([]) is health.StatusExit.OK


def test_not_converged_reasons(converged_dir: Path) -> None:
    snap = snapshot_of(converged_dir)
    assert health.not_converged(snap) == []
    in_flight = dataclasses.replace(snap, intent=Intent(RequestType.PLUG, snap.geometry.addr, 1))
    assert health.not_converged(in_flight) == ["PLUG in flight"]
    # One memory block plugged but not online (say, an online the kernel refused).
    not_online = dataclasses.replace(snap, online_bytes=snap.online_bytes - 128 * MIB)
    assert health.not_converged(not_online) == ["128MiB plugged, not online"]
    # A subblock taken out of use but still plugged: a take half done.
    first = snap.geometry.subblocks_of(snap.blocks[0].index)[0]
    assert not snap.is_taken(first)
    taken = bytearray(snap.taken)
    bitmap = bytearray(snap.bitmap)
    taken[first // 8] |= 1 << first % 8
    bitmap[first // 8] |= 1 << first % 8
    taking = dataclasses.replace(snap, taken=bytes(taken), bitmap=bytes(bitmap))
    assert "subblocks being taken out of use or given back" in health.not_converged(taking)


def test_json_and_prometheus_together_is_a_usage_error(
    converged_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_main(
        ["status", "--json", "--prometheus", "--state-dir", str(converged_dir)], capsys
    )
    assert (code, out) == (2, "")
    assert err == "vmem-guest: error: --json and --prometheus exclude each other\n"


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["status", "--help"], capsys)
    assert code == 0
    for status_code in health.StatusExit:
        assert re.search(rf"^\s+{status_code.value}\s+\S", out, re.M), status_code


# --- the JSON document against docs/status-json.md --------------------------------


def field_paths(value: Any, prefix: str = "") -> set[str]:
    """Every field of a JSON value as a dotted path; a list of objects as ``name[].field``."""
    if isinstance(value, dict):
        paths = set()
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.add(path)
            paths |= field_paths(item, path)
        return paths
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return set().union(*(field_paths(item, f"{prefix}[]") for item in value))
    return set()


def documented_fields() -> set[str]:
    """The first column of every table row in docs/status-json.md: `` `path` ``."""
    text = (DOCS / "status-json.md").read_text()
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.M))


def test_status_json_doc_lists_exactly_the_fields_emitted(converged_dir: Path) -> None:
    snap = snapshot_of(converged_dir)
    # Every optional branch filled: a request in flight, holed and online blocks.
    in_flight = dataclasses.replace(snap, intent=Intent(RequestType.PLUG, snap.geometry.addr, 1))
    assert render.holed_blocks(snap)
    document = render.status_document([in_flight], render.GuestMemory(8 * GIB, 0))
    emitted = field_paths(document)
    documented = documented_fields()
    assert emitted - documented == set(), "emitted, not in docs/status-json.md"
    assert documented - emitted == set(), "in docs/status-json.md, never emitted"


def test_status_json_schema_is_the_documented_one() -> None:
    text = (DOCS / "status-json.md").read_text()
    assert f'"schema": {render.STATUS_SCHEMA}' in text


# --- Prometheus text exposition format ------------------------------------------------

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
LABEL_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


@dataclasses.dataclass
class ParsedFamily:
    help: str | None = None
    type: str | None = None
    samples: dict[tuple[tuple[str, str], ...], float] = dataclasses.field(default_factory=dict)


def unescape(text: str, quote: bool) -> str:
    out, chars = [], iter(text)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        nxt = next(chars, "")
        allowed = {"\\": "\\", "n": "\n"} | ({'"': '"'} if quote else {})
        assert nxt in allowed, f"bad escape \\{nxt!r} in {text!r}"
        out.append(allowed[nxt])
    return "".join(out)


def parse_labels(text: str) -> tuple[tuple[str, str], ...]:
    """``a="x",b="y"`` (no trailing comma here) -> sorted pairs; AssertionError if malformed."""
    pairs, pos = [], 0
    while pos < len(text):
        match = LABEL_PAIR.match(text, pos)
        assert match, f"bad label set at {text[pos:]!r}"
        pairs.append((match.group(1), unescape(match.group(2), quote=True)))
        pos = match.end()
        if pos < len(text):
            assert text[pos] == ",", f"expected ',' in {text!r}"
            pos += 1
    names = [name for name, _ in pairs]
    assert len(set(names)) == len(names), f"duplicate label in {text!r}"
    return tuple(sorted(pairs))


def parse_exposition(text: str) -> dict[str, ParsedFamily]:
    """A strict reader of the text format (version 0.0.4) as this project writes it:
    every family has one HELP then one TYPE line before its samples, which are
    contiguous; no timestamps; the text ends with a newline."""
    assert text.endswith("\n"), "the last line must end with a newline"
    families: dict[str, ParsedFamily] = {}
    current: str | None = None
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP "):
            name, _, doc = line[len("# HELP ") :].partition(" ")
            assert METRIC_NAME.match(name) and name not in families, where
            families[name] = ParsedFamily(help=unescape(doc, quote=False))
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE ") :].partition(" ")
            assert name == current and families[name].type is None, where
            assert kind in TYPES, where
            assert not families[name].samples, where
            families[name].type = kind
        else:
            assert line and not line.startswith("#"), where
            match = re.fullmatch(r"([^{ ]+)(?:\{(.*)\})? (\S+)", line)
            assert match, where
            name, labels, value = match.groups()
            assert name == current and families[name].type is not None, where
            key = parse_labels(labels or "")
            assert key not in families[name].samples, f"duplicate series, {where}"
            parsed = float(value)
            assert not math.isnan(parsed), where
            families[name].samples[key] = parsed
    return families


def check_conventions(families: dict[str, ParsedFamily]) -> None:
    for name, family in families.items():
        assert name.startswith("vmem_guest_"), name
        assert family.help, name
        assert (family.type == "counter") == name.endswith("_total"), name
        assert not re.search(r"_(byte|second|mib|gib|kb)s?(_|$)", name.removesuffix("_bytes")), name
        for labels in family.samples:
            assert all(LABEL_NAME.match(key) for key, _ in labels), name
            assert dict(labels).get("device"), name


def test_parser_rejects_what_the_format_forbids() -> None:
    good = "# HELP vmem_guest_x_bytes X.\n# TYPE vmem_guest_x_bytes gauge\nvmem_guest_x_bytes 1\n"
    parse_exposition(good)
    for bad in (
        good.rstrip("\n"),  # no final newline
        good.replace("# TYPE vmem_guest_x_bytes gauge\n", ""),  # sample before TYPE
        good.replace("gauge", "gague"),
        good + "vmem_guest_x_bytes 2\n",  # the same series twice
        good.replace("x_bytes 1", 'x_bytes{device="a} 1'),
        good.replace("x_bytes 1", 'x_bytes{device="a\\q"} 1'),
        good.replace("x_bytes 1", "x_bytes one"),
    ):
        with pytest.raises((AssertionError, ValueError)):
            parse_exposition(bad)


def test_exposition_parses_and_holds_the_snapshot(converged_dir: Path) -> None:
    snap = snapshot_of(converged_dir)
    families = parse_exposition(metrics.exposition([snap]))
    check_conventions(families)
    device = (("device", "sim0"),)

    def value(name: str) -> float:
        return families[name].samples[device]

    assert value("vmem_guest_requested_bytes") == 1000 * MIB
    assert value("vmem_guest_plugged_bytes") == 1000 * MIB
    assert value("vmem_guest_online_bytes") == 1 * GIB
    assert value("vmem_guest_hole_bytes") == 24 * MIB
    assert value("vmem_guest_remainder_bytes") == 0
    assert value("vmem_guest_usable_region_bytes") == snap.usable_region_size
    assert value("vmem_guest_region_bytes") == 4 * GIB
    assert (value("vmem_guest_broken"), value("vmem_guest_converged")) == (0, 1)
    assert value("vmem_guest_requests_total") == snap.requests > 0
    assert value("vmem_guest_retries_total") == snap.retries
    assert families["vmem_guest_memory_blocks"].samples == {
        (("device", "sim0"), ("state", "online")): 8,
        (("device", "sim0"), ("state", "partial")): 0,
        (("device", "sim0"), ("state", "plugged")): 0,
        (("device", "sim0"), ("state", "unplugged")): 24,
    }


def test_exposition_escapes_label_values(converged_dir: Path) -> None:
    snap = snapshot_of(converged_dir)
    odd = TrackerIdentity('we"ird\\name', snap.geometry)
    families = parse_exposition(metrics.exposition([dataclasses.replace(snap, identity=odd)]))
    assert families["vmem_guest_broken"].samples == {(("device", 'we"ird\\name'),): 0}


def test_exposition_of_no_device_is_headers_only() -> None:
    families = parse_exposition(metrics.exposition([]))
    assert families and all(not family.samples for family in families.values())
    check_conventions(families)


def test_every_metric_is_documented() -> None:
    text = (DOCS / "operations.md").read_text()
    documented = set(re.findall(r"^\| `(vmem_guest_[a-z_]+)` \|", text, re.M))
    assert documented == set(parse_exposition(metrics.exposition([], {})))


# --- the agent's metrics file -------------------------------------------------------


class CountingFile(metrics.MetricsFile):
    def __init__(self, path: Path) -> None:
        super().__init__(path, LOG)
        self.keys: list[tuple[tuple[str, int, float | None], ...]] = []

    def publish(
        self, snapshots: Sequence[TrackerSnapshot], last_resize: Mapping[str, float]
    ) -> None:
        self.keys.append(
            tuple(
                (s.identity.name, s.generation, last_resize.get(s.identity.name)) for s in snapshots
            )
        )
        super().publish(snapshots, last_resize)


def test_metrics_file_rewritten_on_change_only(tmp_path: Path, converged_dir: Path) -> None:
    snap = snapshot_of(converged_dir)
    (tmp_path / "textfile").mkdir()
    target = tmp_path / "textfile" / "vmem-guest.prom"
    published = metrics.MetricsFile(target, LOG)
    published.publish([snap], {})
    first = target.stat()
    assert oct(first.st_mode & 0o777) == oct(metrics.FILE_MODE)
    published.publish([snap], {})
    assert target.stat().st_ino == first.st_ino  # not rewritten: nothing changed
    changed = dataclasses.replace(snap, generation=snap.generation + 2, requested_size=0)
    published.publish([changed], {})
    assert target.stat().st_ino != first.st_ino  # replaced by a rename
    assert parse_exposition(target.read_text())["vmem_guest_requested_bytes"].samples == {
        (("device", "sim0"),): 0
    }
    assert [p.name for p in target.parent.iterdir()] == ["vmem-guest.prom"]  # no temporary
    replaced = target.stat().st_ino
    published.publish([changed], {"sim0": 2.5})  # a resize ended: the tracker alone did not change
    assert target.stat().st_ino != replaced
    assert parse_exposition(target.read_text())["vmem_guest_last_resize_seconds"].samples == {
        (("device", "sim0"),): 2.5
    }
    published.close()
    assert not target.exists()


def test_metrics_file_write_failure_is_logged_once(
    tmp_path: Path, converged_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snap = snapshot_of(converged_dir)
    published = metrics.MetricsFile(tmp_path / "gone" / "vmem-guest.prom", LOG)
    published.publish([snap], {})
    published.publish([dataclasses.replace(snap, generation=snap.generation + 2)], {})
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "cannot write metrics" in caplog.text
    (tmp_path / "gone").mkdir()
    published.publish([snap], {})
    assert (tmp_path / "gone" / "vmem-guest.prom").exists()


def test_agent_publishes_every_change_and_only_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[str] = []
    real_write = metrics.write_atomically

    def counting_write(path: Path, text: str) -> None:
        writes.append(text)
        real_write(path, text)

    monkeypatch.setattr(metrics, "write_atomically", counting_write)
    rig = Rig(tmp_path / "state")
    published = CountingFile(tmp_path / "vmem-guest.prom")
    agent = Agent([rig.attached], listener=published)

    def plugged() -> float | None:
        if not published.path.exists():
            return None
        samples = parse_exposition(published.path.read_text())["vmem_guest_plugged_bytes"]
        return samples.samples[(("device", rig.attached.bdf),)]

    def host() -> None:
        wait_for(lambda: plugged() == 0)
        rig.channel.host_resize(512 * MIB)
        wait_for(lambda: plugged() == 512 * MIB)
        rig.channel.host_resize(256 * MIB)
        wait_for(lambda: plugged() == 256 * MIB)

    try:
        run_while(agent, host)
    finally:
        rig.attached.close()
    final = parse_exposition(published.path.read_text())
    device = (("device", rig.attached.bdf),)
    assert final["vmem_guest_converged"].samples == {device: 1}
    # The agent timed the shrink: from its config change to convergence.
    (seconds,) = final["vmem_guest_last_resize_seconds"].samples.values()
    assert 0 < seconds < 20
    # Written once per change of a generation, however often the loop turned.
    changes = [
        key for i, key in enumerate(published.keys) if i == 0 or key != published.keys[i - 1]
    ]
    assert len(writes) == len(changes) >= 3
    assert writes[-1] == published.path.read_text()


def test_run_refuses_a_metrics_file_in_no_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_devices(devices: tuple[str, ...]) -> list[object]:
        raise AssertionError("devices looked for before the options were checked")

    monkeypatch.setattr(service, "select_devices", no_devices)
    target = tmp_path / "absent" / "vmem-guest.prom"
    code, out, err = run_main(
        ["run", "--state-dir", str(tmp_path), "--metrics-file", str(target)], capsys
    )
    assert (code, out) == (2, "")
    assert err == (
        f"vmem-guest: error: --metrics-file {target}: directory {target.parent} does not exist\n"
    )


def test_served_agent_keeps_the_metrics_file_and_removes_it_at_exit(tmp_path: Path) -> None:
    """service._serve wires --metrics-file to the agent: the file follows the device."""
    rig = Rig(tmp_path / "state")
    target = tmp_path / "vmem-guest.prom"
    options = service.RunOptions(state_dir=tmp_path / "state", metrics_file=target)
    attacher = types.SimpleNamespace(attached=[rig.attached])
    seen: dict[str, float] = {}

    def host() -> None:
        try:
            rig.channel.host_resize(256 * MIB)
            wait_for(lambda: target.exists() and "converged{" in target.read_text())
            wait_for(
                lambda: (
                    parse_exposition(target.read_text())["vmem_guest_online_bytes"].samples
                    == {(("device", rig.attached.bdf),): 256 * MIB}
                )
            )
            seen["online"] = 256 * MIB
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=host)
    thread.start()
    try:
        service._serve(attacher, rig.socket, options, None)  # type: ignore[arg-type]
    finally:
        thread.join(30)
        rig.attached.close()
    assert seen == {"online": 256 * MIB}
    assert not target.exists()
