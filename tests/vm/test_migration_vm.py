"""Live migration with the agent at work (issue 22 item 1): a bounded ``make migrate``.

One migratable VM (RAM root, nothing of 9p mounted; no-IOMMU, one 2 GiB device with
2 MiB blocks) on the default pair. The host resizes the device and migrates the
guest to a second QEMU on this host while the agent grows, takes subblocks, and
once resizes the source's device during the migration. On the destination: QEMU's
sizes are the source's, the same agent converges on the request with ``make
chaos``'s checks (QEMU = tracker, MemTotal, HardwareCorrupted, STATE over every run of
the online blocks, page flags), and chaos's raw check runs with STATE through the
agent (tracker = device = sysfs). At the end the agent is stopped and the raw check
runs with its own STATE requests. ``make migrate`` is the long run
(``scripts/migrate.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import chaos
import migration_run
import pytest
from vmharness import TestVM, VMConfig

BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]
SEED = 20261207
#: One migration per move but "shrink" and "idle", which ``make migrate`` covers: the
#: three that put the agent's BUSY handling to work (a grow, a take, a resize while
#: the migration runs).
MOVES = ("grow", "take", "resize during migration")


@pytest.fixture(scope="module")
def vm(boot_vm: BootVM) -> Iterator[TestVM]:
    chaos.precompile()  # before the boot: the RAM root copies the bytecode
    with boot_vm(migration_run.migration_config(devices=1, name="migrate-test")) as booted:
        yield booted


def test_the_agent_converges_after_every_migration_with_every_invariant(vm: TestVM) -> None:
    lines: list[str] = []
    run = migration_run.MigrationRun(vm, seed=SEED, log=lines.append)
    run.start()
    for move in MOVES:
        run.run_move(move)
    run.final_check()
    print("\n".join([*lines, *run.summary_lines()]))
    summary = run.summary()
    assert summary["ok"], "\n".join([*lines, *run.summary_lines()])
    assert summary["converged"] == len(MOVES) and summary["violations"] == 0
    assert summary["final_check"] == []
    assert [r.stats["generation"] for r in run.records] == [1, 2, 3]
    # The guest kept its boot (the harness checks it at each switch) and the agent its
    # process: the tracker names the same owner throughout.
    assert len({dev["owner_pid"] for dev in run.chaos.status().values()}) == 1
