"""The harness's accelerator choice: one probe per (qemu, kernel), kept side by side in
one cache file that parallel test workers can read while another writes it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from vmharness import host  # noqa: E402


@pytest.fixture
def probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path]]:
    """Every probe boot the code under test asks for; KVM 'works' only for qemu-kvm."""
    asked: list[tuple[str, Path]] = []

    def probe(qemu: str, kernel: Path, timeout: float) -> bool:
        asked.append((qemu, kernel))
        return qemu == "qemu-kvm"

    monkeypatch.setenv("VMEM_GUEST_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VMEM_GUEST_ACCEL", raising=False)
    monkeypatch.setattr(host.os, "access", lambda path, mode: True)
    monkeypatch.setattr(host, "_probe_kvm", probe)
    return asked


def kernels(tmp_path: Path) -> tuple[Path, Path]:
    old, new = tmp_path / "6.1.bzImage", tmp_path / "6.12.bzImage"
    old.write_bytes(b"a")
    new.write_bytes(b"b")
    return old, new


def test_each_pair_is_probed_once_and_remembered_beside_the_others(
    tmp_path: Path, probes: list[tuple[str, Path]]
) -> None:
    old, new = kernels(tmp_path)
    for _ in range(3):  # alternating pairs, as make test boots them
        assert host.choose_accel("qemu-tcg", old) == "tcg"
        assert host.choose_accel("qemu-kvm", new) == "kvm"
    assert probes == [("qemu-tcg", old), ("qemu-kvm", new)]
    saved = json.loads((tmp_path / "cache" / "accel.json").read_text())
    assert sorted(a["accel"] for a in saved["answers"].values()) == ["kvm", "tcg"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["accel.json"]


def test_a_rebuilt_kernel_is_probed_again(tmp_path: Path, probes: list[tuple[str, Path]]) -> None:
    old, _ = kernels(tmp_path)
    host.choose_accel("qemu-tcg", old)
    old.write_bytes(b"rebuilt")
    host.choose_accel("qemu-tcg", old)
    assert len(probes) == 2


def test_an_unreadable_or_old_format_cache_means_probing_again(
    tmp_path: Path, probes: list[tuple[str, Path]]
) -> None:
    old, _ = kernels(tmp_path)
    cache = tmp_path / "cache" / "accel.json"
    cache.parent.mkdir()
    for content in ("{not json", json.dumps({"key": "x", "accel": "kvm"}), "[]"):
        cache.write_text(content)
        assert host.choose_accel("qemu-tcg", old) == "tcg"
    assert len(probes) == 3
