"""The devices' state as Prometheus metrics (text exposition format 0.0.4).

``vmem-guest status --prometheus`` prints :func:`exposition` of the trackers; ``vmem-guest
run --metrics-file PATH`` has the agent rewrite PATH whenever a tracker changes
(:class:`MetricsFile`), for node_exporter's textfile collector, which reads the
``*.prom`` files of one directory. docs/operations.md lists the metrics.

The format (prometheus.io, "Exposition formats", text-based format): a ``# HELP``
and a ``# TYPE`` line per metric family, then its samples
``name{label="value"} number``; a label value escapes ``\\``, ``"`` and newline, a
HELP text ``\\`` and newline; the last line ends with a newline. Names follow the
naming conventions: a ``vmem_guest_`` prefix, base units (``_bytes``), ``_total``
on counters and only there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vmem_guest import health
from vmem_guest.tracker import TrackerSnapshot

if TYPE_CHECKING:
    # Types only: `status --prometheus` must not import the agent and its driver.
    from vmem_guest.agent import DeviceSlot

PREFIX = "vmem_guest_"
FILE_MODE = 0o644


@dataclasses.dataclass(frozen=True)
class Family:
    """One metric family with one sample per device (label ``device``: its PCI address)."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    value: Callable[[TrackerSnapshot], int]


DEVICE_FAMILIES = (
    Family(
        "vmem_guest_requested_bytes",
        "gauge",
        "Size the host requested (requested_size, as last read by the driver).",
        lambda s: s.requested_size,
    ),
    Family(
        "vmem_guest_plugged_bytes",
        "gauge",
        "Size plugged: the device blocks the tracker records plugged (what the device"
        " reports as plugged_size after every request).",
        lambda s: s.plugged_bytes,
    ),
    Family(
        "vmem_guest_online_bytes",
        "gauge",
        "Size of the device's memory blocks online in the guest (holes included).",
        lambda s: s.online_bytes,
    ),
    Family(
        "vmem_guest_hole_bytes",
        "gauge",
        "Unplugged subblocks inside online memory blocks (their pages poisoned).",
        lambda s: s.hole_bytes,
    ),
    Family(
        "vmem_guest_remainder_bytes",
        "gauge",
        "Part of the requested size the guest cannot use and left unplugged.",
        lambda s: s.remainder_bytes,
    ),
    Family(
        "vmem_guest_usable_region_bytes",
        "gauge",
        "Part of the device region that may be plugged (usable_region_size).",
        lambda s: s.usable_region_size,
    ),
    Family(
        "vmem_guest_region_bytes",
        "gauge",
        "Size of the device region.",
        lambda s: s.geometry.region_size,
    ),
    Family(
        "vmem_guest_broken",
        "gauge",
        "1 if the device is marked broken (the agent no longer touches it), else 0.",
        lambda s: int(s.broken),
    ),
    Family(
        "vmem_guest_converged",
        "gauge",
        "1 if the device holds what the host requested, all of it in use, else 0.",
        lambda s: int(health.converged(s)),
    ),
    Family(
        "vmem_guest_requests_total",
        "counter",
        "Requests sent to the device since its tracker was created.",
        lambda s: s.requests,
    ),
    Family(
        "vmem_guest_retries_total",
        "counter",
        "Steps retried after a BUSY answer or a refused offline, since the tracker was created.",
        lambda s: s.retries,
    ),
)
BLOCKS_FAMILY = "vmem_guest_memory_blocks"
BLOCKS_HELP = "Memory blocks of the device region per state (unplugged, partial, plugged, online)."
RESIZE_FAMILY = "vmem_guest_last_resize_seconds"
RESIZE_HELP = (
    "Duration of the device's last converged resize, from the config change that began"
    " it to convergence (the agent's metrics file only)."
)


