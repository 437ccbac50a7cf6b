"""The kernel refuses the agent at random (issue 22 item 3): a bounded ``make faults``.

One chaos VM (no-IOMMU, one 2 GiB device with 2 MiB blocks). Two rounds, each
with Linux's fault injection aimed at the agent's process only (failslab and
fail_page_alloc with the task filter, ``scripts/vmharness/faults.py``): the host
grows the device, then shrinks it (the sizes of ``make chaos``, mostly inside a
memory block), the agent works for a few seconds under faults, the faults stop.
Every round: the agent stayed alive with no device marked broken (an ENOMEM from
``/proc/self/pagemap`` included: docs/safety.md, "Kernel faults"), the kernel did
refuse it, and it converged once the faults stopped (QEMU = tracker, request met,
nothing plugged left unused, MemTotal, HardwareCorrupted, STATE through the agent).
At the end, with the agent stopped, raw STATE requests, sysfs and kpageflags check
every online block (``scripts/chaos_guest.py dead``). ``make faults N=...`` is the long run
(``scripts/kernel_faults.py``), ``make faults-test`` runs this one alone."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import chaos
import kernel_faults
import pytest
from vmharness import TestVM, VMConfig
from vmharness.faults import FaultSpec

BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]
SEED = 20261207
#: (faults, shrinking): growth under slab faults (pagemap, online), then a
#: shrink under slab and page faults (offline, soft offline). Two rounds and one raw
#: check keep the test near a minute and a half under TCG.
ROUNDS = (
    ([FaultSpec("failslab", 30)], False),
    ([FaultSpec("failslab", 20), FaultSpec("fail_page_alloc", 50, times=100)], True),
)

#: Not in make test: 48-68 s a run under single-threaded TCG, but in 2 of 16 runs the
#: guest runner went silent for 75 s when round 2 turned the faults off, cause not
#: found yet (docs/test-vm.md section 15); a silent runner would fail CI. The harness
#: now dumps the guest's tasks when that happens. ``make faults-test`` runs it.
pytestmark = pytest.mark.long


@pytest.fixture(scope="module")
def vm(boot_vm: BootVM) -> Iterator[TestVM]:
    with boot_vm(chaos.chaos_config(devices=1, name="faults-test")) as booted:
        yield booted


def test_kernel_refusals_under_fault_injection_keep_invariants_and_converge(vm: TestVM) -> None:
    lines: list[str] = []
    run = kernel_faults.KernelFaultRun(vm, seed=SEED, window=3.0, log=lines.append)
    run.start()
    for specs, shrinking in ROUNDS:
        run.run_round(specs, shrinking)
    run.finish()  # the raw check, the agent stopped
    print("\n".join(lines))
    summary = run.summary()
    text = "\n".join([*lines, run.summary_line()])
    assert summary["ok"], text
    assert summary["recovered"] == len(ROUNDS) and summary["violations"] == 0, text
    assert not summary["final_check"], text
    # The faults did hit the agent: injected every round, and the kernel refused it
    # every round (the agent's log). Which operation each refusal hit is not asserted:
    # failslab's percentages land where the agent's allocations happen to be, so one
    # run's growth saw only pagemap refused (the no-IOMMU check before a PLUG), another
    # pagemap and the sysfs reads of block state; one shrink saw soft offlines refused,
    # another only sysfs reads. That each operation's refusal is survived is the unit
    # tests' job, where the fake kernel refuses exactly one (docs/safety.md, "Kernel
    # faults"); the per-operation counts are printed above, and ``make faults`` runs
    # 20 rounds of them.
    assert all(sum(r.injected.values()) for r in run.rounds), text
    assert all(sum(r.refused.values()) for r in run.rounds), text
