"""tests/vm/conftest.py on a host that cannot boot the VM: the session fails, with one
clear line per pair, and never passes or skips silently. No VM is booted: the
conftest runs in a child pytest whose QEMU lookup always fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VM_CONFTEST = ROOT / "tests" / "vm" / "conftest.py"
#: What the harness says when it can neither find nor install QEMU.
NO_QEMU = "no qemu-system-x86_64 and apt-get cannot install it"

CONFTEST = f"""
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("vm_conftest_under_test", {str(VM_CONFTEST)!r})
real = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = real
spec.loader.exec_module(real)

from vmharness import HostUnavailable

QEMU_LOOKUPS = []


def cannot_boot(install=True, pair=None):
    QEMU_LOOKUPS.append(pair)
    raise HostUnavailable({NO_QEMU!r})


real.vmhost.find_qemu = cannot_boot
# Every fixture and hook the real conftest defines, as if it were this conftest.
for name in dir(real):
    if name == "boot_vm" or name.startswith("pytest_"):
        globals()[name] = getattr(real, name)


def pytest_unconfigure(config):
    print(f"QEMU lookups: {{len(QEMU_LOOKUPS)}}")
"""

VM_TESTS = """
def test_one_needs_the_vm(boot_vm):
    with boot_vm(None):
        raise AssertionError("booted although the host cannot")


def test_another_needs_the_vm(boot_vm):
    with boot_vm(None):
        raise AssertionError("booted although the host cannot")


def test_without_a_vm():
    assert True
"""


def run_child(tmp_path: Path, tests: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_child.py").write_text(textwrap.dedent(tests))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(
        [*command, str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_host_that_cannot_boot_the_vm_fails_the_session_with_one_line(tmp_path: Path) -> None:
    result = run_child(tmp_path, VM_TESTS)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    lines = [line for line in out.splitlines() if "cannot run on this host" in line]
    assert len(lines) == 1, out
    assert lines[0].startswith("FAILED: VM tests on qemu-") and lines[0].endswith(NO_QEMU)
    assert "2 skipped" in out and "1 passed" in out, out
    assert "QEMU lookups: 1" in out, out  # one probe per pair per session
    assert "KeyError" not in out + result.stderr


def test_under_xdist_a_worker_that_cannot_boot_fails_the_session_with_one_line(
    tmp_path: Path,
) -> None:
    """make test runs two pytest-xdist workers: the reason travels from the worker
    that met it to the controller, which prints it once and fails."""
    result = run_child(tmp_path, VM_TESTS, "-n", "2", "--dist", "loadfile")
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    lines = [line for line in out.splitlines() if "cannot run on this host" in line]
    assert len(lines) == 1, out
    assert lines[0].startswith("FAILED: VM tests on qemu-") and lines[0].endswith(NO_QEMU)
    assert "2 skipped" in out and "1 passed" in out, out


def test_without_vm_tests_the_session_passes(tmp_path: Path) -> None:
    result = run_child(tmp_path, VM_TESTS, "-k", "without")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cannot run on this host" not in result.stdout
    assert "QEMU lookups: 0" in result.stdout
