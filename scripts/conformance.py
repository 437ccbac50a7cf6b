#!/usr/bin/env python3
"""``make conformance``: QEMU's virtio-mem device against vmem_guest's model, in a VM.

Boots a guest with the in-kernel virtio-mem driver blacklisted and VFIO's
no-IOMMU mode, sets the device's requested-size from the host, runs
``vmem-guest fuzz --noiommu --examples N`` in the guest, prints its report and
checks from the host that QEMU's plugged size is 0 afterwards.

    .venv/bin/python scripts/conformance.py [--examples 1000] [--seed S]
        [--requested 512M] [--block 2M] [--size 4G]

Exit status 0 when the fuzzer found no mismatch and QEMU's size is 0, else 1.
The spec oracle's findings are printed by class (docs/spec-oracle.md); a rule
QEMU breaks while matching its profile does not change the exit status.

Host resizes: the guest cannot resize the host, so :class:`HostResizer` serves
the fuzzer's ``--host-resize DIR`` requests (files in the VM's writable share)
with QMP ``qom-set requested-size`` while the guest command runs; the fuzzer
then interleaves resizes with its requests. ``--no-resizes`` runs without.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmharness import MemDevice, TestVM, VMConfig, fmt_size, parse_size
from vmharness.guest_agent import VMEM_GUEST

from vmem_guest.conformance.classify import report_lines


class HostResizer:
    """Carry out a guest fuzzer's resize requests (``vmem-guest fuzz --host-resize DIR``).

    A thread polls ``directory`` for ``resize-<n>.json`` and answers each with
    ``resize-<n>.done`` after ``qom-set``. Use it around the guest command only:
    the main thread must not use QMP meanwhile.
    """

    def __init__(self, vm: TestVM, device_id: str, directory: Path) -> None:
        self.vm = vm
        self.device_id = device_id
        self.directory = directory
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="host-resizer", daemon=True)

    def __enter__(self) -> HostResizer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _serve(self) -> None:
        """The guest numbers its requests 1, 2, ...: wait for the next one only (a glob
        over thousands of answered requests would make every poll slower)."""
        number = 1
        while not self._stop.is_set():
            request = self.directory / f"resize-{number}.json"
            if not request.exists():
                time.sleep(0.002)
                continue
            try:
                self.vm.resize(self.device_id, int(json.loads(request.read_text())["size"]))
                answer: dict[str, object] = {"ok": True}
                self.count += 1
            except Exception as exc:  # answered to the guest, which reports it
                answer = {"ok": False, "error": str(exc)}
            done = request.with_suffix(".done")
            partial = done.with_suffix(".part")
            partial.write_text(json.dumps(answer))
            partial.rename(done)
            number += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--requested", default="512M")
    parser.add_argument("--block", default="2M")
    parser.add_argument("--size", default="4G")
    parser.add_argument("--timeout", type=float, default=6 * 3600)
    parser.add_argument("--no-resizes", action="store_true", help="no host resizes")
    args = parser.parse_args()

    device = MemDevice("vm0", size=parse_size(args.size), block_size=parse_size(args.block))
    cfg = VMConfig(name="conformance", in_kernel_driver=False, noiommu=True, devices=(device,))
    requested = parse_size(args.requested)
    fuzz_args = f"fuzz --noiommu --examples {args.examples} --max-steps {args.max_steps} --json"
    if args.seed is not None:
        fuzz_args += f" --seed {args.seed}"
    with TestVM(cfg) as vm:
        assert vm.paths is not None
        print(f"VM up in {vm.boot_seconds:.0f} s ({vm.accel}); run dir {vm.paths.run_dir}")
        vm.resize("vm0", requested)
        print(
            f"device vm0: region {fmt_size(device.size)}, block {fmt_size(device.block_size)},"
            f" requested-size {fmt_size(requested)}"
        )
        t0 = time.monotonic()
        serving: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        if not args.no_resizes:
            serving = HostResizer(vm, "vm0", vm.paths.share / "conformance-resize")
            fuzz_args += f" --host-resize {shlex.quote(str(serving.directory))}"
        print(f"guest: vmem-guest {fuzz_args}")
        with serving:
            rc, out = vm.guest(f"{shlex.quote(VMEM_GUEST)} {fuzz_args}", timeout=args.timeout)
        seconds = time.monotonic() - t0
        plugged_after = vm.plugged("vm0")
    lines = out.strip().splitlines()
    try:
        report = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        print(f"vmem-guest fuzz failed (rc {rc}):\n{out}")
        return 1
    print(f"\nguest run: {seconds:.0f} s")
    keys = ("seed", "examples", "profile", "offered_features", "feature_differences")
    keys += ("requests_compared", "model_only_requests", "resizes")
    for key in (*keys, "mismatches"):
        print(f"  {key:<22} {report[key]}")
    print("  device answers:")
    for name, count in report["answers"].items():
        print(f"    {name:<22} {count}")
    print(f"  QEMU plugged size after the run: {plugged_after}")
    if report["mismatch"]:
        print("\nMISMATCH:")
        print(json.dumps(report["mismatch"], indent=2))
    print("\n".join(report_lines(report)))
    ok = rc == 0 and report["mismatches"] == 0 and plugged_after == 0
    print(f"\nrequests compared: {report['requests_compared']}, mismatches: {report['mismatches']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
