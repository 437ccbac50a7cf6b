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

4. with ``--grow SIZE``: a fresh agent (not profiled) grows vm0 from 0 to SIZE, with
   kprobe events on ``probe_store``, ``state_store`` (``drivers/base/memory.c``) and
   ``rcu_sync_enter`` (``kernel/rcu/sync.c``: the grace period ``percpu_down_write`` of
   ``mem_hotplug_lock`` may wait for): per write and per lock taken, how long, and the
   kernel uevents sent (``/sys/kernel/uevent_seqnum``) and the agent's context switches
   per grown GiB.

``--src DIR`` runs the agent from another source tree (``PYTHONPATH``), to measure an
older revision in the same guest. Prints everything; nothing here asserts on time.

    .venv/bin/python scripts/profile_startup.py [--src DIR --src this] [--grow 8G]
"""

from __future__ import annotations

import argparse
import compileall
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
    """``prog run`` to ready (seconds, timed in the guest), then stopped."""
    seconds = start_agent_detached(vm, prog, env)
    stop_agent(vm)
    return seconds


TRACING = "/sys/kernel/tracing"
#: (event, probe): kprobe and kretprobe pairs, timed in the guest's trace buffer.
KPROBES = (
    ("probe", "probe_store"),
    ("state", "state_store"),
    ("rcusync", "rcu_sync_enter"),
)
TRACE_LINE = re.compile(r"\s(\d+\.\d+): (\w+)_(in|out): ")


def start_tracing(vm: TestVM) -> None:
    """kprobe and kretprobe events on KPROBES, enabled, in an empty trace buffer."""
    vm.guest(f"mountpoint -q {TRACING} || mount -t tracefs nodev {TRACING}")
    defs = "".join(
        f" echo 'p:vmg/{e}_in {f}' >> {TRACING}/kprobe_events || echo no kprobe on {f};"
        f" echo 'r:vmg/{e}_out {f}' >> {TRACING}/kprobe_events;"
        for e, f in KPROBES
    )
    print(
        vm.sh(
            f"echo 0 > {TRACING}/tracing_on; echo > {TRACING}/trace;"
            f" echo > {TRACING}/kprobe_events; {defs} echo 1 > {TRACING}/events/vmg/enable;"
            f" echo 1 > {TRACING}/tracing_on; cat {TRACING}/kprobe_events"
        ).strip()
    )


def stop_tracing(vm: TestVM) -> dict[str, list[float]]:
    """Durations (seconds) of each KPROBES function's calls, from the trace buffer."""
    text = vm.sh(
        f"echo 0 > {TRACING}/tracing_on; cat {TRACING}/trace;"
        f" echo 0 > {TRACING}/events/vmg/enable; echo > {TRACING}/kprobe_events",
        timeout=300,
    )
    durations: dict[str, list[float]] = {e: [] for e, _ in KPROBES}
    entered: dict[str, float] = {}
    for line in text.splitlines():
        found = TRACE_LINE.search(line)
        if found is None:
            continue
        stamp, event, edge = float(found[1]), found[2], found[3]
        if edge == "in":
            entered[event] = stamp
        elif event in entered:
            durations[event].append(stamp - entered.pop(event))
    return durations


def grow(vm: TestVM, env: str, device: str, size: int) -> None:
    """A fresh agent grows ``device`` from 0 to ``size`` under the kprobes; what it cost."""
    start_agent_detached(vm, VMEM_GUEST, env)
    if vm.guest(f"kill -0 $(cat {AGENT_PID})")[0] != 0:
        print(f"the agent did not start:\n{vm.sh(f'tail -n 20 {LOG}')}")
        return
    pid = vm.sh(f"cat {AGENT_PID}").strip()
    switches = f"grep ctxt_switches /proc/{pid}/status | awk '{{s += $2}} END {{print s}}'"
    seq0 = int(vm.read("/sys/kernel/uevent_seqnum"))
    ctx0 = int(vm.sh(switches))
    total0 = vm.mem_total()
    start_tracing(vm)
    t0 = time.perf_counter()
    vm.resize(device, size)
    vm.wait_until(lambda: vm.mem_total() >= total0 + size - 128 * MiB, timeout=900, what="grow")
    elapsed = time.perf_counter() - t0
    durations = stop_tracing(vm)
    uevents = int(vm.read("/sys/kernel/uevent_seqnum")) - seq0
    ctx = int(vm.sh(switches)) - ctx0
    stop_agent(vm)
    gib = size / GiB
    print(
        f"grow {device} 0 -> {size // GiB} GiB: {elapsed:.2f} s to MemTotal (host-side polling);"
        f" {uevents} kernel uevents ({uevents / gib:.1f} per GiB); agent context switches"
        f" {ctx} ({ctx / gib:.1f} per GiB)"
    )
    for event, function in KPROBES:
        times = sorted(durations[event])
        if not times:
            print(f"  {function}: no call traced")
            continue
        waited = [t for t in times if t >= WAITED]
        print(
            f"  {function}: {len(times)} calls, total {sum(times):.3f} s, median"
            f" {times[len(times) // 2] * 1e3:.2f} ms, max {times[-1] * 1e3:.2f} ms;"
            f" {len(waited)} of >= {WAITED * 1e3:.0f} ms (total {sum(waited):.3f} s)"
        )