def exposition(
    snapshots: Sequence[TrackerSnapshot], last_resize: Mapping[str, float] | None = None
) -> str:
    """The text exposition of ``snapshots``, one sample per device and family.

    ``last_resize``: seconds of each device's last converged resize, by device, as
    the agent timed it (a device without one has no sample); None (``status``, which
    reads trackers only, and they do not record it): no such family.
    """
    lines: list[str] = []
    for family in DEVICE_FAMILIES:
        lines += _header(family.name, family.kind, family.help)
        lines += [
            _sample(family.name, {"device": snap.identity.name}, family.value(snap))
            for snap in snapshots
        ]
    lines += _header(BLOCKS_FAMILY, "gauge", BLOCKS_HELP)
    for snap in snapshots:
        for state, count in snap.state_counts().items():
            labels = {"device": snap.identity.name, "state": state.name.lower()}
            lines.append(_sample(BLOCKS_FAMILY, labels, count))
    if last_resize is not None:
        lines += _header(RESIZE_FAMILY, "gauge", RESIZE_HELP)
        lines += [
            _sample(RESIZE_FAMILY, {"device": snap.identity.name}, last_resize[snap.identity.name])
            for snap in snapshots
            if snap.identity.name in last_resize
        ]
    return "\n".join(lines) + "\n"


def _header(name: str, kind: str, text: str) -> list[str]:
    escaped = text.replace("\\", "\\\\").replace("\n", "\\n")
    return [f"# HELP {name} {escaped}", f"# TYPE {name} {kind}"]


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    pairs = ",".join(f'{key}="{_label_value(text)}"' for key, text in labels.items())
    return f"{name}{{{pairs}}} {value}"


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsFile:
    """The agent's metrics file: rewritten whenever a tracker changed, removed at close.

    A :class:`~vmem_guest.agent.StateListener`: the agent calls :meth:`changed` after
    each turn of its loop, right before it sleeps, so nothing is polled.

    Written to a temporary file beside it and renamed over it, so the textfile
    collector never reads half a file; the temporary name does not end in
    ``.prom``, so the collector never reads it either. No fsync: the file is
    rewritten on every change and means nothing after a crash (a stale file shows
    in node_exporter's ``node_textfile_mtime_seconds``). A write that fails is logged
    once (until one succeeds) and does not stop the agent.
    """

    def __init__(self, path: Path, log: logging.Logger) -> None:
        self.path = path
        self.log = log
        self._published: tuple[tuple[str, int, float | None], ...] | None = None
        self._failing = False

    def ready(self, slots: Mapping[str, DeviceSlot]) -> None:
        self.changed(slots)

    def changed(self, slots: Mapping[str, DeviceSlot]) -> None:
        snapshots = [slot.attached.tracker.snapshot() for slot in slots.values()]
        last_resize = {
            bdf: slot.resize.last.seconds
            for bdf, slot in slots.items()
            if slot.resize.last is not None
        }
        self.publish(snapshots, last_resize)

    def stopping(self) -> None:
        """Nothing: :meth:`close` removes the file once the devices are let go."""

    def publish(
        self, snapshots: Sequence[TrackerSnapshot], last_resize: Mapping[str, float]
    ) -> None:
        """Rewrite the file unless no tracker changed and no resize ended since the last
        write (a tracker snapshot is decoded once per change: Tracker.snapshot)."""
        key = tuple(
            (snap.identity.name, snap.generation, last_resize.get(snap.identity.name))
            for snap in snapshots
        )
        if key == self._published:
            return
        try:
            write_atomically(self.path, exposition(snapshots, last_resize))
        except OSError as exc:
            if not self._failing:
                self.log.error("cannot write metrics to %s: %s", self.path, exc.strerror)
            self._failing = True
            return
        self._failing = False
        self._published = key

    def close(self) -> None:
        """Remove the file: an agent that stopped publishes nothing stale."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text`` (mode FILE_MODE) in one rename."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE
        )
        try:
            os.fchmod(fd, FILE_MODE)  # whatever the umask: node_exporter runs as its own user
            data = text.encode()
            while data:  # a regular file takes it all at once; be exact anyway
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def check_metrics_path(path: Path) -> str | None:
    """Why ``path`` cannot be the metrics file (for a usage error before anything
    starts), or None."""
    if path.is_dir():
        return f"--metrics-file {path} is a directory"
    if not path.parent.is_dir():
        return f"--metrics-file {path}: directory {path.parent} does not exist"
    return None
