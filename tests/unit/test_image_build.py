"""The conformance image's build without a VM (scripts/vmharness/newc.py, image.py):
the cpio archive the kernel unpacks, and what the initramfs holds."""

from __future__ import annotations

import io
import stat
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from vmharness import image  # noqa: E402
from vmharness.newc import MAGIC, TRAILER, NewcWriter  # noqa: E402


def read_newc(data: bytes) -> list[tuple[str, int, int, bytes, tuple[int, int]]]:
    """(name, mode, mtime, data, (rdevmajor, rdevminor)) of each entry: the format of
    Linux's Documentation/driver-api/early-userspace/buffer-format.rst."""
    entries, offset = [], 0
    while True:
        assert data[offset : offset + 6] == MAGIC
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        name_size, file_size = fields[11], fields[6]
        name_at = offset + 110
        name = data[name_at : name_at + name_size - 1].decode()
        assert data[name_at + name_size - 1] == 0 and fields[2:4] == [0, 0]  # root-owned
        body_at = name_at + name_size + (-(110 + name_size) % 4)
        body = data[body_at : body_at + file_size]
        offset = body_at + file_size + (-file_size % 4)
        if name == TRAILER:
            assert offset == len(data)
            return entries
        entries.append((name, fields[1], fields[5], body, (fields[9], fields[10])))


def test_the_archive_is_newc_with_parents_first() -> None:
    out = io.BytesIO()
    writer = NewcWriter(out)
    writer.char_device("/dev/console", 5, 1)
    writer.file("/usr/lib/x/a.py", b"print(1)\n", 0o644, mtime=1234)
    writer.symlink("/usr/bin/python3", "/opt/python3.11")
    writer.file("/usr/lib/x/odd", b"12345", 0o755)
    writer.close()
    entries = read_newc(out.getvalue())
    names = [e[0] for e in entries]
    assert names == [
        "dev", "dev/console", "usr", "usr/lib", "usr/lib/x", "usr/lib/x/a.py", "usr/bin",
        "usr/bin/python3", "usr/lib/x/odd",
    ]  # fmt: skip
    by_name = {e[0]: e for e in entries}
    assert stat.S_ISCHR(by_name["dev/console"][1]) and by_name["dev/console"][4] == (5, 1)
    assert by_name["usr/lib/x/a.py"][1:4] == (stat.S_IFREG | 0o644, 1234, b"print(1)\n")
    assert stat.S_ISLNK(by_name["usr/bin/python3"][1])
    assert by_name["usr/bin/python3"][3] == b"/opt/python3.11"
    assert by_name["usr/lib/x/odd"][3] == b"12345"


def test_the_image_holds_what_init_runs() -> None:
    """The interpreter, its standard library with bytecode, vmem_guest, hypothesis,
    the shell and /init: every path a real host file or made by the builder."""
    entries = {e.path: e for e in image.image_entries()}
    python = Path(sys.executable).resolve()
    assert str(python) in entries and "/usr/bin/python3" in entries
    assert entries["/init"].data == image.INIT_SCRIPT.read_bytes()
    assert entries["/init"].mode == 0o755
    site = image.SITE
    for module in ("vmem_guest/vmm_image.py", "hypothesis/__init__.py", "click/__init__.py"):
        assert f"{site}/{module}" in entries, module
    tag = sys.implementation.cache_tag
    assert f"{site}/vmem_guest/__pycache__/vmm_image.{tag}.pyc" in entries
    stdlib = Path(sysconfig.get_path("stdlib"))
    assert f"{stdlib}/unittest/__init__.py" in entries  # hypothesis imports it
    assert not any(p.startswith(f"{stdlib}/test/") for p in entries)
    assert any(p.endswith("/dash") for p in entries)
    assert all(e.source is None or e.source.exists() for e in entries.values())


def test_a_pyc_is_the_hosts_when_current(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("X = 1\n")
    path, first = image._pyc(source)
    assert path == str(tmp_path / "__pycache__" / f"m.{sys.implementation.cache_tag}.pyc")
    Path(path).parent.mkdir()
    Path(path).write_bytes(first[:16] + b"host's")
    assert image._pyc(source)[1] == first[:16] + b"host's"
