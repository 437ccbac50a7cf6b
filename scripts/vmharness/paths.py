"""Where the harness finds its files and puts its artifacts."""

from __future__ import annotations

import compileall
import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

#: scripts/ (this package's parent).
SCRIPTS_DIR = Path(__file__).resolve().parent.parent
#: The checkout.
REPO_ROOT = SCRIPTS_DIR.parent
#: The checkout's venv interpreter (the agent's, and the runner's in a RAM root).
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
GUEST_INIT = SCRIPTS_DIR / "guest-init.sh"
GUEST_RUNNER = Path(__file__).resolve().parent / "guest_runner.py"
BUILD_KERNEL = SCRIPTS_DIR / "build-kernel.sh"
BUILD_ROOTFS = SCRIPTS_DIR / "build-rootfs.sh"
INSTALL_DEPS = SCRIPTS_DIR / "install-vm-deps.sh"
INSTALL_QEMU = SCRIPTS_DIR / "install-qemu.sh"


def compile_checkout() -> None:
    """Write the bytecode of the checkout's ``vmem_guest`` (on the host: the guest sees
    the checkout read-only, with PYTHONDONTWRITEBYTECODE). Without it every
    ``vmem-guest`` process in the guest compiles each module it imports: measured on
    this project's test VM, a ``status --json`` took 20 s instead of 10 s under TCG on a
    busy host (docs/startup.md). Cheap when the bytecode is current."""
    compileall.compile_dir(REPO_ROOT / "vmem_guest", quiet=1)


def results_dir() -> Path:
    """Run artifacts (console logs, results shares): $VMEM_GUEST_RESULTS or results/ in
    the checkout (gitignored)."""
    return Path(os.environ.get("VMEM_GUEST_RESULTS", REPO_ROOT / "results"))


def cache_dir() -> Path:
    """The kernel and accelerator-probe cache (same default as build-kernel.sh)."""
    env = os.environ.get("VMEM_GUEST_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vmem-guest"


def write_bench_result(kind: str, result: dict[str, Any]) -> Path:
    """Write a benchmark's JSON as results/bench/<kind>-<time>.json and <kind>-latest.json;
    return the first path."""
    out_dir = results_dir() / "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2) + "\n"
    path = out_dir / f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(text)
    (out_dir / f"{kind}-latest.json").write_text(text)
    return path
