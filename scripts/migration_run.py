"""The loop of ``make migrate`` (``scripts/migrate.py``, ``tests/vm/test_migration_vm.py``):
resize, live-migrate at a random moment, check on the destination, converge.

The checks are ``make chaos``'s (``scripts/chaos.py``): :class:`MigrationRun` drives
a :class:`chaos.Chaos` on the same VM for the agent, the sizes, the convergence and
its checks, and adds the migration, the phase it landed in and the raw check with
the agent alive (``scripts/migrate_guest.py``). scripts/migrate.py says what is checked.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

import chaos

GUEST_CHECKS = chaos.SCRIPTS / "migrate_guest.py"
MEMORY_BLOCK = chaos.MEMORY_BLOCK
#: The host's moves, in a shuffled cycle (each comes up once every len(MOVES)).
MOVES = ("grow", "shrink", "take", "idle", "resize during migration")
#: Where a migration can land (the summary lists all, zeros too).
PHASES = ("growing", "shrinking", "subblock take", "idle", "resize during migration")
#: The most whole memory blocks a ``shrink`` takes away, subblocks a ``take``.
MAX_SHRINK_BLOCKS = 6
MAX_TAKE_SUBBLOCKS = 40
#: Longest random wait, after the ``migrate`` command, before a resize during it.
DURING_DELAY = 0.3


def migration_config(devices: int = 2, region: int = 2 << 30, name: str = "migrate") -> Any:
    """chaos's VM (no-IOMMU VFIO, 2 MiB blocks), migratable: RAM root, no 9p mounted."""
    cfg = chaos.chaos_config(devices, region, name)
    return dataclasses.replace(cfg, ram_root=True, migratable=True)


@dataclass
class MigrationRecord:
    index: int
    move: str
    before: dict[str, int]  #: QEMU's sizes before the move
    requested: dict[str, int] = field(default_factory=dict)  #: when the migration began
    holes: dict[str, int] = field(default_factory=dict)  #: hole bytes before the move
    work: float = 0.0  #: estimated seconds of the agent's work the move starts
    delay: float = 0.0  #: seconds from the move to the ``migrate`` command
    frozen: dict[str, int] = field(default_factory=dict)  #: sizes while it ran
    requested_during: dict[str, int] = field(default_factory=dict)
    #: The resize during the migration reached the source before its device state was
    #: saved (the source still running after the qom-set): it is migrated.
    resized_while_running: bool = False
    phase: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    busy_retries: int = 0  #: the agent's retries (BUSY waits) from the move to convergence
    converge_seconds: float = 0.0
    check_seconds: float = 0.0
    violations: list[str] = field(default_factory=list)
    error: str = ""
    converged: bool = False
    seconds: float = 0.0


