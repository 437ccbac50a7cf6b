"""Manual plug/unplug/state/unplug-all, keeping every invariant of the automatic path.

Used by ``vmem-guest plug|unplug|state|unplug-all``, through the agent's
control socket when an agent runs in ``--manual`` mode, or directly (holding
the tracker lock) when none runs. This module checks and chooses (which units,
in which order, with progress); the device and the kernel are touched only through
the driver's manual API (:meth:`DeviceDriver.plug_unit`, ``release_unit``,
``manual_request``, ``unplug_everything``), which keeps the rules of
docs/design.md section 2:

* only whole units are plugged (every memory block that gets plugged is onlined);
* a block is offlined before any of its subblocks is unplugged; when the kernel
  refuses, blocks this operation offlined are onlined again, so nothing plugged
  is left unused, and the error names the block and the errno;
* BUSY is retried with a bounded backoff; NACK and ERROR are reported.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from vmem_guest import control, planner
from vmem_guest.blocks import Zone
from vmem_guest.driver import DeviceDriver
from vmem_guest.errors import OfflineRefused, UsageError
from vmem_guest.spec import MAX_BLOCKS_PER_REQUEST, BlockState, RequestType
from vmem_guest.tracker import UnitClass
from vmem_guest.units import format_size

#: Called with (bytes done, bytes in total) as an operation advances.
Progress = Callable[[int, int], None]


def _no_progress(done: int, total: int) -> None:
    """The default progress sink."""


@dataclasses.dataclass(frozen=True)
class ManualResult:
    """What a manual operation did (sizes in bytes)."""

    op: str
    addr: int
    size: int
    plugged_size: int
    online_size: int

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class ManualOps:
    """Explicit operations on one device, through its :class:`DeviceDriver`."""

    def __init__(
        self,
        driver: DeviceDriver,
        *,
        sleep: Callable[[float], None] = time.sleep,
        progress: Progress = _no_progress,
    ) -> None:
        self.driver = driver
        self.geometry = driver.geometry
        self.layout = planner.layout_of(driver.geometry)
        self.sleep = sleep
        self.progress = progress

    # --- checks ---------------------------------------------------------------

    def _units_in(self, addr: int, size: int) -> list[planner.Unit]:
        """The units exactly covering [addr, addr + size); UsageError otherwise."""
        unit_bytes = self.layout.unit_bytes
        if size <= 0 or size % unit_bytes or addr % unit_bytes:
            raise UsageError(
                f"range {addr:#x}+{format_size(size)} is not whole units of"
                f" {format_size(unit_bytes)} (memory blocks are plugged and onlined whole)",
                addr=addr,
                size=size,
            )
        end = addr + size
        units = [
            unit
            for unit in self.layout.units
            if addr <= self.geometry.subblock_addr(unit.subblocks.start) < end
        ]
        if len(units) * unit_bytes != size:
            raise UsageError(
                f"range {addr:#x}+{format_size(size)} is outside the device region"
                f" {self.geometry.addr:#x}+{format_size(self.geometry.region_size)}",
                addr=addr,
                size=size,
            )
        return units

    def _plugged(self, unit: planner.Unit) -> int:
        return len(self.driver.tracker.state.plugged_in(unit.subblocks))

    def _result(self, op: str, addr: int, size: int) -> ManualResult:
        state = self.driver.tracker.state
        return ManualResult(op, addr, size, state.plugged_bytes, state.online_bytes)

    # --- operations -----------------------------------------------------------

    def plug_range(self, addr: int, size: int, zone: Zone = Zone.MOVABLE) -> ManualResult:
        """Plug and online exactly [addr, addr + size): whole, unplugged units."""
        units = self._units_in(addr, size)
        busy = [u for u in units if self._plugged(u)]
        if busy:
            first = self.geometry.subblock_addr(busy[0].subblocks.start)
            raise UsageError(f"{first:#x} is already plugged", addr=first)
        usable_end = self.driver.refresh_config().usable_end
        if addr + size > usable_end:
            raise UsageError(
                f"range ends beyond the usable region ({usable_end:#x}): the host must"
                " request more first",
                usable_end=usable_end,
            )
        done = 0
        for unit in units:
            self.driver.plug_unit(unit, zone, self.sleep)
            done += self.layout.unit_bytes
            self.progress(done, size)
        return self._result("plug", addr, size)

    def plug_size(self, size: int, zone: Zone = Zone.MOVABLE) -> ManualResult:
        """Plug and online ``size`` bytes in the lowest unplugged units."""
        self._check_size(size)
        usable_end = self.driver.refresh_config().usable_end
        state = self.driver.tracker.state
        usable_units = state.grid.units_ending_by(self.geometry.subblock_index(usable_end))
        free = [
            state.unit(index)
            for index in state.units(UnitClass.EMPTY).ascending()
            if index < usable_units
        ]
        wanted = size // self.layout.unit_bytes
        if len(free) < wanted:
            raise UsageError(
                f"only {format_size(len(free) * self.layout.unit_bytes)} can be plugged"
                " in the usable region",
                available=len(free) * self.layout.unit_bytes,
            )
        for done, unit in enumerate(free[:wanted], 1):
            self.driver.plug_unit(unit, zone, self.sleep)
            self.progress(done * self.layout.unit_bytes, size)
        return self._result("plug", self.geometry.subblock_addr(free[0].subblocks.start), size)

    def _check_size(self, size: int) -> None:
        if size <= 0 or size % self.layout.unit_bytes:
            raise UsageError(
                f"size {format_size(size)} is not a positive multiple of"
                f" {format_size(self.layout.unit_bytes)}",
                size=size,
            )

    def unplug_range(self, addr: int, size: int) -> ManualResult:
        """Offline and unplug exactly [addr, addr + size)."""
        units = self._units_in(addr, size)
        done = 0
        for unit in units:
            self.driver.release_unit(unit, self.sleep)
            done += self.layout.unit_bytes
            self.progress(done, size)
        return self._result("unplug", addr, size)

    def unplug_size(self, size: int) -> ManualResult:
        """Unplug ``size`` bytes, highest units first, skipping blocks that refuse to offline."""
        self._check_size(size)
        order = planner.shrink_order(self.driver.plan_input())
        wanted = size // self.layout.unit_bytes
        if len(order) < wanted:
            raise UsageError(
                f"only {format_size(len(order) * self.layout.unit_bytes)} is plugged",
                plugged=len(order) * self.layout.unit_bytes,
            )
        released = 0
        refusals: list[OfflineRefused] = []
        for unit in order:
            if released == wanted:
                break
            try:
                self.driver.release_unit(unit, self.sleep)
            except OfflineRefused as exc:
                refusals.append(exc)
                continue
            released += 1
            self.progress(released * self.layout.unit_bytes, size)
        if released < wanted:
            last = refusals[-1]
            raise OfflineRefused(
                "offline",
                last.block,
                last.errno,
                f"unplugged {format_size(released * self.layout.unit_bytes)} of"
                f" {format_size(size)}; refused: "
                + ", ".join(f"memory{exc.block}" for exc in refusals),
            )
        return self._result("unplug", 0, size)

    def state(self, addr: int, nb_blocks: int) -> BlockState:
        """STATE of ``nb_blocks`` device blocks from ``addr`` (read-only)."""
        if addr % self.geometry.block_size or not 0 < nb_blocks <= MAX_BLOCKS_PER_REQUEST:
            raise UsageError(
                f"STATE needs a block-aligned address and 1..{MAX_BLOCKS_PER_REQUEST} blocks",
                addr=addr,
                nb_blocks=nb_blocks,
            )
        config = self.driver.refresh_config()
        end = addr + nb_blocks * self.geometry.block_size
        if addr < config.addr or end > config.usable_end:
            # The device answers ERROR outside the usable region (spec 5.15.6.6.2).
            raise UsageError(
                f"{addr:#x}+{nb_blocks} blocks is outside the usable region"
                f" {config.addr:#x}-{config.usable_end:#x}",
                addr=addr,
            )
        response = self.driver.manual_request(RequestType.STATE, addr, nb_blocks, self.sleep)
        assert response.state is not None  # parse_response guarantees it for an ACKed STATE
        return response.state

    def unplug_all(self) -> ManualResult:
        """Offline every online block of the device (all or none), then UNPLUG_ALL."""
        self.driver.unplug_everything(self.sleep)
        return self._result("unplug-all", self.geometry.addr, self.geometry.region_size)


def perform(
    driver: DeviceDriver, operation: control.DeviceOperation, emit: control.Emit
) -> dict[str, Any]:
    """Run one manual operation on ``driver``'s device: the one place each is handled
    (the agent's socket and the direct path both come here)."""
    ops = ManualOps(driver, progress=lambda done, total: emit({"done": done, "total": total}))
    if isinstance(operation, control.QueryState):
        return {"state": ops.state(operation.addr, operation.blocks).name}
    if isinstance(operation, control.UnplugAll):
        return ops.unplug_all().as_dict()
    if isinstance(operation, control.Plug):
        return _plug(ops, driver, operation).as_dict()
    return _unplug(ops, driver, operation.extent).as_dict()


def _plug(ops: ManualOps, driver: DeviceDriver, operation: control.Plug) -> ManualResult:
    extent = operation.extent
    if extent.size is not None:
        return ops.plug_size(extent.size, operation.zone)
    addr, size = _range_of(driver, extent)
    return ops.plug_range(addr, size, operation.zone)


def _unplug(ops: ManualOps, driver: DeviceDriver, extent: control.Extent) -> ManualResult:
    if extent.size is not None:
        return ops.unplug_size(extent.size)
    return ops.unplug_range(*_range_of(driver, extent))


def _range_of(driver: DeviceDriver, extent: control.Extent) -> tuple[int, int]:
    """(addr, size in bytes) of an extent given as device blocks."""
    if extent.addr is None or extent.blocks is None:
        raise UsageError("a range needs both addr and blocks")
    return extent.addr, extent.blocks * driver.geometry.block_size
