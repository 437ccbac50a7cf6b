"""Watching a resize converge, from the host: QEMU's plugged size and the guest's MemTotal.

:func:`watch_resize` sets ``requested-size`` on one or more devices and returns when
every device's QEMU ``size`` is at its target and the guest's MemTotal is at its
target (or has settled elsewhere). QEMU is polled over QMP every ~5 ms by a thread
of its own (:class:`SizePoller`), so a slow guest-runner round trip never delays it;
MemTotal is read through the guest runner in the calling thread, every ~50 ms. Both
are recorded as :class:`Curve` step functions, for the benchmarks' pictures.

Times are seconds from just before the first ``qom-set``. Nothing here asserts on time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .vm import TestVM

QMP_INTERVAL = 0.005  #: sleep between two QMP polls of every watched device's size
MEMTOTAL_INTERVAL = 0.05  #: sleep between two MemTotal reads through the guest runner
#: MemTotal that has not changed for this long after QEMU reached its target is taken as
#: settled even if it is not the expected value (reported as such, never waited out).
SETTLE_SECONDS = 30.0
PROGRESS_SECONDS = 15.0  #: how often a long wait prints a progress line


@dataclass
class Curve:
    """A value against time as a step function: a point wherever the value changed,
    plus the time it was last seen (``end``)."""

    times: list[float] = field(default_factory=list)
    values: list[int] = field(default_factory=list)
    end: float = 0.0

    def record(self, t: float, value: int) -> None:
        """Note value seen at t (seconds); keeps a point only when the value changed."""
        if not self.values or self.values[-1] != value:
            self.times.append(t)
            self.values.append(value)
        self.end = max(self.end, t)

    @property
    def last(self) -> int:
        return self.values[-1]

    def as_dict(self) -> dict[str, Any]:
        return {"t": [round(t, 4) for t in self.times], "bytes": self.values, "end": self.end}

    @staticmethod
    def total(curves: list[Curve]) -> Curve:
        """The sum of step functions (e.g. the plugged size of several devices)."""
        out = Curve()
        moments = sorted({t for c in curves for t in c.times})
        for t in moments:
            out.record(t, sum(_value_at(c, t) for c in curves))
        out.end = max((c.end for c in curves), default=0.0)
        return out


def _value_at(curve: Curve, t: float) -> int:
    value = curve.values[0] if curve.values else 0
    for when, v in zip(curve.times, curve.values, strict=True):
        if when > t:
            break
        value = v
    return value


class SizePoller(threading.Thread):
    """Polls QEMU's plugged ``size`` of each device (qom-get) every ``interval`` seconds,
    records a curve per device, and the first moment each device, and all of them
    together, were at their targets."""

    def __init__(
        self, vm: TestVM, targets: Mapping[str, int], t0: float, interval: float = QMP_INTERVAL
    ) -> None:
        super().__init__(name="qmp-size-poller", daemon=True)
        self.vm = vm
        self.targets = dict(targets)
        self.t0 = t0
        self.interval = interval
        self.curves = {dev: Curve() for dev in self.targets}
        self.latest: dict[str, int] = {}
        self.reached: dict[str, float] = {}  #: device -> first time at its target
        self.all_reached: float | None = None  #: first time every device was at its target
        self.polls = 0
        self.poll_seconds = 0.0  #: summed QMP round trips (the resolution)
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self.poll_once()
                self._halt.wait(self.interval)
        except BaseException as exc:  # handed to the caller, which raises it
            self.error = exc

    def poll_once(self) -> None:
        """One qom-get of every device's size."""
        for dev, target in self.targets.items():
            started = time.perf_counter()
            size = self.vm.plugged(dev)
            now = time.perf_counter()
            self.poll_seconds += now - started
            self.curves[dev].record(now - self.t0, size)
            self.latest[dev] = size
            if size == target and dev not in self.reached:
                self.reached[dev] = now - self.t0
        self.polls += 1
        if self.all_reached is None and all(
            self.latest.get(dev) == target for dev, target in self.targets.items()
        ):
            self.all_reached = max(self.reached.values())

    def halt(self) -> None:
        """Stop polling and wait for the thread."""
        self._halt.set()
        self.join()


