"""Host prerequisites: QEMU (installed when missing), the guest kernel (built when
missing), and the accelerator (KVM only when a probe boot proves it works).

The two axes of the test matrix are a :class:`Pair`: a QEMU series (``system``, the
host's own: 7.2 on Debian 12; or ``10.0``, from backports into the cache by
scripts/install-qemu.sh) and a guest Linux series (``6.1`` or ``6.12``, built by
scripts/build-kernel.sh). ``VMEM_GUEST_QEMU_VERSION`` and ``VMEM_GUEST_LINUX`` choose
the default pair; ``VMEM_GUEST_QEMU`` and ``VMEM_GUEST_KERNEL`` (paths) override the
default pair's binaries outright.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .errors import HostUnavailable

QEMU_NAME = "qemu-system-x86_64"
#: The QEMU series that means "the host's own qemu-system-x86_64".
SYSTEM_QEMU = "system"
DEFAULT_LINUX = "6.1"


@dataclass(frozen=True)
class Pair:
    """One cell of the matrix: a QEMU series and a guest Linux series."""

    qemu: str = SYSTEM_QEMU
    linux: str = DEFAULT_LINUX

    @classmethod
    def from_env(cls) -> Pair:
        """The default pair: ``$VMEM_GUEST_QEMU_VERSION`` and ``$VMEM_GUEST_LINUX``."""
        return cls(
            qemu=os.environ.get("VMEM_GUEST_QEMU_VERSION") or SYSTEM_QEMU,
            linux=os.environ.get("VMEM_GUEST_LINUX") or DEFAULT_LINUX,
        )

    @property
    def is_default(self) -> bool:
        """True when this is the pair the environment chose (where path overrides apply)."""
        return self == Pair.from_env()

    def label(self) -> str:
        """``qemu-system+linux-6.1``, ``qemu-10.0+linux-6.12``."""
        return f"qemu-{self.qemu}+linux-{self.linux}"


#: Guest Linux series that must run single-threaded under TCG to survive a live
#: migration: a Linux 6.1 guest under multi-threaded TCG died after migration (general
#: protection faults, bad page state) whatever the driver, even the in-kernel one with
#: no device memory, once processes allocated memory during the migration; 6.12 did
#: not (docs/test-vm.md section 13).
MIGRATION_TCG_SINGLE_LINUX = ("6.1",)


def migration_tcg_thread(linux: str, thread: str) -> str:
    """The TCG threading for a migratable guest of Linux ``linux`` (``thread``: what
    it would run with otherwise)."""
    return "single" if linux in MIGRATION_TCG_SINGLE_LINUX else thread


#: The newest pair the project is tested on besides the default one.
NEWER_PAIR = Pair(qemu="10.0", linux="6.12")


def _run_script(script: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, check=False)


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    return ((result.stderr or result.stdout).strip().splitlines() or ["?"])[-1]


def qemu_version(exe: str) -> str:
    """``10.0.2`` from ``qemu-system-x86_64 --version``."""
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    words = r.stdout.split()
    return words[3] if len(words) > 3 and words[:3] == ["QEMU", "emulator", "version"] else "?"


def find_qemu(install: bool = True, pair: Pair | None = None) -> str:
    """Path of the pair's qemu-system-x86_64 (default: :meth:`Pair.from_env`).

    The system one is installed with apt when missing; another series is unpacked
    into the cache by scripts/install-qemu.sh (about 13 MB, once).
    """
    pair = pair or Pair.from_env()
    if pair.qemu != SYSTEM_QEMU and not (pair.is_default and os.environ.get("VMEM_GUEST_QEMU")):
        r = _run_script(paths.INSTALL_QEMU, *(() if install else ("--print-path",)), pair.qemu)
        if r.returncode != 0:
            raise HostUnavailable(f"QEMU {pair.qemu}: {_last_line(r)}")
        return _checked_qemu(r.stdout.strip())
    env = os.environ.get("VMEM_GUEST_QEMU") if pair.is_default else None
    exe = env or shutil.which(QEMU_NAME)
    if not exe and install:
        r = subprocess.run(
            ["bash", str(paths.INSTALL_DEPS), "--qemu"],
            capture_output=True,
            text=True,
            check=False,
        )
        exe = shutil.which(QEMU_NAME)
        if not exe:
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
            raise HostUnavailable(f"{QEMU_NAME} not found and install failed: {last[0]}")
    if not exe:
        raise HostUnavailable(f"{QEMU_NAME} not found")
    return _checked_qemu(exe)


def _checked_qemu(exe: str) -> str:
    """``exe`` if it runs (``--version``); HostUnavailable otherwise."""
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    except OSError as e:
        raise HostUnavailable(f"{exe} cannot be run: {e}") from e
    if r.returncode != 0:
        raise HostUnavailable(f"{exe} --version failed: {r.stderr.strip()[:200]}")
    return exe


def find_kernel(build: bool = True, pair: Pair | None = None) -> Path:
    """The pair's guest bzImage: $VMEM_GUEST_KERNEL for the default pair, else the
    build-kernel.sh cache (building it when the cache is empty and build is True; that
    takes 9 to 15 minutes on two cores, with progress on the terminal)."""
    pair = pair or Pair.from_env()
    env = os.environ.get("VMEM_GUEST_KERNEL") if pair.is_default else None
    if env:
        if not Path(env).is_file():
            raise HostUnavailable(f"VMEM_GUEST_KERNEL={env} does not exist")
        return Path(env)
    series = ("--linux", pair.linux)
    r = _run_script(paths.BUILD_KERNEL, *series, "--print-path")
    if r.returncode == 0:
        return Path(r.stdout.strip())
    if not build:
        raise HostUnavailable(f"guest kernel not built: {_last_line(r)}")
    built = subprocess.run(["bash", str(paths.BUILD_KERNEL), *series], check=False)
    if built.returncode != 0:
        raise HostUnavailable(
            f"Linux {pair.linux} guest kernel cannot be built (scripts/build-kernel.sh failed)"
        )
    r = _run_script(paths.BUILD_KERNEL, *series, "--print-path")
    if r.returncode != 0:
        raise HostUnavailable(f"guest kernel missing after build: {_last_line(r)}")
    return Path(r.stdout.strip())


def find_rootfs(build: bool = True) -> Path:
    """The systemd guest's root filesystem image (scripts/build-rootfs.sh: Debian 12 with
    the checkout installed), from the cache, or built when missing and build is True
    (a few minutes cold; about half a minute when only the project changed)."""
    r = _run_script(paths.BUILD_ROOTFS, *(() if build else ("--print-path",)))
    if r.returncode != 0:
        raise HostUnavailable(f"systemd guest image: {_last_line(r)}")
    return Path(r.stdout.strip().splitlines()[-1])


def _probe_kvm(qemu: str, kernel: Path, timeout: float) -> bool:
    """Boot the guest kernel under KVM with VMH_MODE=probe; True if it reached init."""
    from .config import RunPaths, VMConfig, qemu_argv

    with tempfile.TemporaryDirectory(prefix="vmh-kvm-") as tmp:
        t = Path(tmp)
        rp = RunPaths(
            kernel=kernel,
            run_dir=t,
            share=t,
            sock_dir=t,
        )
        cfg = VMConfig(name="kvm-probe", cpus=1, memory=256 << 20, devices=())
        argv = qemu_argv(cfg, rp, qemu, "kvm", mode="probe")
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        ok = False
        try:
            while time.monotonic() < deadline and proc.poll() is None:
                if rp.console_log.exists() and "VMH_PROBE_OK" in rp.console_log.read_text(
                    errors="replace"
                ):
                    ok = True
                    break
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait()
        return ok


def choose_accel(qemu: str, kernel: Path, probe_timeout: float = 15.0) -> str:
    """ "kvm" or "tcg". $VMEM_GUEST_ACCEL forces one. Otherwise KVM is used only if
    /dev/kvm is usable and a probe boot reaches init within probe_timeout; the answer is
    cached per (qemu, kernel) in the cache dir."""
    forced = os.environ.get("VMEM_GUEST_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    cache = paths.cache_dir() / "accel.json"
    key = f"{qemu}|{kernel}|{kernel.stat().st_mtime_ns}"
    # One answer per (qemu, kernel): make test boots four pairs, often side by side.
    try:
        answers = json.loads(cache.read_text()).get("answers", {})
    except (OSError, ValueError, AttributeError):
        answers = {}
    if key in answers:
        return str(answers[key]["accel"])
    accel = "kvm" if _probe_kvm(qemu, kernel, probe_timeout) else "tcg"
    answers[key] = {"accel": accel, "probed": time.time()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Written whole and renamed: a parallel reader sees the old file or the new one.
    staged = cache.with_name(f"{cache.name}.{os.getpid()}")
    staged.write_text(json.dumps({"answers": answers}))
    os.replace(staged, cache)
    return accel
