#!/usr/bin/env python3
"""``make faults``: the kernel refuses the agent's probes, onlines, offlines, soft
offlines and unpoisons at random while the host grows and shrinks; check, converge.

Boots the chaos guest (in-kernel virtio-mem driver blacklisted, VFIO no-IOMMU,
devices with 2 MiB blocks) and starts ``vmem-guest run --noiommu``; grows every
device to its whole region and back to 0 with no fault on, so every memory block is
present and no probe runs under faults (Linux's hot-add crashes on some failed
allocations: ``KernelFaultRun.add_every_block``). Then N rounds:

1. faults on, aimed at the agent's process only (``scripts/vmharness/faults.py``:
   ``failslab`` and/or ``fail_page_alloc`` with ``task-filter``, make-it-fail on
   every task of the agent), at a random probability (2 to 50 %) and a random
   bound on how many (or none);
2. the host resizes every device, shrinking and growing by turns (the sizes of
   ``make chaos``: mostly not whole memory blocks, so subblocks are taken and
   given back), and lets the agent work under faults for a few seconds, reading
   the tracker files meanwhile: the agent must stay alive and no device may be
   marked broken (a refusal is not a broken device);
3. faults off: what was injected (exact per kind, from ``times``; per operation
   from the call traces in the kernel log) and what the agent was refused (its
   log: ``online memoryN failed: ENOMEM ...``);
4. the agent must converge with no fault left: QEMU's size is the tracker's
   plugged, the request is met (exactly after a shrink), nothing left taken or
   pending, plugged + holes = online (nothing plugged left unused), MemTotal grew
   by exactly the online size and HardwareCorrupted is the holes, STATE through
   the agent over every run in use answers PLUGGED and over every hole UNPLUGGED
   (``Chaos.converged``);
5. every ``--dead-check-every`` rounds the agent is stopped and
   ``chaos_guest.py dead`` checks with raw STATE requests, sysfs, kpageflags and
   the tracker: every page of every online block lies in a plugged subblock or is
   HWPOISON, tracker = device = sysfs, nothing plugged that is not online; then it
   is started again.

    .venv/bin/python scripts/kernel_faults.py [--rounds 20] [--seed S]
        [--devices 1] [--region 2G] [--window 4] [--dead-check-every 5]

Prints a line per round, then which operations were refused how often and
``K/N recovered, V violations``; writes ``results/faults/faults-<time>.json``.
Exit status 1 on any violation or any round the agent did not recover from.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import chaos  # noqa: E402
from vmharness import faults as kfaults  # noqa: E402

#: A refusal in the agent's log: the operation, then the errno's name
#: (``errors.KernelError``: "online memory42 failed: ENOMEM (...)", "soft offline of
#: pfn 0x... failed: ...", "unpoison failed: ..."); followed by "later" when the
#: agent retries (``DeviceDriver._avoid`` / ``_avoid_subblocks``). A request the
#: no-IOMMU check kept back ("PLUG ... not sent: read /proc/self/pagemap failed:
#: ENOMEM", ``errors.PagemapRefused``) counts as "pagemap".
_REFUSAL = re.compile(
    r"(?P<op>(?:open|read) /proc/self/pagemap|probe|online|offline|soft offline|unpoison"
    r"|read [\w/]+)(?: of pfn 0x[0-9a-f]+)?(?: memory\d+)? failed: (?P<errno>E[A-Z0-9]+)"
)
PROBABILITIES = (2, 5, 10, 20, 50)
TIMES = (None, 5, 20, 100)


def refusals(log: str) -> Counter[str]:
    """Refusals in a stretch of the agent's log, by operation (and errno)."""
    found: Counter[str] = Counter()
    for line in log.splitlines():
        match = _REFUSAL.search(line)
        if match:
            op = match.group("op")
            if op.endswith("/pagemap"):
                op = "pagemap"
            elif op.startswith("read "):
                op = "read sysfs"
            found[f"{op} {match.group('errno')}"] += 1
    return found


def random_specs(rng: random.Random) -> list[kfaults.FaultSpec]:
    """One or both kinds, each at a random probability and bound."""
    kinds = rng.choice([["failslab"], ["fail_page_alloc"], list(kfaults.KINDS)])
    return [kfaults.FaultSpec(kind, rng.choice(PROBABILITIES), rng.choice(TIMES)) for kind in kinds]


