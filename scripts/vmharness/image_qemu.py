"""The conformance image under QEMU: its command line, and one boot to power-off.

Nothing of the harness: no 9p, no command channel, no QMP. The image's own init
runs the work and powers the guest off (scripts/image/init.sh); the host reads the
serial console only. docs/image.md shows the same command line.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .image import Image
from .sizes import MiB, fmt_size


@dataclass(frozen=True)
class ImageRun:
    """What one boot gave: QEMU's exit status (None: killed at the timeout), the
    console text and the wall time."""

    returncode: int | None
    console: str
    seconds: float


def qemu_image_argv(
    image: Image,
    qemu: str,
    console_log: Path,
    *,
    accel: str = "tcg",
    options: tuple[str, ...] = ("vmem_guest.mode=fuzz",),
    memory: int = 512 * MiB,
    region: int = 256 * MiB,
    requested: int = 64 * MiB,
    block: int = 2 * MiB,
) -> list[str]:
    """Boot ``image`` with one virtio-mem-pci device of ``region`` bytes at
    ``requested``; the console goes to ``console_log``. One vCPU: the fuzzer is one
    thread, and multi-threaded TCG has crashed both QEMUs
    the project runs (docs/test-vm.md section 10)."""
    cmdline = f"console=ttyS0 quiet {image.cmdline} {' '.join(options)}"
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    return [
        qemu, "-machine", "q35", *cpu, "-smp", "1",
        "-m", f"{fmt_size(memory)},maxmem={fmt_size(memory + region)},slots=1",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        # A reboot ends QEMU too (a panic would hang: the kernel's default panic=0).
        "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
        "-chardev", f"file,id=con0,path={console_log}", "-serial", "chardev:con0",
        "-object", f"memory-backend-ram,id=mem0,size={fmt_size(region)}",
        "-device", f"virtio-mem-pci,id=vm0,memdev=mem0,requested-size={fmt_size(requested)},"
                   f"block-size={fmt_size(block)}",
    ]  # fmt: skip


def boot_image(argv: list[str], console_log: Path, timeout: float) -> ImageRun:
    """Run QEMU until the guest powers off or ``timeout`` seconds pass (then kill it)."""
    t0 = time.monotonic()
    qemu_log = console_log.with_name("qemu.log")
    with open(qemu_log, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            returncode: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            returncode = None
    text = console_log.read_text(errors="replace") if console_log.exists() else ""
    return ImageRun(returncode, text, time.monotonic() - t0)
