"""Turn snapshots and reports into tables and JSON-ready dicts (no I/O)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from vmem_guest.blocks import MemoryBlockState, Zone
from vmem_guest.tracker import TrackerSnapshot
from vmem_guest.units import format_size

#: One character per memory block in the status map.
BLOCK_GLYPHS = {
    MemoryBlockState.UNPLUGGED: ".",
    MemoryBlockState.PARTIAL: "~",
    MemoryBlockState.PLUGGED: "+",
    MemoryBlockState.ONLINE: "#",
}
MAP_LEGEND = "map: . unplugged  ~ partly plugged  + plugged, not online  # online"
MAP_WIDTH = 64


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain text table, columns right-aligned except the first."""
    cells = [list(map(str, headers))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest]).rstrip()

    return "\n".join(line(row) for row in cells)


def snapshot_dict(snap: TrackerSnapshot) -> dict[str, object]:
    """The JSON form of ``vmem-guest status --json`` for one device."""
    geometry = snap.identity.geometry
    return {
        "device": snap.identity.name,
        "addr": geometry.addr,
        "region_size": geometry.region_size,
        "block_size": geometry.block_size,
        "memory_block_size": geometry.memory_block_size,
        "big_block_mode": geometry.big_block_mode,
        "node_id": snap.node_id,
        "requested_size": snap.requested_size,
        "usable_region_size": snap.usable_region_size,
        "plugged_size": snap.plugged_bytes,
        "online_size": snap.online_bytes,
        "remainder": snap.remainder_bytes,
        "broken": snap.broken,
        "broken_reason": snap.broken_reason or None,
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


def block_map(snap: TrackerSnapshot) -> list[str]:
    """The compact per-memory-block map, one line per MAP_WIDTH blocks, with addresses."""
    geometry = snap.identity.geometry
    glyphs = "".join(BLOCK_GLYPHS[rec.state] for rec in snap.blocks)
    lines = []
    for offset in range(0, len(glyphs), MAP_WIDTH):
        first = snap.blocks[offset].index
        lines.append(
            f"  {geometry.memory_block_addr(first):#014x} {glyphs[offset : offset + MAP_WIDTH]}"
        )
    return lines


def snapshot_text(snap: TrackerSnapshot) -> str:
    """The human form of ``vmem-guest status`` for one device."""
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
    ]
    if snap.intent is not None:
        lines.append(
            f"  in flight: {snap.intent.op.name} {snap.intent.addr:#x} x{snap.intent.nb_blocks}"
        )
    return "\n".join([*lines, *block_map(snap), "  " + MAP_LEGEND])
