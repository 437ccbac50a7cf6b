"""What ``vmem-guest status`` reads beside the tracker files: the guest's memory
figures and the running agent's online paths.

Kept apart from ``service`` so that a one-shot ``status`` imports neither the agent
nor VFIO: in a TCG guest every module imported costs a visible share of a second.
"""

from __future__ import annotations

from pathlib import Path

from vmem_guest import control, render
from vmem_guest._linux.procfs import memtotal_bytes
from vmem_guest.errors import VmemError
from vmem_guest.pages import ProcPages

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
