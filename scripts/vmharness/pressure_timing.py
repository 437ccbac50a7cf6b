"""``make pressure``'s clocks: how soon each driver unplugged, and converged once the
workload ended, and how much of the agent's convergence was waiting.

* **Time to the in-kernel driver's bytes**: from QEMU's ``size`` sampled over QMP
  during the settle time (host side only), the first moment each driver had
  unplugged as much as the in-kernel driver did by the end of it.
* **Convergence after the workload**: the workload is stopped and QEMU's ``size`` is
  polled over QMP until it is at the driver's target, for every driver (the in-kernel
  driver retries on its own timer: 50 s, doubling to 300 s, or when one of its blocks
  goes offline; Linux drivers/virtio/virtio_mem.c, ``virtio_mem_run_wq``).
* **Where the agent's convergence went**: its log (``--log-level debug``, a line per
  step) between the stop and QEMU at the target; a gap of :data:`WAIT_GAP` or more
  between two lines is the agent waiting (a refusal window or a backoff), not working.

Also the two workloads (:data:`WORKLOADS`): ``pinned`` (the original: a page every
MiB of the mlocked memory held by a pipe, shrink to 0) and ``movable`` (nothing
pinned, a target that is not a whole number of 128 MiB memory blocks).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from .sizes import MiB
from .vm import TestVM

#: A pause this long between two lines of the agent's debug log is a wait.
WAIT_GAP = 0.9
#: ``make pressure``'s workloads: the Params fields each sets (the rest are defaults).
WORKLOADS: dict[str, dict[str, Any]] = {
    "pinned": {},
    # In use and movable, not pinned: mlocked (migration moves mlocked pages), anonymous
    # and page cache; a target 24 MiB above a memory block boundary (8 blocks and 12
    # subblocks of 2 MiB go).
    "movable": {"pin_stride": 0, "shrink_to": 1000 * MiB},
}
#: The guest's local time as the agent's log writes it (logging's asctime: ms, comma).
STAMP = "%Y-%m-%d %H:%M:%S,%f"
#: A line of it: time, level, logger (``vmem_guest.driver.0000:00:03.0``), message.
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ (\S+): (.*)$")


def first_reach(samples: list[tuple[float, int]], before: int, unplugged: int) -> float | None:
    """Seconds after the ``qom-set`` at which QEMU's size first shows ``unplugged``
    bytes gone (None: never within the samples)."""
    for seconds, size in samples:
        if before - size >= unplugged:
            return seconds
    return None


def guest_time(vm: TestVM) -> str:
    """The guest's local time now, in the agent log's format."""
    return vm.sh("date '+%Y-%m-%d %H:%M:%S,%N'").strip()[:23]


def end_workload(
    vm: TestVM, device: str, target: int, timeout: float, stop: Callable[[TestVM], None]
) -> dict[str, Any]:
    """Stop the workload (``stop``) and time QEMU's size to ``target`` (QMP every 0.1 s
    from the moment ``stop`` returned: the workload has exited and its page cache file
    is gone); ``qemu_s`` None when not within ``timeout`` (0: looked at once).
    ``stop_s`` is how long ``stop`` took (the drivers work meanwhile: the agent's log
    window of :func:`agent_waits` covers both, see :func:`since_stop`)."""
    guest_stop = guest_time(vm)
    t_stop = time.monotonic()
    stop(vm)
    t0 = time.monotonic()
    reached: float | None = None
    while True:
        elapsed = time.monotonic() - t0
        if vm.plugged(device) == target:
            reached = elapsed
            break
        if elapsed >= timeout:
            break
        time.sleep(0.1)
    return {
        "guest_stop": guest_stop,
        "target": target,
        "qemu_s": reached,
        "stop_s": round(t0 - t_stop, 2),
        "timeout": timeout,
    }


def since_stop(ended: dict[str, Any]) -> float | None:
    """Seconds from the workload's stop to QEMU at the target: stopping it, then
    ``qemu_s`` (None when QEMU did not get there)."""
    if ended["qemu_s"] is None:
        return None
    return float(ended.get("stop_s", 0.0)) + float(ended["qemu_s"])


def agent_waits(log_text: str, guest_stop: str, seconds: float | None) -> dict[str, Any]:
    """The agent's log from ``guest_stop`` for ``seconds`` (to QEMU at the target): its
    gaps of WAIT_GAP or more, with the line that ended each (what the agent did next)."""
    start = datetime.strptime(guest_stop, STAMP)
    stamps = [start]
    texts = ["(workload stopped)"]
    for line in log_text.splitlines():
        found = LOG_LINE.match(line)
        if found is None:
            continue
        when = datetime.strptime(found[1], STAMP)
        offset = (when - start).total_seconds()
        if offset < 0 or (seconds is not None and offset > seconds):
            continue
        stamps.append(when)
        texts.append(f"{found[2]}: {found[3]}"[:160])
    gaps = [
        ((b - a).total_seconds(), (a - start).total_seconds(), text)
        for a, b, text in zip(stamps, stamps[1:], texts[1:], strict=False)
        if (b - a).total_seconds() >= WAIT_GAP
    ]
    return {
        "lines": len(stamps) - 1,
        "waited_s": round(sum(g for g, _, _ in gaps), 2),
        "waits": [{"seconds": round(g, 2), "at_s": round(at, 2), "then": t} for g, at, t in gaps],
    }


def ratio(agent: float | None, kernel: float | None) -> str:
    if agent is None or kernel is None:
        return "n/a"
    if kernel == 0:
        return "n/a (in-kernel 0 s)" if agent else "1.00"
    return f"{agent / kernel:.2f}"


def seconds(value: float | None, timeout: float | None = None) -> str:
    if value is None:
        return f"not within {timeout:g} s" if timeout is not None else "never"
    return f"{value:.1f} s"


def timing_lines(result: dict[str, Any]) -> list[str]:
    """The clocks of every driver, and the agents' ratios to the in-kernel driver."""
    drivers = result["drivers"]
    kernel = drivers.get("kernel")
    lines = []
    if kernel is not None:
        goal = kernel["after"]["unplugged"]
        lines.append(
            f"time to the in-kernel driver's unplugged {goal // MiB} MiB (QMP every"
            f" {result['params']['sample_every']:g} s):"
        )
        reach = {
            name: first_reach(r["after"]["samples"], r["before"]["qemu_size"], goal)
            for name, r in drivers.items()
        }
        for name, r in drivers.items():
            r["after"]["reach_kernel_s"] = reach[name]
            lines.append(
                f"  {name:<18} {seconds(reach[name]):>10}  (its last change"
                f" {r['after']['last_change_s']:g} s)  ratio {ratio(reach[name], reach['kernel'])}"
            )
    lines.append("after the workload ended, QEMU's size at the target:")
    for name, r in drivers.items():
        ended = r.get("ended")
        if ended is None:
            continue
        base = kernel.get("ended", {}).get("qemu_s") if kernel else None
        waits = r.get("agent_waits")
        waited = (
            f"; the agent waited {waits['waited_s']:g} s of it ({len(waits['waits'])} gaps"
            f" >= {WAIT_GAP:g} s in its log)"
            if waits
            else ""
        )
        stopping = f" (+ {ended['stop_s']:g} s stopping it)" if "stop_s" in ended else ""
        lines.append(
            f"  {name:<18} {seconds(ended['qemu_s'], ended['timeout']):>10}  ratio"
            f" {ratio(ended['qemu_s'], base)}{stopping}{waited}"
        )
    return lines
