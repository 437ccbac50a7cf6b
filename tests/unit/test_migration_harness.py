"""Live migration in the harness, without a VM: the destination's QEMU arguments, the
migratable guest's settings, the TCG threading, and how ``make migrate`` judges where
a migration landed (scripts/migration_run.py)."""

from __future__ import annotations

import dataclasses
import random
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import migration_run  # noqa: E402
from vmharness import host  # noqa: E402
from vmharness.config import RunPaths, kernel_cmdline, qemu_argv  # noqa: E402

MiB = 1 << 20
BLOCK = 128 * MiB
RUN = RunPaths(
    kernel=Path("bzImage"),
    run_dir=Path("run"),
    share=Path("share"),
    sock_dir=Path("socks"),
    guest_init=Path("init.sh"),
    guest_runner=Path("runner.py"),
)


def option(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_a_migratable_guest_runs_from_ram_with_nothing_of_9p_mounted() -> None:
    cfg = migration_run.migration_config(devices=1, name="m")
    assert cfg.ram_root and cfg.migratable
    words = kernel_cmdline(cfg, RUN).split()
    assert "VMH_NO9P=1" in words
    assert "VMH_RAMROOT=share/ram-root.list" in words
    plain = kernel_cmdline(dataclasses.replace(cfg, migratable=False), RUN).split()
    assert "VMH_NO9P=1" not in plain


def test_migratable_without_a_ram_root_is_refused() -> None:
    cfg = dataclasses.replace(migration_run.migration_config(), ram_root=False)
    with pytest.raises(ValueError, match="RAM root"):
        cfg.validate()


def test_the_destination_runs_the_same_command_line_listening_and_appending() -> None:
    cfg = migration_run.migration_config(devices=2, name="m")
    dest = dataclasses.replace(RUN, sock_dir=Path("socks2"), generation=1)
    source = qemu_argv(cfg, RUN, "qemu", "tcg")
    incoming = qemu_argv(cfg, dest, "qemu", "tcg", incoming="unix:socks2/migrate.sock")
    assert option(incoming, "-incoming") == ["unix:socks2/migrate.sock"]
    assert option(source, "-incoming") == []
    # Both append to the one console log (a file chardev truncates otherwise).
    assert option(incoming, "-chardev")[0] == "file,id=con0,path=run/console.log,append=on"
    assert option(source, "-chardev")[0] == "file,id=con0,path=run/console.log,append=on"

    # The same devices, RAM and machine; only the sockets and the console differ.
    def alike(args: list[str]) -> list[str]:
        return [a.replace("socks2", "socks") for a in args if "con0" not in a]

    assert alike(incoming) == [*alike(source), "-incoming", "unix:socks/migrate.sock"]
    assert dest.qemu_log == Path("run/qemu-1.log") and RUN.qemu_log == Path("run/qemu.log")
    assert dest.qmp_sock == Path("socks2/qmp.sock")


def test_linux_6_1_migrates_single_threaded_under_tcg() -> None:
    assert host.migration_tcg_thread("6.1", "multi") == "single"
    assert host.migration_tcg_thread("6.12", "multi") == "multi"
    assert host.migration_tcg_thread("6.12", "single") == "single"


# --- where a migration landed --------------------------------------------------------


def run_for(devices: dict[str, int]) -> Any:
    """A MigrationRun on a fake VM: only its devices' sizes matter here."""
    run = migration_run.MigrationRun.__new__(migration_run.MigrationRun)
    run.chaos = SimpleNamespace(
        devices={d: SimpleNamespace(size=size, block_size=2 * MiB) for d, size in devices.items()}
    )
    return run


def record(
    before: int, requested: int, frozen: int, holes: int = 0, during: bool = False
) -> migration_run.MigrationRecord:
    rec = migration_run.MigrationRecord(1, "grow", {"vm0": before})
    rec.requested, rec.frozen, rec.holes = {"vm0": requested}, {"vm0": frozen}, {"vm0": holes}
    rec.resized_while_running = during
    return rec


@pytest.mark.parametrize(
    ("before", "requested", "frozen", "holes", "phase"),
    [
        (0, 3 * BLOCK + 20 * MiB, BLOCK, 0, "growing"),
        # Growth stops at whole memory blocks: 3 blocks plugged is where it ends.
        (0, 3 * BLOCK + 20 * MiB, 3 * BLOCK, 0, "idle"),
        # Holes are filled first, at subblock granularity.
        (BLOCK - 40 * MiB, BLOCK, BLOCK - 40 * MiB, 40 * MiB, "growing"),
        (BLOCK - 40 * MiB, BLOCK - 20 * MiB, BLOCK - 20 * MiB, 40 * MiB, "idle"),
        (5 * BLOCK, 2 * BLOCK, 4 * BLOCK, 0, "shrinking"),
        (5 * BLOCK, 2 * BLOCK, 2 * BLOCK + 64 * MiB, 0, "subblock take"),
        (5 * BLOCK, 5 * BLOCK - 8 * MiB, 5 * BLOCK - 2 * MiB, 0, "subblock take"),
        (5 * BLOCK, 5 * BLOCK - 8 * MiB, 5 * BLOCK - 8 * MiB, 0, "idle"),
    ],
)
def test_the_phase_is_judged_from_the_frozen_size_and_the_agents_target(
    before: int, requested: int, frozen: int, holes: int, phase: str
) -> None:
    run = run_for({"vm0": 2 << 30})
    assert run.phase_of(record(before, requested, frozen, holes)) == phase


def test_a_resize_that_reached_the_running_source_is_its_own_phase() -> None:
    run = run_for({"vm0": 2 << 30})
    assert run.phase_of(record(0, BLOCK, 0, during=True)) == "resize during migration"


def test_every_move_comes_up_once_in_each_cycle() -> None:
    run = run_for({"vm0": 2 << 30})
    run.rng, run._cycle = random.Random(3), []
    moves = [run.next_move() for _ in range(2 * len(migration_run.MOVES))]
    for cycle in (moves[:5], moves[5:]):
        assert sorted(cycle) == sorted(migration_run.MOVES)


@pytest.mark.parametrize("move", ["grow", "shrink", "take"])
def test_a_move_sets_a_request_the_way_it_says(move: str) -> None:
    run = run_for({"vm0": 2 << 30})
    resized: dict[str, int] = {}
    run.vm = SimpleNamespace(resize=resized.__setitem__)
    run.chaos.holes, run.chaos.requested = {"vm0": 0}, {}
    for seed in range(50):
        run.rng = random.Random(seed)
        plugged = 5 * BLOCK
        assert run.resize(move, {"vm0": plugged}) == move
        size = resized["vm0"]
        assert run.chaos.requested["vm0"] == size and size % (2 * MiB) == 0
        if move == "grow":
            assert plugged < size <= 2 << 30
        elif move == "shrink":
            assert (plugged - size) % BLOCK == 0 and plugged - 6 * BLOCK <= size < plugged
        else:
            assert plugged - 40 * 2 * MiB <= size < plugged


def test_a_move_a_device_cannot_make_becomes_the_other() -> None:
    run = run_for({"vm0": 2 << 30})
    resized: dict[str, int] = {}
    run.vm = SimpleNamespace(resize=resized.__setitem__)
    run.chaos.holes, run.chaos.requested, run.rng = {"vm0": 0}, {}, random.Random(1)
    assert run.resize("shrink", {"vm0": 0}) == "grow"
    assert resized["vm0"] > 0
    assert run.resize("grow", {"vm0": 2 << 30}) == "take"
    assert resized["vm0"] < 2 << 30
