"""A new VM's boot is tried again only when QEMU itself died of a signal before the
guest answered (a QEMU crash, seen twice with Debian's QEMU 7.2), never for a QEMU
that exited by itself or still runs."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from vmharness.config import RunPaths  # noqa: E402
from vmharness.vm import TestVM  # noqa: E402


def vm_running(code: str) -> TestVM:
    vm = TestVM()
    vm._proc = subprocess.Popen([sys.executable, "-c", code])
    return vm


def test_a_qemu_killed_by_a_signal_is_told_apart() -> None:
    crashed = vm_running("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    assert crashed._qemu_killed_by() == signal.SIGSEGV
    exited = vm_running("raise SystemExit(1)")
    assert exited._qemu_killed_by() is None


def test_a_crash_is_written_down_and_the_sockets_cleared(tmp_path: Path) -> None:
    vm = TestVM()
    vm.paths = RunPaths(kernel=tmp_path, run_dir=tmp_path, share=tmp_path, sock_dir=tmp_path)
    for sock in (vm.paths.qmp_sock, vm.paths.cmd_sock):
        sock.write_text("")
    vm._note_qemu_crash(signal.SIGSEGV, 1)
    assert "QEMU died of signal 11 before the guest runner answered" in (
        vm.paths.qemu_log.read_text()
    )
    assert not vm.paths.qmp_sock.exists() and not vm.paths.cmd_sock.exists()
