"""Host prerequisites: QEMU (installed when missing), the guest kernel (built when
missing), and the accelerator (KVM only when a probe boot proves it works)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from . import paths
from .errors import HostUnavailable

QEMU_NAME = "qemu-system-x86_64"


def find_qemu(install: bool = True) -> str:
    """Path of qemu-system-x86_64; installs Debian's qemu-system-x86 when missing."""
    exe = os.environ.get("VMEM_GUEST_QEMU") or shutil.which(QEMU_NAME)
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
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    except OSError as e:
        raise HostUnavailable(f"{exe} cannot be run: {e}") from e
    if r.returncode != 0:
        raise HostUnavailable(f"{exe} --version failed: {r.stderr.strip()[:200]}")
    return exe


def find_kernel(build: bool = True) -> Path:
    """The guest bzImage: $VMEM_GUEST_KERNEL, else the build-kernel.sh cache (building it
    when the cache is empty and build is True; that takes about 9 minutes)."""
    env = os.environ.get("VMEM_GUEST_KERNEL")
    if env:
        if not Path(env).is_file():
            raise HostUnavailable(f"VMEM_GUEST_KERNEL={env} does not exist")
        return Path(env)
    r = subprocess.run(
        ["bash", str(paths.BUILD_KERNEL), "--print-path"],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode == 0:
        return Path(r.stdout.strip())
    if not build:
        raise HostUnavailable(f"guest kernel not built: {r.stderr.strip()}")
    built = subprocess.run(["bash", str(paths.BUILD_KERNEL)], check=False)
    if built.returncode != 0:
        raise HostUnavailable("guest kernel cannot be built (scripts/build-kernel.sh failed)")
    r = subprocess.run(
        ["bash", str(paths.BUILD_KERNEL), "--print-path"],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise HostUnavailable(f"guest kernel missing after build: {r.stderr.strip()}")
    return Path(r.stdout.strip())


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
    try:
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            return str(data["accel"])
    except (OSError, ValueError, KeyError):
        pass
    accel = "kvm" if _probe_kvm(qemu, kernel, probe_timeout) else "tcg"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "accel": accel, "probed": time.time()}))
    return accel
