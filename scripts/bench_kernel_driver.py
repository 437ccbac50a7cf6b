#!/usr/bin/env python3
"""Reference measurement: the in-kernel virtio_mem driver, and the sysfs floor.

One VM (TCG unless KVM was proven to work): 2 vCPUs, 1 GiB boot memory, virtio-mem
``vm0`` (4 GiB region, 2 MiB blocks) driven by the in-kernel driver with
``memhp_default_state=online_movable``, plus a cold-plugged 4 GiB ``pc-dimm`` that the
guest does NOT add (``acpi_no_memhotplug``).

1. Kernel driver: from ``qom-set requested-size`` to QEMU's ``size`` reaching the
   target, and to the guest's MemTotal settling at base + target, for 0 -> 4 GiB and
   4 GiB -> 0, 3 runs each. QEMU is polled over QMP and MemTotal through the guest
   runner in one loop; the mean poll round trip is recorded (the resolution).
2. The floor, in the same guest, with no device traffic: Python writing sysfs for the
   same number of 128 MiB memory blocks (32). The pc-dimm is fully backed RAM that QEMU
   has plugged, so probing its addresses is legitimate (never probe unplugged
   virtio-mem memory): probe + online_movable of the 32 blocks (possible once per boot,
   so 1 run), then offline and online_movable of the same present blocks, 3 runs each.

Prints a table and writes JSON to results/bench/kernel-driver-<time>.json (and
kernel-driver-latest.json). Under TCG compare only ratios measured in the same VM.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_agent import stats
from vmharness import Dimm, GiB, MemDevice, MiB, TestVM, VMConfig, paths
from vmharness.sizes import fmt_size

RUNS = 3
TARGET = 4 * GiB
TIMEOUT = 300.0

CONFIG = VMConfig(
    name="bench-kernel-driver",
    cpus=2,
    memory=1 * GiB,
    in_kernel_driver=True,
    devices=(MemDevice("vm0", size=TARGET, block_size=2 * MiB),),
    dimms=(Dimm("dimm0", size=TARGET),),
    acpi_memhotplug=False,
)

FLOOR_SCRIPT = r"""
import json, os, sys, time
MEM = "/sys/devices/system/memory"
addr, n, runs = int(sys.argv[1], 0), int(sys.argv[2]), int(sys.argv[3])
bs = int(open(f"{MEM}/block_size_bytes").read(), 16)
ids = [addr // bs + i for i in range(n)]
def write(path, text):
    with open(path, "w") as f:
        f.write(text)
def set_state(state):
    t = time.perf_counter()
    for i in ids:
        write(f"{MEM}/memory{i}/state", state)
    return time.perf_counter() - t
present = [i for i in ids if os.path.exists(f"{MEM}/memory{i}")]
# memhp_default_state=online_movable (for the in-kernel driver) would online each block
# inside the probe write; the agent onlines its blocks itself, so measure it that way.
auto = open(f"{MEM}/auto_online_blocks").read().strip()
write(f"{MEM}/auto_online_blocks", "offline")
out = {"auto_online_blocks_was": auto, "block_size": bs, "blocks": n, "first_block": ids[0]}
out["already_present"] = len(present)
if not present:
    probe = online = 0.0
    for i in ids:
        t = time.perf_counter()
        write(f"{MEM}/probe", hex(i * bs))
        t2 = time.perf_counter()
        write(f"{MEM}/memory{i}/state", "online_movable")
        probe += t2 - t
        online += time.perf_counter() - t2
    out["probe_online"] = probe + online
    out["probe_only"] = probe
    out["online_after_probe"] = online
out["offline"] = []
out["online_movable"] = []
for _ in range(runs):
    out["offline"].append(set_state("offline"))
    out["online_movable"].append(set_state("online_movable"))
out["offline_last"] = set_state("offline")
write(f"{MEM}/auto_online_blocks", auto)
print(json.dumps(out))
"""


def timed_resize(vm: TestVM, target: int, base_total: int) -> dict[str, float]:
    """qom-set, then poll QEMU and MemTotal until both reach target."""
    t_qemu = t_guest = None
    polls = 0
    t0 = time.perf_counter()
    vm.resize("vm0", target)
    while t_qemu is None or t_guest is None:
        now = time.perf_counter() - t0
        if now > TIMEOUT:
            raise TimeoutError(f"resize to {fmt_size(target)} not done after {TIMEOUT} s")
        if t_qemu is None and vm.plugged("vm0") == target:
            t_qemu = time.perf_counter() - t0
        if t_guest is None and vm.mem_total() == base_total + target:
            t_guest = time.perf_counter() - t0
        polls += 1
    elapsed = time.perf_counter() - t0
    return {"qemu": t_qemu, "guest": t_guest, "poll_period": elapsed / polls}


def main() -> int:
    """Run the benchmark; print the table; write the JSON."""
    t_start = time.time()
    with TestVM(CONFIG) as vm:
        assert vm.paths is not None
        print(f"VM up in {vm.boot_seconds:.1f} s ({vm.accel}); logs: {vm.paths.run_dir}")
        base_total = vm.mem_total()
        samples: dict[str, dict[str, list[float]]] = {
            "0->4G": {"qemu": [], "guest": []},
            "4G->0": {"qemu": [], "guest": []},
        }
        periods: list[float] = []
        for run in range(RUNS):
            for name, target in (("0->4G", TARGET), ("4G->0", 0)):
                r = timed_resize(vm, target, base_total)
                samples[name]["qemu"].append(r["qemu"])
                samples[name]["guest"].append(r["guest"])
                periods.append(r["poll_period"])
                print(f"  run {run + 1} {name}: qemu {r['qemu']:.3f} s, guest {r['guest']:.3f} s")
            time.sleep(0.5)
        assert vm.plugged("vm0") == 0 and vm.mem_total() == base_total

        dimm = vm.query()["dimm0"]
        nblocks = TARGET // (128 * MiB)
        script = vm.paths.share / "floor.py"
        script.write_text(FLOOR_SCRIPT)
        floor = json.loads(
            vm.sh(f"python3 -S {script} {dimm['addr']:#x} {nblocks} {RUNS}", timeout=600)
        )
        qemu_version = subprocess.run(
            ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
        result: dict[str, Any] = {
            "when": datetime.now().isoformat(timespec="seconds"),
            "accel": vm.accel,
            "qemu": qemu_version,
            "kernel": str(vm.paths.kernel),
            "guest_kernel": vm.sh("uname -r").strip(),
            "vm": {
                "cpus": CONFIG.cpus,
                "boot_memory": CONFIG.memory,
                "device": "virtio-mem-pci vm0, 4 GiB region, 2 MiB blocks, in-kernel driver, "
                "memhp_default_state=online_movable",
            },
            "base_mem_total": base_total,
            "kernel_driver": {
                name: {side: stats(v) for side, v in d.items()} for name, d in samples.items()
            },
            "poll_period_mean_s": statistics.mean(periods),
            "floor": {
                "method": (
                    "Python in the guest writing sysfs, no device traffic: the 32 x 128 MiB "
                    "memory blocks of a cold-plugged 4 GiB pc-dimm (fully backed by QEMU) "
                    "that the guest did not add (acpi_no_memhotplug), auto_online_blocks set to "
                    "offline: probe + online_movable once per boot, then offline / "
                    "online_movable of the same present blocks"
                ),
                "dimm_addr": dimm["addr"],
                **floor,
            },
            "run_dir": str(vm.paths.run_dir),
            "wall_s": time.time() - t_start,
        }
    f = result["floor"]
    if f.get("already_present"):
        f["method"] += (
            f" (WARNING: {f['already_present']} blocks were already present, "
            "so probe could not be measured)"
        )
    for k in ("offline", "online_movable"):
        f[k] = stats(f[k])

    lines = [
        f"in-kernel virtio_mem driver vs sysfs floor ({result['accel']}, {RUNS} runs, "
        f"{nblocks} x 128 MiB; poll period {result['poll_period_mean_s'] * 1000:.0f} ms)",
        f"{'what':<46} {'median s':>9} {'min s':>8} {'max s':>8} {'spread':>8} {'ms/block':>9}",
    ]

    def row(label: str, s: dict[str, Any]) -> None:
        lines.append(
            f"{label:<46} {s['median']:>9.3f} {s['min']:>8.3f} {s['max']:>8.3f} "
            f"{s['spread']:>8.3f} {s['median'] / nblocks * 1000:>9.1f}"
        )

    kd = result["kernel_driver"]
    row("kernel driver 0->4G: QEMU size reached", kd["0->4G"]["qemu"])
    row("kernel driver 0->4G: guest MemTotal settled", kd["0->4G"]["guest"])
    row("kernel driver 4G->0: QEMU size reached", kd["4G->0"]["qemu"])
    row("kernel driver 4G->0: guest MemTotal settled", kd["4G->0"]["guest"])
    if "probe_online" in f:
        row("floor: probe + online_movable (1 run)", stats([f["probe_online"]]))
    row("floor: offline (present blocks)", f["offline"])
    row("floor: online_movable (present blocks)", f["online_movable"])
    table = "\n".join(lines)
    print(table)
    result["table"] = table

    path = paths.write_bench_result("kernel-driver", result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