@dataclass
class ResizeWatch:
    """What one watched resize showed (seconds from just before the first qom-set)."""

    qemu_s: float  #: until QEMU's size was at the target on every device
    memtotal_s: float  #: until MemTotal was at its target (or its last change, if settled)
    memtotal_exact: bool  #: False: MemTotal settled at another value (memtotal_final)
    memtotal_final: int
    qemu_per_device_s: dict[str, float]
    size_curves: dict[str, Curve]
    memtotal_curve: Curve
    qmp_poll_s: float  #: mean QMP round trip (qom-get)
    memtotal_read_s: float  #: mean MemTotal read through the guest runner

    def as_dict(self) -> dict[str, Any]:
        return {
            "qemu_s": self.qemu_s,
            "memtotal_s": self.memtotal_s,
            "memtotal_exact": self.memtotal_exact,
            "memtotal_final": self.memtotal_final,
            "qemu_per_device_s": self.qemu_per_device_s,
            "qmp_poll_s": self.qmp_poll_s,
            "memtotal_read_s": self.memtotal_read_s,
            "curves": {
                "size": {dev: c.as_dict() for dev, c in self.size_curves.items()},
                "memtotal": self.memtotal_curve.as_dict(),
            },
        }


def watch_resize(
    vm: TestVM,
    requested: Mapping[str, int],
    targets: Mapping[str, int],
    memtotal_target: int,
    *,
    timeout: float,
    progress: Callable[[float, dict[str, int], int], None] | None = None,
    after_request: Callable[[], None] | None = None,
) -> ResizeWatch:
    """qom-set ``requested`` (device -> bytes), then wait until QEMU's size equals
    ``targets`` (device -> bytes the driver is expected to plug; devices not resized may
    be listed too) and MemTotal equals ``memtotal_target``.

    ``progress(elapsed, sizes, memtotal)`` is called every PROGRESS_SECONDS while waiting.
    ``after_request()`` runs right after the qom-sets, inside the timing, with QEMU's
    sizes already polled (a driver started only then: its start-up is in the figures).
    Raises TimeoutError after ``timeout`` seconds.
    """
    memtotal_curve = Curve()
    before_total = vm.mem_total()
    before_sizes = {dev: vm.plugged(dev) for dev in targets}
    t0 = time.perf_counter()
    memtotal_curve.record(0.0, before_total)
    for dev, size in requested.items():
        vm.resize(dev, size)
    poller = SizePoller(vm, targets, t0)
    for dev, size in before_sizes.items():
        poller.curves[dev].record(0.0, size)
    poller.start()
    if after_request is not None:
        try:
            after_request()
        except BaseException:
            poller.halt()
            raise
    reads = 0
    read_seconds = 0.0
    t_memtotal: float | None = None
    next_progress = PROGRESS_SECONDS
    try:
        while True:
            started = time.perf_counter()
            total = vm.mem_total()
            now = time.perf_counter()
            read_seconds += now - started
            reads += 1
            elapsed = now - t0
            memtotal_curve.record(elapsed, total)
            if t_memtotal is None and total == memtotal_target:
                t_memtotal = elapsed
            if poller.error is not None:
                raise poller.error
            done_qemu = poller.all_reached is not None
            if done_qemu and t_memtotal is not None:
                break
            if done_qemu and elapsed - memtotal_curve.times[-1] > SETTLE_SECONDS:
                break  # MemTotal settled elsewhere: reported, not waited out
            if elapsed > timeout:
                raise TimeoutError(
                    f"resize {dict(requested)} not done after {timeout:.0f} s: QEMU sizes"
                    f" {poller.latest} (want {dict(targets)}), MemTotal {total}"
                    f" (want {memtotal_target})"
                )
            if progress is not None and elapsed >= next_progress:
                progress(elapsed, dict(poller.latest), total)
                next_progress += PROGRESS_SECONDS
            time.sleep(MEMTOTAL_INTERVAL)
    finally:
        poller.halt()
    assert poller.all_reached is not None
    exact = t_memtotal is not None
    return ResizeWatch(
        qemu_s=poller.all_reached,
        memtotal_s=t_memtotal if t_memtotal is not None else memtotal_curve.times[-1],
        memtotal_exact=exact,
        memtotal_final=memtotal_curve.last,
        qemu_per_device_s=dict(poller.reached),
        size_curves=poller.curves,
        memtotal_curve=memtotal_curve,
        qmp_poll_s=poller.poll_seconds / max(poller.polls * len(targets), 1),
        memtotal_read_s=read_seconds / max(reads, 1),
    )
