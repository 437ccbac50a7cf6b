"""kexec-tools for the test guest, and what it would hand a kexec'd or crash kernel.

The guest runs the host's / over 9p read-only, and neither the host nor the rootfs
image has kexec-tools. Debian 12's package (2.0.25, linked against Xen's libxenctrl)
is fetched with its Xen libraries through scripts/fetch-debs.sh (nothing installed,
the system's apt untouched) and unpacked under the cache; the guest runs it from
there with LD_LIBRARY_PATH. ``kexec -d`` prints the ranges it read:
``get_memory_ranges`` (kexec/arch/i386/kexec-x86-common.c) prints "MEMORY RANGES"
(from /sys/firmware/memmap) and ``get_crash_memory_ranges`` (crashdump-x86.c) prints
"CRASH MEMORY RANGES" (the "System RAM" lines of /proc/iomem), see docs/kexec.md.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .errors import HostUnavailable
from .paths import SCRIPTS_DIR, cache_dir
from .vm import TestVM

FETCH_DEBS = SCRIPTS_DIR / "fetch-debs.sh"
#: kexec-tools and the libraries Debian 12's build links (libxenctrl and its deps).
PACKAGES = (
    "kexec-tools",
    "libxenmisc4.17",
    "libxencall1",
    "libxendevicemodel1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenhypfs1",
    "libxenstore4",
    "libxentoollog1",
    "libxentoolcore1",
    "libyajl2",
)


def _fetch(*args: str) -> str:
    done = subprocess.run(
        ["bash", str(FETCH_DEBS), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise HostUnavailable(f"fetch-debs.sh {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def kexec_tools_root() -> Path:
    """The unpacked packages (``sbin/kexec``, ``usr/lib/x86_64-linux-gnu``), fetched
    once into the cache."""
    base = cache_dir() / "kexec-tools"
    root = base / "root"
    if (root / "sbin/kexec").exists():
        return root
    pinned = [f"{name}={_fetch('version', name, '*')}" for name in PACKAGES]
    _fetch("download", str(base / "debs"), *pinned)
    unpack = base / "root.new"
    for deb in sorted((base / "debs").glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpack)], check=True)
    unpack.rename(root)
    return root


def kexec_command(root: Path, args: str) -> str:
    """The guest command that runs ``kexec ARGS`` from ``root``."""
    return f"LD_LIBRARY_PATH={root}/usr/lib/x86_64-linux-gnu {root}/sbin/kexec {args}"


def debug_ranges(output: str, title: str) -> list[tuple[int, int]]:
    """The ranges ``kexec -d`` printed under ``title`` ("MEMORY RANGES" or "CRASH
    MEMORY RANGES"): ``%016Lx-%016Lx`` lines, possibly followed by a type."""
    lines = output.splitlines()
    try:
        first = next(i for i, line in enumerate(lines) if line.strip() == title)
    except StopIteration:
        return []
    ranges = []
    for line in lines[first + 1 :]:
        found = re.match(r"\s*([0-9a-f]{16})-([0-9a-f]{16})", line)
        if not found:
            break
        ranges.append((int(found.group(1), 16), int(found.group(2), 16)))
    return ranges


def load(vm: TestVM, root: Path, *, crash: bool) -> str:
    """Load the guest's own kernel as a kexec image (``-l``) or crash kernel (``-p``)
    with ``-d``; kexec's whole output (it debugs to stderr)."""
    assert vm.paths is not None
    kind = "-p" if crash else "-l"
    cmd = kexec_command(root, f"-d {kind} {vm.paths.kernel} --command-line=console=ttyS0")
    rc, out = vm.guest(f"{cmd} 2>&1", timeout=120)
    if rc != 0:
        raise AssertionError(f"kexec {kind} failed ({rc}): {out[-2000:]}")
    return out


def unload(vm: TestVM, root: Path) -> None:
    """Unload both images (``kexec -u``, ``kexec -p -u``)."""
    vm.guest(kexec_command(root, "-u"))
    vm.guest(kexec_command(root, "-p -u"))
