"""What ``vmem-guest status`` reads beside the tracker files: the guest's memory
figures and the running agent's online paths.

Kept apart from ``service`` so that a one-shot ``status`` imports neither the agent
nor VFIO: in a TCG guest every module imported costs a visible share of a second.
"""

from __future__ import annotations

from pathlib import Path

from vmem_guest import control, health, render
from vmem_guest._linux.procfs import memtotal_bytes
from vmem_guest.errors import VmemError
from vmem_guest.pages import ProcPages
from vmem_guest.tracker import TrackerReader, TrackerSnapshot, list_trackers

#: How long ``status`` waits for the agent's answer to a ping. The agent answers between
#: steps only; ``status`` itself reads the trackers without the agent and must not hang
#: on a busy one (an offline retried under memory pressure).
PING_SECONDS = 1.0


def guest_memory() -> render.GuestMemory:
    """MemTotal and HardwareCorrupted of this guest, for ``status`` beside the devices:
    pages taken out of online blocks stay in MemTotal and count as HardwareCorrupted."""
    with ProcPages() as pages:
        return render.GuestMemory(memtotal_bytes(), pages.hardware_corrupted_bytes())


def agent_online_paths(state_dir: Path) -> dict[str, str]:
    """How each device the running agent serves onlines new blocks (by PCI address,
    ``online_path.describe``), for ``status``; empty when no agent answers (none runs,
    its socket is root's and we are not, or it is inside a step for PING_SECONDS)."""
    try:
        answer = control.call(control.socket_path(state_dir), control.Ping(), timeout=PING_SECONDS)
    except (VmemError, TimeoutError):
        return {}
    paths = (answer or {}).get("online_paths", {})
    return {str(bdf): str(path) for bdf, path in paths.items()} if isinstance(paths, dict) else {}


def tracker_snapshots(state_dir: Path) -> list[TrackerSnapshot]:
    """A consistent snapshot of every tracker file in ``state_dir``, read without locks
    (the agent may be writing them); raises on a tracker that cannot be trusted."""
    snapshots = []
    for path in list_trackers(state_dir):
        with TrackerReader.open(path) as reader:
            snapshots.append(reader.snapshot())
    return snapshots


def json_status(state_dir: str | Path) -> tuple[dict[str, object], int]:
    """What ``vmem-guest status --json`` prints for ``state_dir`` and its exit status
    (``health.StatusExit``). The test harness calls it in a guest process that is
    already running, to look at the agent without a Python start-up per look."""
    state_dir = Path(state_dir)
    snapshots = tracker_snapshots(state_dir)
    paths = agent_online_paths(state_dir) if snapshots else {}
    document = render.status_document(snapshots, guest_memory(), paths)
    return document, int(health.exit_status(snapshots))