#: An rcu_sync_enter this long waited for a grace period (a pass without one takes
#: microseconds: a spinlock and a counter).
WAITED = 0.001


def start_agent_detached(vm: TestVM, prog: str, env: str) -> float:
    """Start ``prog run`` detached; seconds until its control socket exists (timed in the
    guest, polled every 20 ms)."""
    script = (
        f"rm -f {CONTROL_SOCKET}; t0=$(date +%s%N);"
        f" {env} setsid {prog} run --noiommu --log-level info >{LOG} 2>&1 </dev/null &"
        f" echo $! >{AGENT_PID};"
        f" while ! test -S {CONTROL_SOCKET}; do kill -0 $(cat {AGENT_PID}) || break; sleep 0.02;"
        " done; t1=$(date +%s%N); echo $(( (t1 - t0) / 1000 ))"
    )
    return int(vm.sh(script, timeout=300).strip().splitlines()[-1]) / 1e6


def stop_agent(vm: TestVM) -> None:
    """SIGTERM, and wait for the exit."""
    vm.guest(f"kill -TERM $(cat {AGENT_PID})")
    vm.wait_until(
        lambda: vm.guest(f"kill -0 $(cat {AGENT_PID})")[0] != 0,
        timeout=300,
        what="the agent to exit",
    )


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


def source_env(src: str) -> str:
    """The agent's environment for a source tree ("this": the checkout's own)."""
    return "" if src == "this" else f"PYTHONPATH={shlex.quote(str(Path(src).resolve()))}"


def measure_startup(vm: TestVM, bdfs: list[str], src: str, repeat: int) -> None:
    """Floor, run -> ready fresh and restarted, and one run under cProfile, for ``src``."""
    env = source_env(src)
    where = vm.sh(f"{env} {VENV_PYTHON} -c 'import vmem_guest; print(vmem_guest.__file__)'")
    print(f"===== agent source {src}: {where.strip()} =====")
    for what, seconds in floor(vm, env).items():
        print(f"floor: {what}: {seconds:.3f} s")
    fresh = []
    for _ in range(repeat):
        fresh_state(vm, bdfs, env)
        fresh.append(timed_run(vm, VMEM_GUEST, env))
    print("run -> ready, fresh boot state: " + ", ".join(f"{s:.3f} s" for s in fresh))
    print(f"run -> ready, restart (trackers kept, bound): {timed_run(vm, VMEM_GUEST, env):.3f} s")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--src",
        action="append",
        help="run the agent from this source tree (PYTHONPATH; 'this': the checkout's);"
        " repeat for a before/after in one guest (default: this)",
    )
    parser.add_argument("--region", default="256G", help="per device (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=REPEAT)
    parser.add_argument(
        "--no-bytecode",
        action="store_true",
        help="do not compile the trees first (the guest's read-only root then compiles every"
        " module at every start)",
    )
    parser.add_argument(
        "--grow", help="then grow a device from 0 to this size, traced (vm0, vm1: one per --src)"
    )
    args = parser.parse_args()
    sources = args.src or ["this"]
    if args.grow and len(sources) > 2:
        parser.error("--grow takes at most two --src: each grows a device of its own")
    if not args.no_bytecode:  # as an install has it (pip and dpkg compile)
        for src in sources:
            compileall.compile_dir((REPO if src == "this" else Path(src)) / "vmem_guest", quiet=1)
    cfg = guest_config(parse_size(args.region))
    started = time.time()
    with TestVM(cfg) as vm:
        print(f"VM up in {vm.boot_seconds:.1f} s ({vm.accel}); {vm.read('/proc/cmdline').strip()}")
        bdfs = sorted(re.findall(r"^(\S+)", vm.sh(f"{VMEM_GUEST} devices"), flags=re.MULTILINE))
        bdfs = [b for b in bdfs if re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.\d", b)]
        print(f"devices: {', '.join(bdfs)}")
        for src in sources:
            measure_startup(vm, bdfs, src, args.repeat)
        if args.grow:
            for src, device in zip(sources, ("vm0", "vm1"), strict=False):
                print(f"===== grow, agent source {src} =====")
                fresh_state(vm, bdfs, source_env(src))
                grow(vm, source_env(src), device, parse_size(args.grow))
    print(f"wall {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
