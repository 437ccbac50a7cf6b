"""Turn snapshots and reports into tables and JSON-ready dicts (no I/O)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from vmem_guest import health
from vmem_guest.blocks import MemoryBlockState, Zone
from vmem_guest.device import Binding
from vmem_guest.spec import Feature
from vmem_guest.tracker import TrackerSnapshot
from vmem_guest.units import format_size

#: One character per memory block in the status map.
BLOCK_GLYPHS = {
    MemoryBlockState.UNPLUGGED: ".",
    MemoryBlockState.PARTIAL: "~",
    MemoryBlockState.PLUGGED: "+",
    MemoryBlockState.ONLINE: "#",
}
#: An online block with subblocks taken out of use.
HOLED_GLYPH = "%"
MAP_LEGEND = (
    "map: . unplugged  ~ partly plugged  + plugged, not online  # online  % online with holes"
)
MAP_WIDTH = 64
#: One character per subblock of an online block with holes.
SUBBLOCK_GLYPHS = {(True, False): "#", (True, True): "o", (False, True): "."}
SUBBLOCK_LEGEND = (
    "subblocks: # in use  . hole (unplugged, pages poisoned)  o being taken/given back"
)


@dataclasses.dataclass(frozen=True)
class GuestMemory:
    """System-wide figures shown beside the devices (from /proc/meminfo, in bytes)."""

    mem_total: int
    hardware_corrupted: int | None


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain text table, columns right-aligned except the first."""
    cells = [list(map(str, headers))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join(line(row) for row in cells)


def holed_blocks(snap: TrackerSnapshot) -> list[int]:
    """Online blocks with any subblock taken out of use (or being taken)."""
    geometry = snap.identity.geometry
    return [
        rec.index
        for rec in snap.blocks
        if rec.state is MemoryBlockState.ONLINE
        and any(snap.is_taken(sb) for sb in geometry.subblocks_of(rec.index))
    ]


def subblock_map(snap: TrackerSnapshot, index: int) -> str:
    """One glyph per subblock of online block ``index`` (SUBBLOCK_GLYPHS)."""
    subblocks = snap.identity.geometry.subblocks_of(index)
    return "".join(
        SUBBLOCK_GLYPHS.get((snap.is_plugged(sb), snap.is_taken(sb)), "?") for sb in subblocks
    )


#: ``schema`` of the ``vmem-guest status --json`` object: raised when a field changes
#: meaning or goes away (docs/status-json.md); new fields keep it.
STATUS_SCHEMA = 1


def status_document(
    snapshots: Sequence[TrackerSnapshot],
    guest: GuestMemory,
    online_paths: Mapping[str, str] | None = None,
) -> dict[str, object]:
    """The object ``vmem-guest status --json`` prints (docs/status-json.md);
    ``online_paths``: the running agent's answer, by device (empty: none answered)."""
    paths = online_paths or {}
    return {
        "schema": STATUS_SCHEMA,
        "status": health.exit_status(snapshots).name.lower(),
        "devices": [snapshot_dict(snap, paths.get(snap.identity.name)) for snap in snapshots],
        "guest": {"mem_total": guest.mem_total, "hardware_corrupted": guest.hardware_corrupted},
    }


def snapshot_dict(snap: TrackerSnapshot, online_path: str | None = None) -> dict[str, object]:
    """One device of ``vmem-guest status --json`` (docs/status-json.md); ``online_path``:
    how the running agent onlines its new blocks (None: no agent answered)."""
    geometry = snap.identity.geometry
    return {
        "device": snap.identity.name,
        "addr": geometry.addr,
        "region_size": geometry.region_size,
        "block_size": geometry.block_size,
        "memory_block_size": geometry.memory_block_size,
        "big_block_mode": geometry.big_block_mode,
        "node_id": snap.node_id,
        "interrupts": snap.interrupt_mode.text,
        "binding": snap.binding.text,
        "device_features": feature_names(snap.device_features),
        "online_path": online_path,
        "requested_size": snap.requested_size,
        "usable_region_size": snap.usable_region_size,
        "plugged_size": snap.plugged_bytes,
        "online_size": snap.online_bytes,
        "remainder": snap.remainder_bytes,
        "hole_bytes": snap.hole_bytes,
        "holed_blocks": [
            {"index": index, "subblocks": subblock_map(snap, index)} for index in holed_blocks(snap)
        ],
        "broken": snap.broken,
        "broken_reason": snap.broken_reason or None,
        "converged": health.converged(snap),
        "not_converged": health.not_converged(snap),
        "owner_pid": snap.owner_pid,
        "generation": snap.generation,
        "requests": snap.requests,
        "retries": snap.retries,
        "intent": None
        if snap.intent is None
        else {
            "op": snap.intent.op.name,
            "addr": snap.intent.addr,
            "nb_blocks": snap.intent.nb_blocks,
        },
        "blocks": {state.name.lower(): count for state, count in snap.state_counts().items()},
        "online_blocks": [
            {"index": rec.index, "zone": Zone(rec.zone).name.lower(), "node": rec.node}
            for rec in snap.blocks
            if rec.state is MemoryBlockState.ONLINE
        ],
    }


def feature_names(device_features: int) -> list[str]:
    """The names of the virtio-mem feature bits set in ``device_features`` (spec 5.15.3);
    an unknown bit as ``bit N``."""
    names = []
    for bit in range(device_features.bit_length()):
        if device_features >> bit & 1:
            try:
                names.append(Feature(bit).name)
            except ValueError:
                names.append(f"bit {bit}")
    return names


def block_map(snap: TrackerSnapshot) -> list[str]:
    """The compact per-memory-block map, one line per MAP_WIDTH blocks, with addresses."""
    geometry = snap.identity.geometry
    holed = set(holed_blocks(snap))
    glyphs = "".join(
        HOLED_GLYPH if rec.index in holed else BLOCK_GLYPHS[rec.state] for rec in snap.blocks
    )
    lines = []
    for offset in range(0, len(glyphs), MAP_WIDTH):
        first = snap.blocks[offset].index
        lines.append(
            f"  {geometry.memory_block_addr(first):#014x} {glyphs[offset : offset + MAP_WIDTH]}"
        )
    return lines


def _binding_words(snap: TrackerSnapshot) -> str:
    """``vfio noiommu, `` before the interrupts; nothing for the model (its interrupts
    say it) or a tracker that predates the field."""
    if snap.binding in (Binding.UNKNOWN, Binding.MODEL):
        return ""
    return f"{snap.binding.text}, "


def snapshot_text(
    snap: TrackerSnapshot, guest: GuestMemory | None = None, online_path: str | None = None
) -> str:
    """The human form of ``vmem-guest status`` for one device (``online_path``: as in
    :func:`snapshot_dict`)."""
    geometry = snap.identity.geometry
    mode = "big block mode" if geometry.big_block_mode else "sub block mode"
    counts = ", ".join(
        f"{count} {state.name.lower()}" for state, count in snap.state_counts().items()
    )
    status = f"BROKEN: {snap.broken_reason}" if snap.broken else "ok"
    lines = [
        f"{snap.identity.name}: {status}, region {geometry.addr:#x}"
        f"+{format_size(geometry.region_size)}, block {format_size(geometry.block_size)}"
        f", memory block {format_size(geometry.memory_block_size)} ({mode}), node {snap.node_id}",
        f"  requested {format_size(snap.requested_size)}, plugged {format_size(snap.plugged_bytes)}"
        f", online {format_size(snap.online_bytes)}, usable {format_size(snap.usable_region_size)}"
        f", remainder {format_size(snap.remainder_bytes)}",
        f"  memory blocks: {counts}",
        f"  {_binding_words(snap)}{snap.interrupt_mode.text} interrupts, features:"
        f" {', '.join(feature_names(snap.device_features)) or 'none'}",
    ]
    if online_path:
        lines.append(f"  new memory blocks: {online_path}")
    reasons = health.not_converged(snap)
    if reasons and not snap.broken:
        lines.append(f"  not converged: {'; '.join(reasons)}")
    if snap.intent is not None:
        lines.append(
            f"  in flight: {snap.intent.op.name} {snap.intent.addr:#x} x{snap.intent.nb_blocks}"
        )
    lines += _holes_text(snap, guest)
    return "\n".join([*lines, *block_map(snap), "  " + MAP_LEGEND])


def _holes_text(snap: TrackerSnapshot, guest: GuestMemory | None) -> list[str]:
    holed = holed_blocks(snap)
    if not holed:
        return []
    lines = [f"  unplugged inside online blocks: {format_size(snap.hole_bytes)}"]
    if guest is not None and guest.hardware_corrupted is not None:
        lines.append(
            f"  guest MemTotal {format_size(guest.mem_total)} (holes still count in it),"
            f" HardwareCorrupted {format_size(guest.hardware_corrupted)} (their poisoned pages)"
        )
    lines += [f"  memory{index} {subblock_map(snap, index)}" for index in holed]
    return [*lines, "  " + SUBBLOCK_LEGEND]