@dataclasses.dataclass
class Round:
    index: int
    specs: list[str]
    before: dict[str, int] = dataclasses.field(default_factory=dict)
    requested: dict[str, int] = dataclasses.field(default_factory=dict)
    injected: dict[str, int] = dataclasses.field(default_factory=dict)
    traced: dict[str, int] = dataclasses.field(default_factory=dict)
    refused: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Most memory blocks plugged but not online seen while faults were on.
    plugged_unused: int = 0
    violations: list[str] = dataclasses.field(default_factory=list)
    error: str = ""
    dead_check: bool = False
    window_seconds: float = 0.0
    converge_seconds: float = 0.0

    @property
    def recovered(self) -> bool:
        return not self.error


class KernelFaultRun:
    """Rounds of faults, resizes and convergence on a booted chaos VM."""

    def __init__(self, vm: Any, *, seed: int, window: float = 4.0, log: Any = print) -> None:
        self.vm = vm
        self.rng = random.Random(seed)
        self.seed = seed
        self.window = window
        self.log = log
        self.chaos = chaos.Chaos(vm, seed=self.rng.randrange(1 << 32), log=log)
        self.faults = kfaults.Faults(vm)
        self.rounds: list[Round] = []
        self.shrinking = False
        self.log_offset = 0
        self.final: list[str] = []

    def start(self) -> None:
        reason = kfaults.available(self.vm)
        if reason is not None:
            raise RuntimeError(reason)
        self.chaos.start()
        self.add_every_block()

    def add_every_block(self) -> None:
        """Grow every device to its whole region, then back to 0, with no fault on:
        from then on every memory block of the regions is present (offline when not in
        use; userspace cannot remove one), so the agent never probes under faults.

        Linux's hot-add does not survive every allocation that fails inside it, and
        a guest that panics tests nothing of the agent (docs/safety.md, "Kernel
        faults"): ``firmware_map_add_hotplug`` leaves an entry that ``kobject_add``
        failed to name, and that ``kobject_put`` freed, on its list, and the next
        probe walks it (drivers/firmware/memmap.c); the direct map's page tables are
        used unchecked (arch/x86/mm/init_64.c, the reason for ``min-order`` 1)."""
        for dev_id, dev in self.chaos.devices.items():
            self.chaos.requested[dev_id] = dev.size
            self.vm.resize(dev_id, dev.size)
        error = self.chaos.converged({})
        for dev_id in self.chaos.devices:
            self.chaos.requested[dev_id] = 0
            self.vm.resize(dev_id, 0)
        error = error or self.chaos.converged(dict.fromkeys(self.chaos.devices, True))
        if error:
            raise RuntimeError(f"adding every memory block before the faults: {error}")
        self.log("every memory block of the region added (no probe under faults)")

    def agent_pid(self) -> int:
        return int(self.vm.read(self.chaos.ga.AGENT_PID).strip())

    def new_log(self) -> str:
        """The agent's log since the last call."""
        text, count = self.vm.read_from(self.chaos.ga.AGENT_LOG, self.log_offset)
        self.log_offset += count
        return text

    def run(self, count: int, dead_check_every: int = 0) -> None:
        """``count`` rounds of random faults; the raw check every ``dead_check_every``."""
        for _ in range(count):
            if self.rng.random() < 0.8:
                self.shrinking = not self.shrinking
            self.run_round(random_specs(self.rng), self.shrinking, dead_check_every)

    def run_round(
        self, specs: list[kfaults.FaultSpec], shrinking: bool, dead_check_every: int = 0
    ) -> Round:
        """One round (:meth:`round_once`), the raw check when due; logged and kept."""
        record = self.round_once(len(self.rounds) + 1, specs, shrinking)
        if dead_check_every and record.index % dead_check_every == 0 and record.recovered:
            self.dead_check(record)
        self.rounds.append(record)
        self.log(self.round_line(record))
        return record

    def round_once(self, index: int, specs: list[kfaults.FaultSpec], shrinking: bool) -> Round:
        """Faults on, a resize, a window of work under faults, faults off, converge."""
        record = Round(index, [str(spec) for spec in specs])
        self.new_log()
        self.faults.on(self.agent_pid(), specs)
        try:
            record.before = self.chaos.resize_all(shrinking)
            record.requested = dict(self.chaos.requested)
            self.watch(record)
        finally:
            report = self.faults.off()
        record.injected = report.injected
        record.traced = dict(report.operations)
        record.refused = dict(refusals(self.new_log()))
        t0 = time.monotonic()
        try:
            record.error = self.chaos.converge_exact(record.before)
        except Exception as exc:
            record.error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        record.converge_seconds = time.monotonic() - t0
        record.refused = dict(Counter(record.refused) + refusals(self.new_log()))
        return record

    def watch(self, record: Round) -> None:
        """The window under faults: the agent alive, no device broken, and how much
        is plugged but not online, from the tracker files every half second."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.window:
            time.sleep(0.5)
            if self.chaos.ga.agent_died(self.vm):
                record.violations.append("the agent died under faults")
                return
            try:
                snap = self.chaos.status()
            except RuntimeError:
                continue  # the agent inside a write section twice: look again later
            for dev in snap.values():
                if dev["broken"]:
                    record.violations.append(f"{dev['device']} broken: {dev['broken_reason']}")
                unused = dev["plugged_size"] + dev["hole_bytes"] - dev["online_size"]
                record.plugged_unused = max(record.plugged_unused, unused // chaos.MEMORY_BLOCK)
            if record.violations:
                return
        record.window_seconds = time.monotonic() - t0

    def dead_check(self, record: Round) -> None:
        """Stop the agent, check with raw STATE, sysfs, kpageflags, start it again."""
        record.dead_check = True
        found = self.chaos.final_check()
        record.violations += found
        self.chaos.final = []
        self.chaos.restart_agent()
        self.log_offset = 0

    def round_line(self, r: Round) -> str:
        sizes = ",".join(
            f"{chaos._mib(r.before[d])}->{chaos._mib(s)}" for d, s in r.requested.items()
        )
        injected = ", ".join(f"{k} {v}" for k, v in r.injected.items())
        refused = ", ".join(f"{k} x{v}" for k, v in sorted(r.refused.items())) or "nothing"
        verdict = "recovered" if r.recovered else f"NOT RECOVERED: {r.error}"
        if r.violations:
            verdict += " VIOLATIONS: " + "; ".join(r.violations)
        dead = ", raw check ok" if r.dead_check and not r.violations else ""
        return (
            f"round {r.index:3d}: {' + '.join(r.specs)}; {sizes} MiB; injected {injected};"
            f" refused {refused}; at most {r.plugged_unused} blocks plugged unused:"
            f" {verdict} (converged {r.converge_seconds:.1f} s after faults{dead})"
        )

    def summary(self) -> dict[str, Any]:
        refused: Counter[str] = Counter()
        traced: Counter[str] = Counter()
        injected: Counter[str] = Counter()
        for r in self.rounds:
            refused.update(r.refused)
            traced.update(r.traced)
            injected.update(r.injected)
        violations = sum(len(r.violations) for r in self.rounds) + len(self.final)
        recovered = sum(r.recovered for r in self.rounds)
        return {
            "seed": self.seed,
            "rounds": len(self.rounds),
            "recovered": recovered,
            "violations": violations,
            "injected": dict(injected),
            "traced": dict(traced),
            "refused": dict(refused),
            "final_check": self.final,
            "ok": recovered == len(self.rounds) and violations == 0,
        }

    def summary_line(self) -> str:
        s = self.summary()
        return f"{s['recovered']}/{s['rounds']} recovered, {s['violations']} violations"

    def finish(self) -> None:
        self.final = self.chaos.final_check()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--devices", type=int, choices=(1, 2), default=1)
    parser.add_argument("--region", default="2G", help="region size of each device")
    parser.add_argument("--window", type=float, default=4.0, help="seconds under faults")
    parser.add_argument("--dead-check-every", type=int, default=5, help="0: only at the end")
    args = parser.parse_args()

    import vmharness
    from vmharness import paths

    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    cfg = chaos.chaos_config(args.devices, vmharness.parse_size(args.region), name="faults")
    t0 = time.monotonic()
    with vmharness.TestVM(cfg) as vm:
        print(f"VM up in {vm.boot_seconds:.0f} s ({vm.accel}); run dir {vm.paths.run_dir}")
        print(f"{args.devices} device(s), region {args.region}; seed {seed}; {args.rounds} rounds")
        run = KernelFaultRun(vm, seed=seed, window=args.window, log=_flush_print)
        run.start()
        try:
            run.run(args.rounds, args.dead_check_every)
            run.finish()
        finally:
            report = {
                "summary": run.summary(),
                "rounds": [dataclasses.asdict(r) for r in run.rounds],
                "run_dir": str(vm.paths.run_dir),
                "seconds": time.monotonic() - t0,
            }
            out = paths.results_dir() / "faults" / f"faults-{datetime.now():%Y%m%d-%H%M%S}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"results: {out}")
    s = report["summary"]
    print(f"faults injected: {s['injected']}; by call trace: {s['traced']}")
    print(f"refused to the agent (its log): {s['refused']}")
    print(f"final check: {'; '.join(s['final_check']) or 'ok'}")
    print(run.summary_line())
    return 0 if s["ok"] else 1


def _flush_print(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
