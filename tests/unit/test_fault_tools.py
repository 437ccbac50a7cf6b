"""The fault-injection tools without a VM: the debugfs settings of a kind of fault,
the kernel log's call traces sorted by operation, the agent's refusals counted."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import kernel_faults  # noqa: E402
from vmharness.faults import FaultSpec, classify_trace, split_traces  # noqa: E402

#: Two reports as Linux 6.1 logs them (verbose 2): a probe's memory block device
#: refused inside add_memory_resource, and the buffer of a sysfs write.
KERNEL_LOG = """\
[   41.000001] virtio_mem: unrelated line
[   45.123456] FAULT_INJECTION: forcing a failure.
               name failslab, interval 1, probability 20, space 0, times 999990
[   45.123500] CPU: 0 PID: 123 Comm: vmem-guest Not tainted 6.1.0 #1
[   45.123520] Call Trace:
[   45.123530]  <TASK>
[   45.123540]  dump_stack_lvl+0x44/0x5c
[   45.123550]  should_fail.cold+0x5/0xa
[   45.123560]  should_failslab+0x5/0x10
[   45.123570]  kmem_cache_alloc_trace+0x5a/0x2f0
[   45.123575]  ? kernfs_fop_write_iter+0x12/0x1d0
[   45.123580]  init_memory_block+0x26/0x90
[   45.123585]  add_memory_resource+0x1a2/0x2f0
[   45.123590]  __add_memory+0x40/0x80
[   45.123595]  probe_store+0x3f/0x70
[   45.123600]  kernfs_fop_write_iter+0x11c/0x1d0
[   45.123610]  vfs_write+0x2e8/0x3f0
[   45.123620]  </TASK>
[   45.200000] virtio_mem: another unrelated line naming online_pages+0x1/0x2
[   46.000000] FAULT_INJECTION: forcing a failure.
               name failslab, interval 1, probability 20, space 0, times 999989
[   46.000020] Call Trace:
[   46.000030]  <TASK>
[   46.000040]  __kmalloc+0x4a/0x160
[   46.000050]  kernfs_fop_write_iter+0xdc/0x1d0
[   46.000060]  vfs_write+0x2e8/0x3f0
[   46.000070]  ksys_write+0x5f/0xe0
[   46.000080]  </TASK>
"""


def test_each_kind_is_armed_last_with_sleeping_allocations_included() -> None:
    slab = FaultSpec("failslab", 20).settings()
    assert slab[0] == ("probability", "0") and slab[-1] == ("probability", "20")
    assert ("task-filter", "Y") in slab and ("ignore-gfp-wait", "N") in slab
    assert ("times", "1000000") in slab
    pages = dict(FaultSpec("fail_page_alloc", 5, times=7).settings())
    # Never order 0: Linux's hot-add dereferences a failed order-0 page-table page.
    assert pages["min-order"] == "1" and pages["ignore-gfp-highmem"] == "Y"
    assert pages["times"] == "7"


@pytest.mark.parametrize("kind, probability", [("failmake", 5), ("failslab", 101)])
def test_a_bad_spec_is_refused(kind: str, probability: int) -> None:
    with pytest.raises(ValueError):
        FaultSpec(kind, probability)


def test_traces_are_split_at_each_report_and_sorted_by_operation() -> None:
    traces = split_traces(KERNEL_LOG)
    assert [len(t) for t in traces] == [17, 9]
    assert [classify_trace(t) for t in traces] == ["probe", "sysfs write"]
    assert classify_trace(["[ 1.0]  __kmalloc+0x4a/0x160"]) == "other"


def test_the_agents_refusals_are_counted_by_operation_and_errno() -> None:
    log = "\n".join(
        [
            "driver.0000:00:03.0: online memory42 failed: ENOMEM (Cannot allocate memory);"
            " retrying memory42 later (in 5.00 s)",
            "driver.0000:00:03.0: probe memory43 failed: ENOMEM (Cannot allocate memory);"
            " retrying memory43 later (in 5.00 s)",
            "driver.0000:00:03.0: soft offline of pfn 0x148200 failed: ENOMEM (Cannot"
            " allocate memory); subblocks 40+1 later (in 5.00 s)",
            "driver.0000:00:03.0: read memory42/state failed: ENOMEM (Cannot allocate"
            " memory); retrying memory42 later (in 10.00 s)",
            "driver.0000:00:03.0: online memory42 failed: ENOMEM (Cannot allocate memory);"
            " retrying memory42 later (in 10.00 s)",
            "tracker: taking addr=0x148200000 nb_blocks=1",
            "driver.0000:00:03.0: PLUG 0x148000000 x64 not sent: open /proc/self/pagemap"
            " failed: ENOMEM (Cannot allocate memory); the DMA pages are checked again"
            " before the next request",
            "driver.0000:00:03.0: STATE 0x148000000 x1 not sent: read /proc/self/pagemap"
            " failed: EAGAIN (Resource temporarily unavailable); the DMA pages are checked"
            " again before the next request",
        ]
    )
    assert kernel_faults.refusals(log) == {
        "online ENOMEM": 2,
        "probe ENOMEM": 1,
        "soft offline ENOMEM": 1,
        "read sysfs ENOMEM": 1,
        "pagemap ENOMEM": 1,
        "pagemap EAGAIN": 1,
    }
