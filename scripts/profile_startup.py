#!/usr/bin/env python3
"""Where the agent's start-up goes: ``vmem-guest run`` to ready, in the bench-scale guest.

Boots the guest of ``make bench-scale``'s agent (2 x 256 GiB ``virtio-mem-pci``, 4 MiB
blocks, 2 NUMA nodes, 2 GiB boot memory), set up as the README says (the in-kernel
driver kept off, ``vfio.enable_unsafe_noiommu_mode=1``, nothing else), then in the
guest, each time from a state a new boot would have (devices given back to
virtio-pci, no tracker file):

1. the interpreter alone (``python -c pass``) and ``import vmem_guest.cli``: the floor;
2. ``vmem-guest run --noiommu`` until its control socket exists (ready: every device
   attached), timed in the guest, REPEAT times; then a restart with the trackers kept;
3. the same once under cProfile from before the first import to the exit (SIGTERM once
   ready): the top functions by cumulative time, and the agent's log with its
   timestamps.

``--src DIR`` runs the agent from another source tree (``PYTHONPATH``), to measure an
older revision in the same guest. Prints everything; nothing here asserts on time.

    .venv/bin/python scripts/profile_startup.py [--src DIR] [--region 256G]
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig, parse_size
from vmharness.guest_agent import AGENT_PID, CONTROL_SOCKET, REPO, VMEM_GUEST

VENV_PYTHON = str(REPO / ".venv" / "bin" / "python")
STATE_DIR = "/run/vmem-guest"
LOG = "/run/startup-agent.log"
PROFILE = "/run/startup.prof"
REPEAT = 3
TOP = 30

#: Guest: profile ``vmem-guest ARGS`` from before its first import to its exit.
WRAPPER = r"""
import cProfile, sys
out = sys.argv[1]
sys.argv = ["vmem-guest", *sys.argv[2:]]
prof = cProfile.Profile()
prof.enable()
try:
    from vmem_guest import cli
    cli.main()
except SystemExit:
    pass
finally:
    prof.disable()
    prof.dump_stats(out)
"""

#: Guest: the top of a cProfile dump, by cumulative and by own time.
REPORT = r"""
import io, pstats, sys
for key in ("cumulative", "tottime"):
    buf = io.StringIO()
    pstats.Stats(sys.argv[1], stream=buf).strip_dirs().sort_stats(key).print_stats(int(sys.argv[2]))
    text = buf.getvalue()
    print(f"===== top {sys.argv[2]} by {key} =====")
    print(text[text.find("   ncalls"):].rstrip())
"""


def guest_config(region: int) -> VMConfig:
    """bench-scale's agent guest, booted as the README says."""
    return VMConfig(
        name="startup-profile",
        cpus=2,
        memory=2 * GiB,
        numa_nodes=2,
        in_kernel_driver=False,
        noiommu=True,
        secretmem=False,
        devices=tuple(
            MemDevice(dev, size=region, block_size=4 * MiB, node=node, reserve=False)
            for node, dev in enumerate(("vm0", "vm1"))
        ),
    )


def fresh_state(vm: TestVM, bdfs: list[str], env: str) -> None:
    """As after a boot: devices back with virtio-pci, no tracker, no agent."""
    for bdf in bdfs:
        vm.guest(f"{env} {VMEM_GUEST} unbind {bdf}")
    vm.sh(f"rm -rf {STATE_DIR}")


def timed_run(vm: TestVM, prog: str, env: str) -> float:
    """Start ``prog run`` detached; seconds until its control socket exists (timed in the
    guest, polled every 20 ms); then SIGTERM and wait for its exit."""
    script = (
        f"rm -f {CONTROL_SOCKET}; t0=$(date +%s%N);"
        f" {env} setsid {prog} run --noiommu --log-level info >{LOG} 2>&1 </dev/null &"
        f" echo $! >{AGENT_PID};"
        f" while ! test -S {CONTROL_SOCKET}; do kill -0 $(cat {AGENT_PID}) || break; sleep 0.02;"
        " done; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000 ))"
    )
    micros = int(vm.sh(script, timeout=300).strip().splitlines()[-1])
    vm.guest(f"kill -TERM $(cat {AGENT_PID})")
    vm.wait_until(
        lambda: vm.guest(f"kill -0 $(cat {AGENT_PID})")[0] != 0,
        timeout=300,
        what="the agent to exit",
    )
    return micros / 1e6


def floor(vm: TestVM, env: str) -> dict[str, float]:
    """Seconds for the interpreter alone and for importing the CLI, in the guest."""
    out = {}
    for what, code in (
        ("python -c pass", "pass"),
        ("import vmem_guest.cli", "import vmem_guest.cli"),
    ):
        line = vm.sh(
            f"t0=$(date +%s%N); {env} {VENV_PYTHON} -c {shlex.quote(code)};"
            " t1=$(date +%s%N); echo $(( (t1 - t0) / 1000 ))"
        )
        out[what] = int(line.strip().splitlines()[-1]) / 1e6
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", help="run the agent from this source tree (PYTHONPATH)")
    parser.add_argument("--region", default="256G", help="per device (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=REPEAT)
    args = parser.parse_args()
    env = f"PYTHONPATH={shlex.quote(str(Path(args.src).resolve()))}" if args.src else ""
    cfg = guest_config(parse_size(args.region))
    started = time.time()
    with TestVM(cfg) as vm:
        print(f"VM up in {vm.boot_seconds:.1f} s ({vm.accel}); {vm.read('/proc/cmdline').strip()}")
        where = vm.sh(f"{env} {VENV_PYTHON} -c 'import vmem_guest; print(vmem_guest.__file__)'")
        print(f"agent source: {where.strip()}")
        bdfs = sorted(
            re.findall(r"^(\S+)", vm.sh(f"{env} {VMEM_GUEST} devices"), flags=re.MULTILINE)
        )
        bdfs = [b for b in bdfs if re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.\d", b)]
        print(f"devices: {', '.join(bdfs)}")
        for what, seconds in floor(vm, env).items():
            print(f"floor: {what}: {seconds:.3f} s")
        fresh = []
        for _ in range(args.repeat):
            fresh_state(vm, bdfs, env)
            fresh.append(timed_run(vm, VMEM_GUEST, env))
        print("run -> ready, fresh boot state: " + ", ".join(f"{s:.3f} s" for s in fresh))
        print(
            f"run -> ready, restart (trackers kept, bound): {timed_run(vm, VMEM_GUEST, env):.3f} s"
        )
        fresh_state(vm, bdfs, env)
        wrapper = REPO / "results" / "startup_wrapper.py"
        wrapper.parent.mkdir(exist_ok=True)
        wrapper.write_text(WRAPPER)
        report = wrapper.with_name("startup_report.py")
        report.write_text(REPORT)
        profiled = timed_run(vm, f"{VENV_PYTHON} {wrapper} {PROFILE}", env)
        print(f"run -> ready under cProfile, fresh boot state: {profiled:.3f} s")
        print("agent log (profiled run):")
        print(vm.sh(f"cat {LOG}"))
        print(vm.sh(f"{VENV_PYTHON} {report} {PROFILE} {TOP}", timeout=300))
    print(f"wall {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
