#!/usr/bin/env python3
"""``make chaos``: SIGKILL the agent at random moments in a VM, check, restart, converge.

Boots one guest (in-kernel virtio-mem driver blacklisted, VFIO no-IOMMU mode,
virtio-mem devices with 2 MiB blocks) and starts ``vmem-guest run --noiommu``
detached in it. The agent shrinks at subblock granularity: it takes single 2 MiB
subblocks of an online memory block out of use (soft offline of every page,
verified HWPOISON in /proc/kpageflags, then UNPLUG), leaving holes, and gives
holes back first when growing (PLUG, then unpoison). Then, N times:

1. the host sets a new ``requested-size`` on every device, shrinking and growing
   by turns (mostly; a device at 0 or full goes the only way it can). Most sizes
   are not whole 128 MiB memory blocks: shrinks of a few subblocks (takes only),
   of up to 80 MiB, to anywhere below, or to whole blocks; grows that give back
   some holes only, that fill them all and add blocks, to anywhere above, or to
   the whole region. It waits a random time and kills the agent with SIGKILL:
   a fifth of the kills within 30 ms of the resize (intents in flight, the first
   take or give-back), 70 % within the time the work should take under TCG
   (about 35 ms a subblock taken, 12 ms one given back, 40 ms a memory block
   onlined or offlined: so they land inside takes, give-backs, offlines and
   plugs), the rest after it; never later than ``--max-delay``;
2. with the agent dead, ``chaos_guest.py dead`` runs in the guest (the checkout
   is the guest's root too) and checks from the device's side, with raw STATE
   requests and reads of sysfs, /proc/kpageflags and the tracker only (nothing
   plugged, onlined, offlined, poisoned or unpoisoned): every page of every
   online memory block of a device region lies in a subblock STATE finds plugged
   or is HWPOISON (invariant 1); the tracker's plug bitmap equals the device's
   outside the pending intent (invariant 3); taken bits lie under online blocks
   only, every hole is held taken and no page of a subblock in use is poisoned;
   the tracker and sysfs differ in at most the one memory block being onlined or
   offlined; the device's ``plugged_size`` equals what STATE finds and QEMU's size;
3. sometimes the host resizes again while the agent is dead;
4. the agent is restarted as systemd would and must converge, on every device:
   QEMU's size equals the tracker's plugged; the tracker's remainder is
   requested - plugged with 0 <= remainder < 128 MiB (growth into new blocks is
   whole blocks), and 0 when the restarted agent had to shrink (it ends exactly
   on the request) or when holes are left; no intent, not broken, no subblock
   left taken but plugged; plugged + holes = online (nothing plugged unused).
   MemTotal grew by exactly the online size (holes count in MemTotal) and
   HardwareCorrupted is the holes. ``chaos_guest.py converged`` then checks, with
   the agent running, that every hole's pages are HWPOISON and no page in use is,
   and that STATE (through the agent) over every run in use of an online block
   answers PLUGGED and over every run of holes UNPLUGGED.

Each kill is classified by where it landed: inside a tracker write, with an
intent pending (PLUG into holes, UNPLUG of taken subblocks, or of whole blocks),
inside a take (taken bits over plugged subblocks, not all pages poisoned yet),
taken but not yet unplugged (all poisoned, still plugged), giving back a hole
(plugged and taken after a PLUG), between a sysfs write and its record, plugged
but not online, between steps, or converged.

``--resets R`` adds R QMP ``system_reset``s with memory plugged and holes
(issue 5 item 3): after the new boot QEMU's size must be 0, HardwareCorrupted 0
and MemTotal back to boot memory, and the agent, started again, converges.

    .venv/bin/python scripts/chaos.py [--kills 100] [--resets 2] [--seed S]
        [--devices 2] [--region 2G] [--max-delay 2.0]

Prints one line per kill, the phase counts, the subblocks taken and given back
(from the agent logs) and ``K/N recovered, V invariant violations``; writes
``results/chaos/chaos-<time>.json`` (agent logs of each kill are in the VM's run
directory, ``share/agent-NNN.log``). Exit status 1 on any violation or any kill
the agent did not recover from.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
GUEST_CHECKS = SCRIPTS / "chaos_guest.py"
MEMORY_BLOCK = 128 << 20
#: How far a new boot's MemTotal may lie from the last boot's after a system_reset. The
#: kernel's own reservations differ a little from boot to boot (CI saw a boot 4 KiB
#: smaller); device memory comes online in whole memory blocks (128 MiB and more on
#: x86-64), so a margin this far below one block cannot hide a single one left online.
RESET_MEMTOTAL_MARGIN = 4 << 20
#: Reads of the tracker files before status() gives up on seeing them between writes.
STATUS_ATTEMPTS = 50
KILL_FIFO = "/run/chaos-kill.fifo"
STATE_DIR = "/run/vmem-guest"
#: What one step costs the agent under TCG, measured in the chaos VM (free pages;
#: pages in use cost more): only to time the kills inside the work of a resize.
TAKE_SECONDS = 0.035  #: soft offline of 512 pages, kpageflags checks, UNPLUG
GIVE_BACK_SECONDS = 0.012  #: unpoison of 512 pages (a PLUG covers a run of holes)
BLOCK_SECONDS = 0.04  #: offline or online of a 128 MiB block, its share of one request
#: Agent log lines of a take and of a give-back (tracker debug lines).
_SUBBLOCK_LOG = re.compile(r"tracker\.\S+: (taking|given back) addr=\S+ nb_blocks=(\d+)")


# --------------------------------------------------------------------------------------
# Sizes and timing.


def shrink_size(rng: random.Random, plugged: int, block: int) -> int:
    """A size below ``plugged`` (> 0): most end inside a memory block, so the agent
    takes subblocks; a few MiB is takes only (a kill lands in one of them)."""
    subblocks = plugged // block
    roll = rng.random()
    if roll < 0.35:
        return plugged - rng.randint(1, min(8, subblocks)) * block
    if roll < 0.6:
        return plugged - rng.randint(1, min(40, subblocks)) * block
    if roll < 0.85:
        return rng.randrange(0, subblocks) * block
    return rng.randrange(0, -(-plugged // MEMORY_BLOCK)) * MEMORY_BLOCK


def grow_size(rng: random.Random, plugged: int, holes: int, region: int, block: int) -> int:
    """A size above ``plugged`` (< ``region``): with holes, often only some of them
    (give-backs alone); otherwise all of them and new blocks, mostly with a
    remainder that no whole block covers."""
    roll = rng.random()
    if holes and roll < 0.4:
        size = plugged + rng.randint(1, holes // block) * block
    elif roll < 0.7:
        # Without holes, less than a block more plugs nothing: at least one block.
        blocks = rng.randrange(0 if holes else 1, 4)
        extra = blocks * MEMORY_BLOCK + rng.randrange(1, MEMORY_BLOCK // block) * block
        size = plugged + holes + extra
    elif roll < 0.9:
        size = rng.randrange(plugged // block + 1, region // block + 1) * block
    else:
        size = region
    return min(size, region)


def work_seconds(plugged: int, holes: int, requested: int, block: int) -> float:
    """About how long the agent works on one device to go from ``plugged`` to
    ``requested`` (whole blocks while a whole block is in excess, then takes;
    holes filled before new whole blocks)."""
    per_block = MEMORY_BLOCK // block
    if requested < plugged:
        excess = (plugged - requested) // block
        return excess // per_block * BLOCK_SECONDS + excess % per_block * TAKE_SECONDS
    deficit = (requested - plugged) // block
    fill = min(deficit, holes // block)
    return fill * GIVE_BACK_SECONDS + (deficit - fill) // per_block * BLOCK_SECONDS


def remainder_problems(dev: dict[str, Any], requested: int, exact: bool) -> list[str]:
    """What keeps a device's tracker from being at the agent's fixed point for
    ``requested`` (``exact``: the agent had to shrink, so it ends on the request)."""
    problems = []
    plugged, holes = dev["plugged_size"], dev["hole_bytes"]
    remainder = requested - plugged
    if dev["remainder"] != remainder:
        problems.append(f"remainder {_mib(dev['remainder'])} MiB, not requested - plugged")
    if not 0 <= remainder < MEMORY_BLOCK:
        problems.append(f"requested - plugged is {_mib(remainder)} MiB")
    elif remainder and exact:
        problems.append(f"a shrink ended {_mib(remainder)} MiB short of the request")
    elif remainder and holes:
        problems.append(f"{_mib(holes)} MiB of holes left {_mib(remainder)} MiB below the request")
    online = dev["online_size"]
    if plugged + holes != online:
        problems.append(
            f"plugged {_mib(plugged)} + holes {_mib(holes)} != online {_mib(online)} MiB"
        )
    return problems


def reset_memtotal_problem(memtotal: int, base: int) -> str:
    """'' when a new boot's MemTotal is the last boot's (``base``), within
    :data:`RESET_MEMTOTAL_MARGIN`; else what is wrong. Nothing of a device may be
    online after a system_reset: one memory block of it would add 128 MiB."""
    if abs(memtotal - base) <= RESET_MEMTOTAL_MARGIN:
        return ""
    return (
        f"MemTotal after reboot {memtotal} is {(memtotal - base) / (1 << 20):+.1f} MiB from"
        f" boot memory {base}: more than the {_mib(RESET_MEMTOTAL_MARGIN)} MiB boots differ by"
    )


def stable_status(
    read_copies: Callable[[], list[tuple[str, bytes, bytes]]],
    decode: Callable[[list[tuple[str, bytes]]], dict[int, dict[str, Any]]],
    sleep: Callable[[float], None] = time.sleep,
) -> dict[int, dict[str, Any]]:
    """Decode the tracker files once two reads of each are equal and none was taken
    inside a write section (a torn read, read again: ``write_in_progress``). Any
    other TrackerError (a file the reader would not trust, a corrupt one) is raised
    at once: it is a finding, not a race."""
    from vmem_guest.tracker import write_in_progress

    for _ in range(STATUS_ATTEMPTS):
        copies = read_copies()
        if all(a == b and not write_in_progress(a) for _name, a, b in copies):
            return decode([(name, data) for name, data, _ in copies])
        sleep(0.1)
    raise RuntimeError(f"no stable copy of the tracker files in {STATUS_ATTEMPTS} reads")


def device_problems(dev: dict[str, Any], requested: int, qemu: int, exact: bool) -> list[str]:
    """Why a device (its ``vmem-guest status --json`` entry) has not converged."""
    problems = []
    if dev["requested_size"] != requested:
        problems.append(f"tracker saw requested {_mib(dev['requested_size'])} MiB")
    if dev["intent"] is not None:
        problems.append(f"intent {dev['intent']['op']} pending")
    if qemu != dev["plugged_size"]:
        problems.append(f"QEMU size {_mib(qemu)} != plugged {_mib(dev['plugged_size'])} MiB")
    taking = sum(entry["subblocks"].count("o") for entry in dev["holed_blocks"])
    if taking:
        problems.append(f"{taking} subblocks left taken but plugged")
    return problems + remainder_problems(dev, requested, exact)


def precompile() -> None:
    """Compile vmem_guest to bytecode on the host, for the interpreter the guest runs
    too (the checkout's .venv, shared over 9p). The guest's root is read-only, so
    without this every agent start and guest check compiles each module again: more
    than a second of CPU per start under TCG."""
    import compileall

    compileall.compile_dir(REPO / "vmem_guest", quiet=1)


def _harness() -> Any:
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    import vmharness

    return vmharness


@dataclass
class KillRecord:
    index: int
    requested: dict[str, int]
    delay: float
    before: dict[str, int] = field(default_factory=dict)  #: QEMU sizes before the resize
    work: float = 0.0  #: estimated seconds of work the resize starts
    requested_after: dict[str, int] = field(default_factory=dict)
    killed_after: float = 0.0  #: seconds from the resize to the kill's return
    resized_while_dead: bool = False
    phase: str = ""
    check: list[dict[str, Any]] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    recovered: bool = False
    error: str = ""
    taken: int = 0  #: subblocks the killed agent took (its log), since its start
    given_back: int = 0  #: subblocks it gave back
    check_seconds: float = 0.0
    recover_seconds: float = 0.0
    #: Where the recovery's time went: "start" (until the agent serves), "converge"
    #: (until the tracker is at the fixed point), "checks" (meminfo, chaos_guest.py).
    recovery: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


class Chaos:
    """The kill / check / restart loop on a booted VM (``tests/vm/test_chaos_vm.py`` too)."""

    def __init__(
        self,
        vm: Any,
        *,
        seed: int,
        max_delay: float = 2.0,
        converge_timeout: float = 240.0,
        log: Any = print,
    ) -> None:
        from vmharness import guest_agent

        self.ga = guest_agent
        self.vm = vm
        self.rng = random.Random(seed)
        self.seed = seed
        self.max_delay = max_delay
        self.converge_timeout = converge_timeout
        self.log = log
        self.devices = {d.id: d for d in vm.config.devices}
        self.requested = {dev_id: 0 for dev_id in self.devices}
        #: Hole bytes per device as last seen (the tracker, or the kill's check).
        self.holes = {dev_id: 0 for dev_id in self.devices}
        self.addrs: dict[str, int] = {}
        self.trackers: list[str] = []
        self.shrinking = False
        self.base_memtotal = 0
        self.kills: list[KillRecord] = []
        self.resets: list[dict[str, Any]] = []
        self.final: list[str] = []
        #: Seconds the last :meth:`converged` spent waiting and checking.
        self.timings: dict[str, float] = {}

    # --- sizes ---------------------------------------------------------------------

    def resize_all(self, shrink: bool) -> dict[str, int]:
        """Shrink (or grow) every device from QEMU's size now; the sizes before."""
        before = {dev_id: self.vm.plugged(dev_id) for dev_id in self.devices}
        for dev_id, dev in self.devices.items():
            plugged = before[dev_id]
            if plugged and (shrink or plugged >= dev.size):
                size = shrink_size(self.rng, plugged, dev.block_size)
            else:
                size = grow_size(self.rng, plugged, self.holes[dev_id], dev.size, dev.block_size)
            self.requested[dev_id] = size
            self.vm.resize(dev_id, size)
        return before

    def work(self, before: dict[str, int]) -> float:
        return sum(
            work_seconds(before[d], self.holes[d], self.requested[d], dev.block_size)
            for d, dev in self.devices.items()
        )

    def random_delay(self, work: float) -> float:
        """A fifth right after the resize (intents in flight, the first take or
        give-back), most inside the work, the rest after it."""
        roll = self.rng.random()
        if roll < 0.2:
            delay = self.rng.uniform(0.0, 0.03)
        elif roll < 0.9:
            delay = self.rng.uniform(0.0, max(work, 0.05))
        else:
            delay = self.rng.uniform(work, 2 * work + 0.3)
        return min(delay, self.max_delay)

    # --- the agent -----------------------------------------------------------------

    def start(self) -> None:
        precompile()
        self.vm.sh(f"mkdir -p {STATE_DIR}")
        self.base_memtotal = self.vm.mem_total()
        self.addrs = {dev_id: int(info["memaddr"]) for dev_id, info in self.vm.query().items()}
        for dev_id in self.devices:
            self.vm.resize(dev_id, 0)
        self.restart_agent()

    def restart_agent(self) -> None:
        """Start the agent and wait until it has recovered and serves (its "agent running"
        line: a SIGKILLed agent leaves its control socket behind, so the socket alone
        does not say the new one is ready)."""
        vm, ga = self.vm, self.ga
        ga.start_agent(vm, "--noiommu")

        def running() -> bool:
            if ga.agent_died(vm):
                raise RuntimeError("the agent died:\n" + ga.agent_log(vm))
            return "agent running" in vm.read(ga.AGENT_LOG)

        vm.wait_until(running, timeout=self.converge_timeout, interval=0.2, what="the agent")

    def stop(self) -> None:
        if not self.ga.agent_died(self.vm):
            self.ga.stop_agent(self.vm)

    def status(self) -> dict[int, dict[str, Any]]:
        """``vmem-guest status --json`` by region address, decoded on the host.

        The guest runner only reads the tracker files (twice: equal copies with an
        even generation are a consistent snapshot); no process starts in the guest,
        which under TCG on a busy host takes seconds per call. Two equal copies can
        still hold an odd generation when the agent is inside one write section
        across both reads (seen once in make test-matrix, QEMU 10.0 + Linux 6.12,
        after 20 kills): such a pair is fetched again, like unequal ones.
        """

        def read_copies() -> list[tuple[str, bytes, bytes]]:
            return [
                (
                    name,
                    self.vm.read_bytes(f"{STATE_DIR}/{name}"),
                    self.vm.read_bytes(f"{STATE_DIR}/{name}"),
                )
                for name in self.tracker_names()
            ]

        return stable_status(read_copies, self._decode)

    @staticmethod
    def _decode(copies: list[tuple[str, bytes]]) -> dict[int, dict[str, Any]]:
        """Each tracker copy's snapshot (TrackerError when one is mid-write)."""
        import tempfile

        from vmem_guest import render
        from vmem_guest.tracker import TrackerReader

        out: dict[int, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in copies:
                # The reader checks that the file name matches the device inside.
                path = Path(tmp) / name
                path.write_bytes(data)
                with TrackerReader.open(path) as reader:
                    dev = render.snapshot_dict(reader.snapshot(retries=1))
                out[int(dev["addr"])] = dev  # type: ignore[call-overload]
        return out

    def tracker_names(self) -> list[str]:
        """The agent's tracker files (one per device; the names stay across restarts
        and reboots: a device's PCI address)."""
        if len(self.trackers) != len(self.devices):
            listing = self.vm.sh(f"ls {STATE_DIR}").split()
            self.trackers = sorted(name for name in listing if name.endswith(".state"))
        return self.trackers

    # --- convergence ---------------------------------------------------------------

    def converged(self, exact: dict[str, bool]) -> str:
        """Wait for convergence on the current requested sizes; '' or what went wrong.

        Waits until every device is at the agent's fixed point (:func:`device_problems`
        finds nothing: QEMU = tracker plugged, the remainder, exact where ``exact``
        says the agent had to shrink, no intent, nothing taken but plugged, plugged +
        holes = online); a broken device or a dead agent fails at once. Then MemTotal
        and HardwareCorrupted, and the guest's page flags and STATE through the agent
        (``chaos_guest.py converged``).
        """
        t0 = time.monotonic()
        deadline = t0 + self.converge_timeout
        last: list[str] = []
        while True:
            snap, last = self.unconverged(exact)
            if not last:
                break
            if time.monotonic() > deadline:
                return "did not converge: " + "; ".join(last)
            time.sleep(0.1)
        t1 = time.monotonic()
        for dev_id in self.devices:
            self.holes[dev_id] = snap[self.addrs[dev_id]]["hole_bytes"]
        problems = self.memory_problems(snap) + self.guest_converged()
        self.timings = {"converge": t1 - t0, "checks": time.monotonic() - t1}
        return "; ".join(problems)

    def unconverged(self, exact: dict[str, bool]) -> tuple[dict[int, dict[str, Any]], list[str]]:
        """The tracker files now and what keeps each device from having converged."""
        if self.ga.agent_died(self.vm):
            raise RuntimeError("the agent died:\n" + self.ga.agent_log(self.vm))
        snap = self.status()
        problems = []
        for dev_id in self.devices:
            dev = snap[self.addrs[dev_id]]
            if dev["broken"]:
                raise RuntimeError(f"{dev_id} broken: {dev['broken_reason']}")
            qemu = self.vm.plugged(dev_id)
            found = device_problems(dev, self.requested[dev_id], qemu, exact.get(dev_id, False))
            problems += [f"{dev_id}: {p}" for p in found]
        return snap, problems

    def memory_problems(self, snap: dict[int, dict[str, Any]]) -> list[str]:
        """MemTotal grew by the online size (holes count in it); HardwareCorrupted is
        the holes' pages."""
        info = self.vm.meminfo()
        online = sum(snap[a]["online_size"] for a in self.addrs.values())
        holes = sum(snap[a]["hole_bytes"] for a in self.addrs.values())
        problems = []
        grown = info["MemTotal"] - self.base_memtotal
        if grown != online:
            problems.append(f"MemTotal grew by {grown}, online size {online}")
        if info.get("HardwareCorrupted", 0) != holes:
            problems.append(f"HardwareCorrupted {info.get('HardwareCorrupted')}, holes {holes}")
        return problems

    def guest_converged(self) -> list[str]:
        """``chaos_guest.py converged``: page flags and STATE through the running agent."""
        result = self.run_guest_checks("converged")
        return [f"{d['device']}: {v}" for d in result for v in d["violations"]]

    def converge_exact(self, before: dict[str, int]) -> str:
        """:meth:`converged` when nothing interrupted the agent since ``before``
        (QEMU's sizes, all in use): it ends exactly where it had to shrink."""
        return self.converged({d: self.requested[d] <= size for d, size in before.items()})

    def final_check(self) -> list[str]:
        """Stop the agent (SIGTERM) and run the raw check on the converged state."""
        self.stop()
        check = self.guest_check()
        self.final = [f"{d['device']}: {v}" for d in check for v in d["violations"]]
        self.final += [
            f"{d['device']}: {d['plugged_not_online_blocks']} memory blocks plugged, not online"
            for d in check
            if d["plugged_not_online_blocks"]
        ]
        self.final += [
            f"{d['device']}: {len(d['taking'])} subblocks taken but plugged"
            for d in check
            if d["taking"]
        ]
        ok = "every page of every online block plugged or HWPOISON, nothing plugged unused"
        self.log("final check (agent stopped): " + ("; ".join(self.final) or ok))
        return self.final

    def run_guest_checks(self, mode: str) -> list[dict[str, Any]]:
        """``chaos_guest.py MODE`` in the guest with the checkout's python, no site."""
        python = shlex.quote(str(REPO / ".venv" / "bin" / "python"))
        script = shlex.quote(str(GUEST_CHECKS))
        out = self.vm.sh(f"{python} -S {script} {mode}", timeout=300)
        return list(json.loads(out.strip().splitlines()[-1])["devices"])

    def guest_check(self) -> list[dict[str, Any]]:
        return self.run_guest_checks("dead")

    def save_agent_log(self, name: str) -> Path:
        share = self.vm.paths.share
        self.vm.guest(f"cp {self.ga.AGENT_LOG} {shlex.quote(str(share / name))}")
        return Path(share / name)

    # --- one kill ------------------------------------------------------------------

    def kill_once(self, index: int) -> KillRecord:
        vm, ga = self.vm, self.ga
        t0 = time.monotonic()
        # The killer waits in the guest before the resize; the host releases it by
        # reading a FIFO through the guest runner (no process to start then: a
        # shell round trip takes half a second under TCG on a busy host).
        pid = int(vm.read(ga.AGENT_PID).strip())
        vm.sh(
            f"rm -f {KILL_FIFO}; mkfifo {KILL_FIFO} || exit 1;"
            f" (echo go >{KILL_FIFO}; kill -KILL {pid}) >/dev/null 2>&1 </dev/null &"
        )
        self.shrinking = not self.shrinking if self.rng.random() < 0.8 else self.shrinking
        before = self.resize_all(self.shrinking)
        resized = time.monotonic()
        work = self.work(before)
        record = KillRecord(index, dict(self.requested), self.random_delay(work), before, work)
        time.sleep(record.delay)
        vm.read(KILL_FIFO)
        record.killed_after = time.monotonic() - resized
        vm.wait_until(lambda: ga.agent_died(vm), timeout=60, what="the agent to die")
        record.taken, record.given_back = _subblock_counts(
            self.save_agent_log(f"agent-{index:03d}.log")
        )
        self.check_after_kill(record)
        kept = {dev_id: self.device_check(record, dev_id).get("kept_bytes", 0) for dev_id in before}
        if self.rng.random() < 0.2:  # the host changes its mind while the agent is down
            self.resize_all(self.rng.random() < 0.5)
            record.resized_while_dead = True
        record.requested_after = dict(self.requested)
        # Exact where the restarted agent must shrink: the request is at most what it
        # keeps in use (a lower bound from the check).
        exact = {d: self.requested[d] <= kept[d] for d in self.devices}
        t2 = time.monotonic()
        self.timings = {}
        try:
            self.restart_agent()
            record.recovery["start"] = time.monotonic() - t2
            record.error = self.converged(exact)
        except Exception as exc:
            record.error = f"restart failed: {str(exc).splitlines()[0]}"
        record.recovery.update(self.timings)
        record.recover_seconds = time.monotonic() - t2
        record.recovered = not record.error
        record.seconds = time.monotonic() - t0
        return record

    def check_after_kill(self, record: KillRecord) -> None:
        """The raw guest check with the agent dead, QEMU's sizes, the phase."""
        t1 = time.monotonic()
        try:
            record.check = self.guest_check()
        except Exception as exc:
            text = str(exc).split("--- guest console")[0].strip().splitlines()
            record.violations.append("guest check failed: " + " | ".join(text[-6:]))
        record.check_seconds = time.monotonic() - t1
        for dev in record.check:
            record.violations += [f"{dev['device']}: {v}" for v in dev["violations"]]
        qemu = {int(info["memaddr"]): int(info["size"]) for info in self.vm.query().values()}
        for dev in record.check:
            if qemu.get(dev["addr"]) != dev["plugged_size"]:
                record.violations.append(
                    f"{dev['device']}: QEMU size {qemu.get(dev['addr'])} but the device's"
                    f" plugged_size is {dev['plugged_size']}"
                )
        for dev_id in self.devices:
            dev = self.device_check(record, dev_id)
            if dev:
                self.holes[dev_id] = dev["holes"] * dev["block_size"]
        record.phase = self.phase_of(record)

    def device_check(self, record: KillRecord, dev_id: str) -> dict[str, Any]:
        """The check's entry for ``dev_id`` ({} if the check failed)."""
        found = [d for d in record.check if d["addr"] == self.addrs[dev_id]]
        return found[0] if found else {}

    def phase_of(self, record: KillRecord) -> str:
        """Where the kill landed, from what the device, the page flags and the tracker show."""
        check = record.check
        if any(d.get("tracker_torn") for d in check):
            return "inside a tracker write"
        intents = [_intent_phase(d) for d in check if d.get("intent")]
        if intents:
            return "intent " + "+".join(intents)
        subblocks = sorted(
            {
                self.subblock_phase(dev, record.before[dev_id] < record.requested[dev_id])
                for dev_id in self.devices
                if (dev := self.device_check(record, dev_id)).get("taking")
            }
        )
        if subblocks:
            return "+".join(subblocks)
        if any(d["tracker_sysfs_diff"] for d in check):
            return "between sysfs write and record"
        if any(d["plugged_not_online_blocks"] for d in check):
            return "plugged, not online"
        converged = all(
            not remainder_problems(
                _as_status(dev),
                record.requested[dev_id],
                record.requested[dev_id] < record.before[dev_id],
            )
            for dev_id in self.devices
            if (dev := self.device_check(record, dev_id))
        )
        return "converged" if converged and check else "between steps"

    @staticmethod
    def subblock_phase(dev: dict[str, Any], growing: bool) -> str:
        """Subblocks taken but still plugged: a take, or a give-back after its PLUG."""
        if growing:
            return "giving back a hole"
        if all(poisoned == dev["pages_per_subblock"] for _sb, poisoned in dev["taking"]):
            return "taken, not yet unplugged"
        return "inside a take"

    def run_kills(self, count: int) -> None:
        for _ in range(count):
            record = self.kill_once(len(self.kills) + 1)
            self.kills.append(record)
            self.log(self.kill_line(record))

    def kill_line(self, r: KillRecord) -> str:
        sizes = ",".join(f"{_mib(r.before[d])}->{_mib(s)}" for d, s in r.requested.items())
        plugged = ",".join(f"{_mib(d['plugged_size'])}" for d in r.check) or "?"
        holes = sum(d["holes"] * d["block_size"] for d in r.check)
        verdict = "recovered" if r.recovered else f"NOT RECOVERED: {r.error}"
        if r.violations:
            verdict += " VIOLATIONS: " + "; ".join(r.violations)
        spent = ", ".join(f"{what} {seconds:.1f}" for what, seconds in r.recovery.items())
        dead = ""
        if r.resized_while_dead:
            dead = ", then " + ",".join(_mib(s) for s in r.requested_after.values()) + " MiB"
        return (
            f"kill {r.index:3d}: {sizes} MiB, delay {r.delay * 1000:4.0f} of ~{r.work * 1000:.0f}"
            f" ms (killed {r.killed_after:.2f} s after the resize) at {plugged} MiB"
            f" ({_mib(holes)} MiB holes) [{r.phase}]{dead}: {verdict}"
            f" (check {r.check_seconds:.1f} s, recovery {r.recover_seconds:.1f} s: {spent})"
        )

    # --- system_reset --------------------------------------------------------------

    def reset_once(self) -> dict[str, Any]:
        """system_reset with memory plugged and holes; the agent started after boot
        converges. The holes' poisoned pages do not survive the reboot."""
        vm = self.vm
        entry: dict[str, Any] = {}
        problems = self.plug_with_holes()
        entry["requested"] = dict(self.requested)
        entry["plugged_before"] = {d: vm.plugged(d) for d in self.devices}
        entry["holes_before"] = dict(self.holes)
        t0 = time.monotonic()
        vm.reset()
        entry["boot_seconds"] = time.monotonic() - t0
        entry["plugged_after_reset"] = after = {d: vm.plugged(d) for d in self.devices}
        problems += self.after_reset_problems(after)
        entry["hardware_corrupted_after_reset"] = vm.meminfo().get("HardwareCorrupted")
        vm.sh(f"mkdir -p {STATE_DIR}")
        t1 = time.monotonic()
        try:
            self.restart_agent()
            error = self.converge_exact(after)
        except Exception as exc:
            error = f"restart failed: {str(exc).splitlines()[0]}"
        if error:
            problems.append(f"after the reset: {error}")
        entry["recover_seconds"] = time.monotonic() - t1
        entry["problems"] = problems
        entry["recovered"] = not problems
        self.resets.append(entry)
        self.log(self.reset_line(entry))
        return entry

    def plug_with_holes(self) -> list[str]:
        """Whole blocks on every device, then a few subblocks less (holes)."""
        problems = []
        for step in ("plug", "holes"):
            before = {d: self.vm.plugged(d) for d in self.devices}
            for dev_id, dev in self.devices.items():
                if step == "plug":
                    size = self.rng.randrange(1, dev.size // MEMORY_BLOCK + 1) * MEMORY_BLOCK
                else:
                    size = before[dev_id] - self.rng.randint(1, 32) * dev.block_size
                self.requested[dev_id] = size
                self.vm.resize(dev_id, size)
            error = self.converge_exact(before)
            if error:
                problems.append(f"before the reset ({step}): {error}")
        return problems

    def after_reset_problems(self, after: dict[str, int]) -> list[str]:
        """Nothing plugged, nothing poisoned, MemTotal back to boot memory."""
        problems = []
        if any(after.values()):
            problems.append(f"QEMU size after system_reset: {after}")
        info = self.vm.meminfo()
        if info.get("HardwareCorrupted", 0):
            problems.append(f"HardwareCorrupted {info['HardwareCorrupted']} after system_reset")
        memtotal = info["MemTotal"]
        problem = reset_memtotal_problem(memtotal, self.base_memtotal)
        if problem:
            problems.append(problem)
        else:
            # Boots differ by a few KiB: this boot's MemTotal is the base the agent's
            # growth is measured from (only once it is known to hold no device memory).
            self.base_memtotal = memtotal
        self.holes = {dev_id: 0 for dev_id in self.devices}
        return problems

    def reset_line(self, entry: dict[str, Any]) -> str:
        problems = entry["problems"]
        verdict = "recovered" if not problems else "NOT RECOVERED: " + "; ".join(problems)
        sizes = ",".join(_mib(s) for s in entry["plugged_before"].values())
        holes = ",".join(_mib(s) for s in entry["holes_before"].values())
        after = ",".join(_mib(s) for s in entry["plugged_after_reset"].values())
        return (
            f"reset {len(self.resets)}: plugged {sizes} MiB ({holes} MiB holes), system_reset"
            f" -> QEMU size {after} MiB, HardwareCorrupted"
            f" {entry['hardware_corrupted_after_reset']}, agent restarted: {verdict}"
            f" (boot {entry['boot_seconds']:.1f} s, recovery {entry['recover_seconds']:.1f} s)"
        )

    # --- summary -------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        recovered = sum(r.recovered for r in self.kills)
        violations = sum(len(r.violations) for r in self.kills) + len(self.final)
        phases: dict[str, int] = {}
        for r in self.kills:
            phases[r.phase] = phases.get(r.phase, 0) + 1
        per_kill = [r.seconds for r in self.kills]
        return {
            "seed": self.seed,
            "kills": len(self.kills),
            "recovered": recovered,
            "invariant_violations": violations,
            "resets": len(self.resets),
            "resets_recovered": sum(e["recovered"] for e in self.resets),
            "phases": phases,
            "subblocks_taken": sum(r.taken for r in self.kills),
            "subblocks_given_back": sum(r.given_back for r in self.kills),
            "resized_while_dead": sum(r.resized_while_dead for r in self.kills),
            "final_check": self.final,
            "seconds_per_kill": sum(per_kill) / len(per_kill) if per_kill else 0.0,
            "ok": recovered == len(self.kills)
            and violations == 0
            and all(e["recovered"] for e in self.resets),
        }

    def summary_line(self) -> str:
        s = self.summary()
        line = (
            f"{s['recovered']}/{s['kills']} recovered, {s['invariant_violations']}"
            " invariant violations"
        )
        if s["resets"]:
            line += f"; {s['resets_recovered']}/{s['resets']} system_resets recovered"
        return line

    def as_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "devices": {
                d: {"size": dev.size, "block_size": dev.block_size}
                for d, dev in self.devices.items()
            },
            "kills": [r.__dict__ for r in self.kills],
            "resets": self.resets,
        }


def _intent_phase(dev: dict[str, Any]) -> str:
    """An intent's op, and whether it is over an online block (holes, taken subblocks)."""
    op = str(dev["intent"]["op"])
    if dev.get("intent_online"):
        return op + (" into holes" if op == "PLUG" else " of taken subblocks")
    return op


def _as_status(dev: dict[str, Any]) -> dict[str, Any]:
    """The fields :func:`remainder_problems` reads, from a dead check's entry (the
    remainder as the agent writes it once it has converged)."""
    return {
        "plugged_size": dev["plugged_size"],
        "hole_bytes": dev["holes"] * dev["block_size"],
        "remainder": dev["requested_size"] - dev["plugged_size"],
        "online_size": dev["online_blocks"] * MEMORY_BLOCK,
    }


def _subblock_counts(log: Path) -> tuple[int, int]:
    """(subblocks taken, subblocks given back) in an agent's log."""
    counts = {"taking": 0, "given back": 0}
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return 0, 0
    for match in _SUBBLOCK_LOG.finditer(text):
        counts[match.group(1)] += int(match.group(2))
    return counts["taking"], counts["given back"]


def _mib(size: int) -> str:
    return str(size >> 20) if size % (1 << 20) == 0 else f"{size / (1 << 20):.1f}"


def chaos_config(devices: int = 2, region: int = 2 << 30, name: str = "chaos") -> Any:
    vmh = _harness()
    mem = tuple(vmh.MemDevice(f"vm{i}", size=region, block_size=2 << 20) for i in range(devices))
    return vmh.VMConfig(name=name, in_kernel_driver=False, noiommu=True, devices=mem)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--resets", type=int, default=2, help="system_resets (after the kills)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--devices", type=int, choices=(1, 2), default=2)
    parser.add_argument("--region", default="2G", help="region size of each device")
    parser.add_argument("--max-delay", type=float, default=2.0, help="seconds")
    args = parser.parse_args()

    vmh = _harness()
    from vmharness import paths

    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    cfg = chaos_config(args.devices, vmh.parse_size(args.region))
    t0 = time.monotonic()
    with vmh.TestVM(cfg) as vm:
        print(f"VM up in {vm.boot_seconds:.0f} s ({vm.accel}); run dir {vm.paths.run_dir}")
        print(
            f"{args.devices} device(s), region {args.region}, 2 MiB blocks; seed {seed};"
            f" {args.kills} kills, {args.resets} system_resets",
            flush=True,
        )
        chaos = Chaos(vm, seed=seed, max_delay=args.max_delay, log=_flush_print)
        chaos.start()
        try:
            chaos.run_kills(args.kills)
            for _ in range(args.resets):
                chaos.reset_once()
            chaos.final_check()
        finally:
            report = chaos.as_dict()
            report["run_dir"] = str(vm.paths.run_dir)
            report["seconds"] = time.monotonic() - t0
            out = paths.results_dir() / "chaos" / f"chaos-{datetime.now():%Y%m%d-%H%M%S}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"results: {out}")
    s = report["summary"]
    print(f"phases at the kill: {s['phases']}")
    print(
        f"subblocks taken {s['subblocks_taken']}, given back {s['subblocks_given_back']}"
        f" (agent logs); resized while dead {s['resized_while_dead']} times"
    )
    print(f"{s['seconds_per_kill']:.1f} s per kill (kill, check, restart, converge)")
    print(chaos.summary_line())
    return 0 if s["ok"] else 1


def _flush_print(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
