"""Boot memory: what the kernel had before vmem_guest added anything, recorded once per boot.

A device region must lie outside the memory the kernel already manages. A
lying (or misconfigured) device that names boot RAM as its region would have
the driver treat that RAM as device memory: offline it as "online over
unplugged blocks", hand it to UNPLUG requests, count it as plugged. So
:func:`check_region` refuses such a device before anything else is done.

Linux has no sysfs file that tells boot memory from memory added through
``probe`` (both are plain ``memoryN`` blocks), so the first vmem_guest process
of a boot writes down the memory blocks present then, before it probes
anything, and every later process reads that record. The record lives on
``/run`` (tmpfs) and carries the kernel's ``boot_id``, so a record from an
earlier boot is never used. Its path does not follow ``--state-dir``: boot
memory belongs to the boot, and every vmem_guest process of it must see the
same record. If the record is lost in the middle of a boot, the next one also
lists the blocks vmem_guest added: the device is then refused (safe, and said
in the error) until the guest reboots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

from vmem_guest.device import DeviceConfig
from vmem_guest.errors import ConfigError
from vmem_guest.hotplug import KernelMemory

#: Where the record lives: beside the trackers, on tmpfs.
RECORD = Path("/run/vmem-guest/boot-memory")

log = logging.getLogger("vmem_guest.bootmem")


@dataclasses.dataclass(frozen=True)
class BootMemory:
    """Physical ranges ``[start, end)`` that were present memory at the first attach of a boot."""

    boot_id: str
    ranges: tuple[tuple[int, int], ...]

    @classmethod
    def from_blocks(cls, boot_id: str, blocks: list[int], block_size: int) -> BootMemory:
        """Coalesce sorted memory block indices into byte ranges."""
        ranges: list[tuple[int, int]] = []
        for index in blocks:
            start, end = index * block_size, (index + 1) * block_size
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        return cls(boot_id, tuple(ranges))

    def overlap(self, start: int, end: int) -> tuple[int, int] | None:
        """The first recorded range that overlaps ``[start, end)``, if any."""
        for low, high in self.ranges:
            if low < end and start < high:
                return (low, high)
        return None

    def to_json(self) -> str:
        return json.dumps({"boot_id": self.boot_id, "ranges": [list(r) for r in self.ranges]})

    @classmethod
    def from_json(cls, text: str) -> BootMemory:
        """Parse a record; ValueError if it is not one."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("boot_id"), str):
            raise ValueError("not a boot memory record")
        ranges = data.get("ranges")
        if not isinstance(ranges, list):
            raise ValueError("boot memory record without ranges")
        parsed: list[tuple[int, int]] = []
        for item in ranges:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
                or not 0 <= item[0] < item[1]
            ):
                raise ValueError(f"bad range {item!r} in the boot memory record")
            parsed.append((item[0], item[1]))
        return cls(data["boot_id"], tuple(parsed))


def _read(path: Path) -> BootMemory | None:
    try:
        return BootMemory.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("boot memory record %s unusable (%s): recording again", path, exc)
        return None


def _publish(path: Path, record: BootMemory) -> BootMemory:
    """Write ``record`` unless another process has just written this boot's; return the winner."""
    # 0755 like the state directory the control socket and trackers share: status
    # for non-root users reads the trackers; the record itself is root's.
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(record.to_json())
    try:
        try:
            os.link(tmp, path)  # fails if the file exists: the first recorder wins
        except FileExistsError:
            current = _read(path)
            if current is not None and current.boot_id == record.boot_id:
                return current
            os.replace(tmp, path)  # a stale or broken record: ours replaces it
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return record


def load_or_record(kernel: KernelMemory, path: Path = RECORD) -> BootMemory:
    """This boot's record; written now, from the present blocks, if there is none yet.

    Call it before probing anything: the first call of a boot defines boot memory.
    """
    boot_id = kernel.boot_id()
    current = _read(path)
    if current is not None and current.boot_id == boot_id:
        return current
    record = BootMemory.from_blocks(boot_id, kernel.present_blocks(), kernel.block_size())
    log.info("recording boot memory: %s", ", ".join(f"{a:#x}-{b:#x}" for a, b in record.ranges))
    return _publish(path, record)


def check_region(config: DeviceConfig, boot: BootMemory, path: Path = RECORD) -> None:
    """ConfigError if the device region overlaps boot memory."""
    hit = boot.overlap(config.addr, config.end)
    if hit is None:
        return
    raise ConfigError(
        f"device region {config.addr:#x}-{config.end:#x} overlaps boot memory"
        f" {hit[0]:#x}-{hit[1]:#x} (as recorded in {path} at the first start of this boot)",
        addr=config.addr,
        region_size=config.region_size,
        boot_start=hit[0],
        boot_end=hit[1],
    )
