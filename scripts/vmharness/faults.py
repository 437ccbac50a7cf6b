"""Kernel fault injection in the test guest, aimed at one process (the agent).

Linux's fault injection (Documentation/fault-injection/fault-injection.rst) makes
slab allocations (``failslab``) and page allocations (``fail_page_alloc``) fail
at random. With ``task-filter`` set, only tasks whose ``/proc/PID/make-it-fail``
(per task: ``/proc/PID/task/TID/make-it-fail``) is 1 are failed; a thread or child
created later inherits the flag (``copy_process`` copies the task struct). The
knobs under ``/sys/kernel/debug/<kind>/`` (lib/fault-inject.c,
``fault_create_debugfs_attr``; mm/failslab.c; mm/fail_page_alloc.c):

* ``probability`` (percent of the calls that pass every other test) and
  ``interval``; ``times``: how many failures at most, decremented by each one
  injected, so the count injected is exact when it starts finite;
* ``ignore-gfp-wait``: Y (the default) skips allocations that may sleep, which is
  nearly every allocation of a system call; N fails those too;
* ``fail_page_alloc/min-order`` stays 1, the default: order-0 pages never fail.
  At 0 a probe crashed the guest: hot-adding memory maps it into the kernel's direct
  map with page tables from ``alloc_low_pages`` (arch/x86/mm/init.c), which after
  boot is ``__get_free_pages(GFP_ATOMIC | __GFP_ZERO, 0)``, and ``phys_pud_init``
  (arch/x86/mm/init_64.c) hands its NULL to ``phys_pmd_init`` unchecked: a NULL
  dereference, a panic (Linux 6.1.192 and 6.12.118 alike). No knob spares that
  allocation alone (the stack-trace filter is ``!X86_64``, lib/Kconfig.debug);
  ``ignore-gfp-highmem`` stays Y, so the process's own user pages (and page cache,
  and the pages offline and soft offline migrate to) never fail and a page fault
  does not loop;
* ``verbose`` 2 prints ``FAULT_INJECTION: forcing a failure.`` and a call trace per
  failure, rate limited by ``verbose_ratelimit_interval_ms`` / ``_burst``; set wide
  open here, with the console log level lowered so the traces go to the kernel's
  ring buffer (read with ``dmesg``) and not, slowly, to the serial console.

What a failure hits, in the agent: every sysfs write allocates its buffer
(``kernfs_fop_write_iter``), every open a ``struct file``, every sysfs read a
seq_file buffer; ``probe`` allocates the memory block devices, sections and memmap
(``add_memory_resource``); soft offline allocates the page it migrates to; offline
the pages it migrates to. The call trace tells which (:func:`classify_trace`).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections import Counter

from .vm import TestVM

KINDS = ("failslab", "fail_page_alloc")
DEBUGFS = "/sys/kernel/debug"
#: The kernel's console log level while faults are on: only KERN_EMERG and
#: KERN_ALERT reach the serial console (a panic still does).
QUIET_CONSOLE = 2
#: ``times`` for "no limit": finite, so that what is left says how many were injected.
UNLIMITED_TIMES = 1_000_000
FAULT_MARK = "FAULT_INJECTION: forcing a failure."
#: fail_page_alloc's ``min-order``: never 0, an order-0 failure in the hot-add's
#: direct-map page tables panics Linux (see the module docstring).
PAGE_MIN_ORDER = 1
#: Kernel functions that name the operation a failed allocation served, first match
#: wins (drivers/base/memory.c, mm/memory_hotplug.c, mm/memory-failure.c, fs/kernfs).
_OPERATIONS = (
    ("probe", ("probe_store", "add_memory_resource", "__add_memory", "add_memory")),
    ("soft offline", ("soft_offline_page", "soft_offline_in_use_page")),
    ("unpoison", ("unpoison_memory",)),
    ("offline", ("offline_pages", "memory_block_offline")),
    ("online", ("online_pages", "memory_block_online")),
    ("sysfs write", ("kernfs_fop_write_iter",)),
    ("sysfs read", ("kernfs_fop_read_iter", "seq_read_iter")),
    ("open", ("do_sys_openat2", "path_openat", "alloc_empty_file")),
    ("mmap", ("do_mmap", "mmap_region", "vm_area_alloc")),
)
_FRAME = re.compile(r"^\s*(?:\[[^\]]*\]\s*)?(?:\? )?([A-Za-z_][\w.]*)\+0x[0-9a-f]+/0x[0-9a-f]+")


@dataclasses.dataclass(frozen=True)
class FaultSpec:
    """One kind of fault and how often: ``probability`` percent of the calls of the
    aimed-at tasks fail, ``times`` at most (None: no limit)."""

    kind: str
    probability: int
    times: int | None = None
    interval: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"fault kind {self.kind!r}: one of {', '.join(KINDS)}")
        if not 0 <= self.probability <= 100:
            raise ValueError(f"probability {self.probability}: a percentage")

    @property
    def start_times(self) -> int:
        return UNLIMITED_TIMES if self.times is None else self.times

    def settings(self) -> list[tuple[str, str]]:
        """(debugfs attribute, value) in the order written; probability last, so the
        kind is armed only once everything else is set."""
        pairs = [
            ("probability", "0"),
            ("task-filter", "Y"),
            ("interval", str(self.interval)),
            ("times", str(self.start_times)),
            ("space", "0"),
            ("verbose", "2"),
            ("verbose_ratelimit_interval_ms", "0"),
            ("ignore-gfp-wait", "N"),
        ]
        if self.kind == "fail_page_alloc":
            pairs += [("ignore-gfp-highmem", "Y"), ("min-order", str(PAGE_MIN_ORDER))]
        return [*pairs, ("probability", str(self.probability))]

    def __str__(self) -> str:
        times = "no limit" if self.times is None else f"at most {self.times}"
        return f"{self.kind} {self.probability}% ({times})"


@dataclasses.dataclass
class FaultReport:
    """What one spell of faults did: failures injected per kind (exact, from
    ``times``) and per operation (from the call traces in the kernel log)."""

    injected: dict[str, int]
    operations: Counter[str]
    traces: int

    @property
    def total(self) -> int:
        return sum(self.injected.values())


def _make_it_fail(pid: int, value: int, *, strict: bool = True) -> str:
    """Shell that sets make-it-fail on every task of process ``pid``; ``strict``: fail
    at the first task that cannot be set (else go on: the process may be gone)."""
    check = " || exit 1" if strict else " 2>/dev/null"
    return f"for t in /proc/{pid}/task/*; do echo {value} > $t/make-it-fail{check}; done"


def available(vm: TestVM) -> str | None:
    """Why faults cannot be injected in this guest (None: they can)."""
    missing = [kind for kind in KINDS if vm.guest(f"test -d {DEBUGFS}/{kind}")[0] != 0]
    if missing:
        return f"no {', '.join(missing)} under {DEBUGFS}: the kernel lacks FAULT_INJECTION_DEBUG_FS"
    return None


class Faults:
    """Turns fault injection on for one process of the guest, and off again."""

    def __init__(self, vm: TestVM) -> None:
        self.vm = vm
        self.specs: list[FaultSpec] = []
        self.pid: int | None = None
        self.console_level = ""

    def on(self, pid: int, specs: list[FaultSpec]) -> None:
        """Aim ``specs`` at every task of ``pid`` (one guest command): the kernel log
        is cleared, so :meth:`off` reads only this spell's traces."""
        if self.specs:
            raise RuntimeError("faults are on already")
        self.console_level = self.vm.read("/proc/sys/kernel/printk").split()[0]
        writes = [
            f"echo {shlex.quote(value)} > {DEBUGFS}/{spec.kind}/{name}"
            for spec in specs
            for name, value in spec.settings()
        ]
        self.vm.sh(
            " && ".join(
                [
                    f"echo {QUIET_CONSOLE} > /proc/sys/kernel/printk",
                    "dmesg -C",
                    _make_it_fail(pid, 1),
                    *writes,
                ]
            )
        )
        self.specs, self.pid = list(specs), pid

    def off(self) -> FaultReport:
        """Disarm every kind, clear make-it-fail (if the process still runs), restore
        the console level; what was injected."""
        if not self.specs or self.pid is None:
            raise RuntimeError("faults are not on")
        disarm = [f"echo 0 > {DEBUGFS}/{kind}/probability" for kind in KINDS]
        self.vm.sh(
            "; ".join(
                [
                    *disarm,
                    _make_it_fail(self.pid, 0, strict=False),
                    f"echo {self.console_level or 7} > /proc/sys/kernel/printk",
                    "true",
                ]
            )
        )
        injected = {
            spec.kind: spec.start_times - int(self.vm.read(f"{DEBUGFS}/{spec.kind}/times"))
            for spec in self.specs
        }
        log = self.vm.sh("dmesg")
        self.specs, self.pid = [], None
        operations = Counter(classify_trace(trace) for trace in split_traces(log))
        return FaultReport(injected, operations, sum(operations.values()))


def split_traces(log: str) -> list[list[str]]:
    """The kernel log's fault-injection reports, each as its lines from the mark to
    the end of its call trace (the ``</TASK>`` line)."""
    traces: list[list[str]] = []
    inside = False
    for line in log.splitlines():
        if FAULT_MARK in line:
            traces.append([])
            inside = True
        if inside:
            traces[-1].append(line)
            inside = "</TASK>" not in line
    return traces


def classify_trace(lines: list[str]) -> str:
    """The operation a failed allocation served, from its call trace (innermost
    frames first): the first family of :data:`_OPERATIONS` one frame belongs to."""
    frames = [m.group(1) for line in lines if (m := _FRAME.match(_strip_time(line)))]
    for operation, functions in _OPERATIONS:
        if any(frame in functions for frame in frames):
            return operation
    return "other"


def _strip_time(line: str) -> str:
    """A kernel log line without its ``[   12.345678]`` time stamp."""
    return re.sub(r"^\[\s*\d+\.\d+\]\s?", "", line)
