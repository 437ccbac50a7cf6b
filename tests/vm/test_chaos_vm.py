"""Crash recovery in a real guest (issue 5 items 2 and 3): a bounded ``make chaos``.

One VM (no-IOMMU, one 2 GiB device with 2 MiB blocks). The agent is killed
with SIGKILL at random moments after host resizes that mostly end inside a
memory block, so that it takes subblocks of online blocks out of use and gives
holes back. With it dead, raw STATE requests and /proc/kpageflags check that
every page of an online memory block is plugged or HWPOISON and that the tracker
agrees with the device outside the pending intent; restarted, the agent must
converge on the requested size (QEMU, tracker, remainder, MemTotal,
HardwareCorrupted, page flags, STATE). Then a ``system_reset`` with memory
plugged and holes: the new boot has nothing plugged or poisoned and the agent,
started again, converges. ``make chaos`` is the long run (``scripts/chaos.py``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import chaos
import pytest
from vmharness import TestVM, VMConfig

BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]
KILLS = 5
SEED = 20261127


@pytest.fixture(scope="module")
def vm(boot_vm: BootVM) -> Iterator[TestVM]:
    with boot_vm(chaos.chaos_config(devices=1, name="chaos-test")) as booted:
        yield booted


def test_sigkill_at_random_moments_keeps_invariants_and_recovers(vm: TestVM) -> None:
    check_chaos(vm, SEED, KILLS, resets=1)


def check_chaos(vm: TestVM, seed: int, kills: int, resets: int) -> None:
    """``kills`` SIGKILLs at random moments and ``resets`` (0 or 1) system_resets: every
    invariant holds while the agent is dead, and it recovers each time."""
    lines: list[str] = []
    run = chaos.Chaos(vm, seed=seed, max_delay=1.5, log=lines.append)
    run.start()
    run.run_kills(kills)
    if resets:
        run.reset_once()
    run.final_check()
    print("\n".join(lines))
    summary = run.summary()
    assert summary["ok"], "\n".join([*lines, run.summary_line()])
    assert summary["recovered"] == kills and summary["invariant_violations"] == 0
    assert summary["resets_recovered"] == resets and summary["final_check"] == []