class MigrationRun:
    """Resize, migrate, check, converge: ``count`` times on a booted migratable VM."""

    def __init__(
        self, vm: Any, *, seed: int, converge_timeout: float = 240.0, log: Any = print
    ) -> None:
        self.vm = vm
        self.chaos = chaos.Chaos(vm, seed=seed, converge_timeout=converge_timeout, log=log)
        self.rng = self.chaos.rng
        self.seed = seed
        self.log = log
        self.records: list[MigrationRecord] = []
        self.final: list[str] = []
        #: Why the run stopped early (a migration failed: the guest may be gone).
        self.stopped = ""
        self._cycle: list[str] = []
        #: The agent's pid, as its trackers name their owner: the same one throughout.
        self.agent_pids: set[int] = set()

    def start(self) -> None:
        """The agent started (after the boot) and converged on size 0."""
        self.chaos.start()
        self.agent_pids = self.owners()

    def next_move(self) -> str:
        if not self._cycle:
            self._cycle = list(MOVES)
            self.rng.shuffle(self._cycle)
        return self._cycle.pop()

    # --- sizes ---------------------------------------------------------------------

    def resize(self, move: str, sizes: dict[str, int]) -> str:
        """Set every device's request for ``move`` from QEMU's ``sizes``; a move a
        device cannot make (nothing to shrink, nothing left to grow) becomes the other.
        The moves made, joined with "+"."""
        ch, rng = self.chaos, self.rng
        made = []
        for dev_id, dev in ch.devices.items():
            plugged, block = sizes[dev_id], dev.block_size
            this = move
            if this == "grow" and plugged >= dev.size:
                this = "take"
            least = MEMORY_BLOCK if this == "shrink" else block
            if this in ("shrink", "take") and plugged < least:
                this = "grow"
            if this == "grow":
                size = chaos.grow_size(rng, plugged, ch.holes[dev_id], dev.size, block)
            elif this == "shrink":
                blocks = rng.randint(1, min(MAX_SHRINK_BLOCKS, plugged // MEMORY_BLOCK))
                size = plugged - blocks * MEMORY_BLOCK
            else:
                size = plugged - rng.randint(1, min(MAX_TAKE_SUBBLOCKS, plugged // block)) * block
            ch.requested[dev_id] = size
            self.vm.resize(dev_id, size)
            made.append(this)
        return "+".join(sorted(set(made)))

    def target(self, record: MigrationRecord, dev_id: str) -> int:
        """Where the agent stops for the request the migration began with: exactly on
        a shrink; growing, holes first, then whole memory blocks."""
        before, requested = record.before[dev_id], record.requested[dev_id]
        if requested <= before:
            return requested
        fill = min(record.holes[dev_id], requested - before)
        return before + fill + (requested - before - fill) // MEMORY_BLOCK * MEMORY_BLOCK

    def phase_of(self, record: MigrationRecord) -> str:
        """Where the migration landed, from QEMU's sizes while it ran (frozen: every
        PLUG and UNPLUG was BUSY) against where the agent was going."""
        if record.resized_while_running:
            return "resize during migration"
        phases = set()
        for dev_id in self.chaos.devices:
            frozen, target = record.frozen[dev_id], self.target(record, dev_id)
            if frozen < target:
                phases.add("growing")
            elif frozen - target >= MEMORY_BLOCK:
                phases.add("shrinking")
            elif frozen > target:
                phases.add("subblock take")
        return "+".join(sorted(phases)) or "idle"

    # --- one migration -------------------------------------------------------------

    def migrate_once(self, index: int, move: str) -> MigrationRecord:
        vm, ch = self.vm, self.chaos
        t0 = time.monotonic()
        retries = self.retries()
        before = {dev_id: vm.plugged(dev_id) for dev_id in ch.devices}
        record = MigrationRecord(index, move, before, holes=dict(ch.holes))
        try:
            migration = vm.prepare_migration()
            if record.move in ("grow", "shrink", "take"):
                record.move = self.resize(record.move, before)
                record.work = ch.work(before)
                record.delay = self.rng.uniform(0.0, record.work)
                time.sleep(record.delay)
            record.requested = dict(ch.requested)
            self.migrate(migration, record)
        except Exception as exc:
            record.error = f"migration failed: {str(exc).splitlines()[0]}"
            record.seconds = time.monotonic() - t0
            return record
        record.phase = self.phase_of(record)
        self.check_destination(record)
        self.converge(record)
        record.busy_retries = self.retries() - retries
        if record.converged and self.owners() != self.agent_pids:
            record.violations.append(f"the agent is {self.owners()}, not {self.agent_pids}")
        record.seconds = time.monotonic() - t0
        return record

    def migrate(self, migration: Any, record: MigrationRecord) -> None:
        """Start the prepared migration, read the frozen sizes, resize during it when
        the move says so, finish it (the VM then drives the destination)."""
        vm, ch = self.vm, self.chaos
        migration.start()
        record.frozen = {dev_id: vm.plugged(dev_id) for dev_id in ch.devices}
        if record.move == "resize during migration":
            time.sleep(self.rng.uniform(0.0, DURING_DELAY))
            ch.resize_all(self.rng.random() < 0.5)
            record.requested_during = dict(ch.requested)
            record.resized_while_running = vm.qmp("query-status")[
                "status"
            ] == "running" and migration.status() in ("setup", "active")
        record.stats = dataclasses.asdict(migration.finish())

    def check_destination(self, record: MigrationRecord) -> None:
        """Each device on the destination, read before it ran: the size the source had
        while the migration ran, and the host's request. A resize that reached the
        source after its device state was saved (the source no longer running) is
        lost with the source: the host sets it again, as a management layer would."""
        source = record.stats["source_devices"]
        for dev_id, dest in record.stats["destination_devices"].items():
            if not dest["size"] == source[dev_id]["size"] == record.frozen[dev_id]:
                record.violations.append(
                    f"{dev_id}: size {_mib(dest['size'])} MiB on the destination,"
                    f" {_mib(source[dev_id]['size'])} MiB on the source at the end,"
                    f" {_mib(record.frozen[dev_id])} MiB while migrating"
                )
            requested = self.chaos.requested[dev_id]
            if dest["requested-size"] != requested:
                if record.resized_while_running or not record.requested_during:
                    record.violations.append(
                        f"{dev_id}: requested-size {_mib(dest['requested-size'])} MiB on the"
                        f" destination, {_mib(requested)} MiB set on the source"
                    )
                self.vm.resize(dev_id, requested)

    def converge(self, record: MigrationRecord) -> None:
        """chaos's convergence and checks, then the raw check through the agent."""
        ch = self.chaos
        exact = {dev_id: ch.requested[dev_id] <= record.frozen[dev_id] for dev_id in ch.devices}
        t1 = time.monotonic()
        try:
            record.error = ch.converged(exact)
        except Exception as exc:
            record.error = f"did not converge: {str(exc).splitlines()[0]}"
        record.converge_seconds = time.monotonic() - t1
        if record.error:
            return
        t2 = time.monotonic()
        try:
            for dev in self.running_check():
                record.violations += [f"{dev['device']}: {v}" for v in dev["violations"]]
        except Exception as exc:
            text = str(exc).split("--- guest console")[0].strip().splitlines()
            record.violations.append("guest check failed: " + " | ".join(text[-6:]))
        record.check_seconds = time.monotonic() - t2
        record.converged = True

    def running_check(self) -> list[dict[str, Any]]:
        """``migrate_guest.py running`` in the guest (the checkout's python, no site)."""
        python = shlex.quote(str(chaos.REPO / ".venv" / "bin" / "python"))
        out = self.vm.sh(f"{python} -S {shlex.quote(str(GUEST_CHECKS))} running", timeout=300)
        return list(json.loads(out.strip().splitlines()[-1])["devices"])

    def owners(self) -> set[int]:
        """The pids the agent's trackers name as their owner."""
        return {int(dev["owner_pid"]) for dev in self.chaos.status().values()}

    def retries(self) -> int:
        """The agent's retries (BUSY waits, refused offlines) over every device."""
        return sum(int(dev["retries"]) for dev in self.chaos.status().values())

    # --- the run -------------------------------------------------------------------

    def run(self, count: int) -> None:
        """``count`` migrations, the moves in shuffled cycles; the first that fails
        ends the run (its record says why)."""
        for _ in range(count):
            record = self.run_move(self.next_move())
            if not record.stats:
                self.stopped = f"migration {record.index}: {record.error}"
                return

    def run_move(self, move: str) -> MigrationRecord:
        """One migration after (or with) ``move``, logged."""
        record = self.migrate_once(len(self.records) + 1, move)
        self.records.append(record)
        self.log(self.line(record))
        return record

    def final_check(self) -> list[str]:
        """The agent stopped; chaos's raw check (its own STATE requests)."""
        self.final = self.chaos.final_check()
        return self.final

    def line(self, r: MigrationRecord) -> str:
        sizes = ",".join(f"{_mib(r.before[d])}->{_mib(s)}" for d, s in r.requested.items())
        frozen = ",".join(_mib(s) for s in r.frozen.values()) or "?"
        during = ""
        if r.requested_during:
            during = " then " + ",".join(_mib(s) for s in r.requested_during.values()) + " MiB"
            during += "" if r.resized_while_running else " (after the switch-over)"
        stats = r.stats
        migrated = ""
        if stats:
            migrated = (
                f" {stats['seconds']:.2f} s (downtime {stats['downtime_ms']} ms,"
                f" {stats['transferred'] >> 20} MiB sent)"
            )
        verdict = "converged" if r.converged else f"NOT CONVERGED: {r.error}"
        if r.violations:
            verdict += " VIOLATIONS: " + "; ".join(r.violations)
        return (
            f"migration {r.index:3d} [{r.phase or '?'}]: {r.move} {sizes} MiB{during},"
            f" migrated {r.delay * 1000:.0f} of ~{r.work * 1000:.0f} ms in at {frozen} MiB:"
            f"{migrated}; {r.busy_retries} agent retries; {verdict}"
            f" (converge {r.converge_seconds:.1f} s, checks {r.check_seconds:.1f} s)"
        )

    def summary(self) -> dict[str, Any]:
        converged = sum(r.converged for r in self.records)
        violations = sum(len(r.violations) for r in self.records) + len(self.final)
        phases = {phase: 0 for phase in PHASES}
        for r in self.records:
            phases[r.phase or "failed"] = phases.get(r.phase or "failed", 0) + 1
        done = [r.stats for r in self.records if r.stats]
        return {
            "seed": self.seed,
            "migrations": len(self.records),
            "converged": converged,
            "violations": violations,
            "phases": phases,
            "busy_retries": sum(r.busy_retries for r in self.records),
            "final_check": self.final,
            "mean_migration_seconds": _mean([s["seconds"] for s in done]),
            "max_downtime_ms": max((s["downtime_ms"] for s in done), default=0),
            "mean_converge_seconds": _mean([r.converge_seconds for r in self.records]),
            "stopped": self.stopped,
            "ok": converged == len(self.records) and violations == 0 and not self.stopped,
        }

    def summary_lines(self) -> list[str]:
        s = self.summary()
        phases = ", ".join(f"{phase} {count}" for phase, count in s["phases"].items())
        stopped = [f"stopped early: {s['stopped']}"] if s["stopped"] else []
        return [
            *stopped,
            f"phases: {phases}",
            f"migrations took {s['mean_migration_seconds']:.2f} s on average (longest"
            f" downtime {s['max_downtime_ms']} ms); the agent retried {s['busy_retries']}"
            f" times; converged {s['mean_converge_seconds']:.1f} s after each on average",
            f"{s['converged']}/{s['migrations']} migrations converged, {s['violations']}"
            " violations",
        ]

    def as_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary(),
            "devices": {
                d: {"size": dev.size, "block_size": dev.block_size}
                for d, dev in self.chaos.devices.items()
            },
            "migrations": [dataclasses.asdict(r) for r in self.records],
        }


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _mib(size: int) -> str:
    return chaos._mib(size)
