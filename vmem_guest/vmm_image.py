"""The conformance image's guest side (docs/image.md): one report for every device.

The image (``make image``) boots any VMM's virtio-mem devices with this program as
its work: its ``/init`` runs ``python -m vmem_guest.vmm_image`` when the kernel
command line says ``vmem_guest.mode=fuzz``. Every virtio-mem PCI function is bound
to vfio-pci (no-IOMMU mode) and fuzzed with ``vmem-guest fuzz``'s engine; the human
report of each goes to the console, then the whole run as one JSON line between
:data:`REPORT_BEGIN` and :data:`REPORT_END`, which :func:`report_from_console` finds
again in a console log on the host.

Options come from the kernel command line (the only input a VMM's one command line
gives the guest): ``vmem_guest.examples=N``, ``vmem_guest.max_steps=N``,
``vmem_guest.seed=N``. The kernel passes no word with a dot to init (an unused module
parameter: Linux 6.1 init/main.c ``unknown_bootoption``), but ``/proc/cmdline`` keeps
it, and is read.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmem_guest import __version__
from vmem_guest.errors import UsageError, VmemError

#: The kernel command line's prefix of this program's options.
PARAM_PREFIX = "vmem_guest."
#: What the image does: ``fuzz`` every device and power off, or serve them (``agent``).
MODES = ("fuzz", "agent")
#: The lines around the JSON report on the console (each alone on its line).
REPORT_BEGIN = "===== vmem-guest conformance report: JSON begin ====="
REPORT_END = "===== vmem-guest conformance report: JSON end ====="
#: Examples per device when the command line does not say: a run of a minute or two
#: under TCG for a small device, long enough to meet every answer QEMU gives.
DEFAULT_EXAMPLES = 50
DEFAULT_MAX_STEPS = 40
#: Where the fuzzer keeps its lock and hypothesis database (the image's RAM).
STATE_DIR = Path("/run/vmem-guest")


@dataclass(frozen=True)
class ImageOptions:
    """What the kernel command line asks of the image."""

    mode: str = "fuzz"
    examples: int = DEFAULT_EXAMPLES
    max_steps: int = DEFAULT_MAX_STEPS
    seed: int | None = None


def parse_cmdline(cmdline: str) -> ImageOptions:
    """The ``vmem_guest.*`` words of a kernel command line; UsageError on a bad value
    or an unknown option (a typo would otherwise run with the default silently)."""
    found: dict[str, str] = {}
    for word in cmdline.split():
        if word.startswith(PARAM_PREFIX) and "=" in word:
            key, value = word[len(PARAM_PREFIX) :].split("=", 1)
            found[key] = value
    unknown = sorted(set(found) - {"mode", "examples", "max_steps", "seed"})
    if unknown:
        raise UsageError(f"unknown kernel command line option {PARAM_PREFIX}{unknown[0]}")
    mode = found.get("mode", "fuzz")
    if mode not in MODES:
        raise UsageError(f"{PARAM_PREFIX}mode={mode}: expected one of {', '.join(MODES)}")
    return ImageOptions(
        mode=mode,
        examples=_positive(found, "examples", DEFAULT_EXAMPLES),
        max_steps=_positive(found, "max_steps", DEFAULT_MAX_STEPS),
        seed=_seed(found.get("seed")),
    )


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _seed(text: str | None) -> int | None:
    if text is None:
        return None
    if not _is_int(text):
        raise UsageError(f"{PARAM_PREFIX}seed={text}: expected an integer")
    return int(text)


def _positive(found: dict[str, str], key: str, default: int) -> int:
    text = found.get(key)
    if text is None:
        return default
    if not _is_int(text) or int(text) < 1:
        raise UsageError(f"{PARAM_PREFIX}{key}={text}: expected a positive integer")
    return int(text)


def fuzz_every_device(
    options: ImageOptions, bdfs: Iterable[str], fuzz_one: Callable[[str], dict[str, Any]]
) -> dict[str, Any]:
    """The image's report: ``fuzz_one(bdf)`` (a ``vmem-guest fuzz`` report) for each
    device, or the one-line reason it could not be fuzzed (a VmemError's message).

    ``ok`` is true when at least one device was fuzzed and every device was, without
    a mismatch. Spec findings do not change ``ok``: they are QEMU's known departures
    from the spec as much as anyone's (docs/spec-oracle.md), and the reader judges.
    """
    devices: list[dict[str, Any]] = []
    for bdf in bdfs:
        try:
            devices.append(fuzz_one(bdf))
        except VmemError as exc:
            devices.append({"device": bdf, "error": exc.message})
    fuzzed = [d for d in devices if "error" not in d]
    return {
        "vmem_guest": __version__,
        "kernel": os.uname().release,
        "options": options.__dict__,
        "devices": devices,
        "ok": bool(devices)
        and len(fuzzed) == len(devices)
        and not any(d["mismatches"] for d in fuzzed),
    }


def console_lines(report: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> list[str]:
    """The console text: each device's human report (``render``), a verdict, then the
    JSON between the markers, on one line so no console wraps it into pieces."""
    lines: list[str] = []
    for device in report["devices"]:
        lines += ["", f"=== virtio-mem device {device['device']} ==="]
        lines += [f"NOT FUZZED: {device['error']}"] if "error" in device else [render(device)]
    if not report["devices"]:
        lines += ["", "no virtio-mem-pci device found"]
    verdict = "PASS" if report["ok"] else "FAIL"
    lines += ["", f"vmem-guest conformance: {verdict} ({len(report['devices'])} device(s))"]
    lines += [REPORT_BEGIN, json.dumps(report, sort_keys=True), REPORT_END]
    return lines


def report_from_console(text: str) -> dict[str, Any]:
    """The JSON report in a console log; UsageError when it is missing or cut short.

    Lines between the markers are joined: a kernel message can only break the line
    at a line end, and a console's carriage returns are dropped.
    """
    lines = [line.rstrip("\r") for line in text.splitlines()]
    try:
        start = lines.index(REPORT_BEGIN)
        end = lines.index(REPORT_END, start)
    except ValueError:
        raise UsageError("no complete conformance report in the console output") from None
    try:
        report: dict[str, Any] = json.loads("".join(lines[start + 1 : end]))
    except json.JSONDecodeError as exc:
        raise UsageError(f"the console's conformance report is not JSON: {exc}") from None
    return report


def _fuzz_pci(options: ImageOptions) -> Callable[[str], dict[str, Any]]:
    """``vmem-guest fuzz --device BDF --noiommu`` as a function (no host resizes: the
    image has no host side; the device's requested size is the VMM's)."""
    from vmem_guest.conformance import fuzz_pci_device

    def fuzz_one(bdf: str) -> dict[str, Any]:
        result = fuzz_pci_device(
            bdf,
            allow_noiommu=True,
            state_dir=STATE_DIR,
            examples=options.examples,
            seed=options.seed,
            max_steps=options.max_steps,
        )
        return result.as_dict()

    return fuzz_one


def main() -> int:
    """Fuzz every virtio-mem device as the kernel command line says; 0 when ``ok``."""
    from vmem_guest import pci

    # The text ``vmem-guest fuzz`` prints, so the image's report reads the same.
    from vmem_guest.conformance.report_text import fuzz_report_text

    try:
        options = parse_cmdline(Path("/proc/cmdline").read_text())
    except UsageError as exc:
        print(f"vmem-guest image: {exc.message}", flush=True)
        return 2
    bdfs = [dev.bdf for dev in pci.list_devices()]
    print(f"vmem-guest image: fuzzing {len(bdfs)} device(s), {options}", flush=True)
    report = fuzz_every_device(options, bdfs, _fuzz_pci(options))
    print("\n".join(console_lines(report, fuzz_report_text)), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
