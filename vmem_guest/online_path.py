"""How a device's new memory blocks get online, and the kernel setting that decides it.

Linux adds a probed block offline unless ``auto_online_blocks``
(``/sys/devices/system/memory/auto_online_blocks``, writable at run time:
``drivers/base/memory.c`` ``auto_online_blocks_store``) names an online type; then
``add_memory_resource`` (``mm/memory_hotplug.c``) onlines it inside the same
``probe`` write, as it does inside the in-kernel driver's ``add_memory``. The
default is ``offline`` (``CONFIG_MEMORY_HOTPLUG_DEFAULT_ONLINE`` unset, Debian's
6.1 and 6.12) unless the guest booted with ``memhp_default_state=``. So a guest set
up as the README says would pay a second write per block (``memoryN/state``), and
with it a second ``mem_hotplug_begin()``; the agent therefore holds the setting at
its policy's online type while it serves (:func:`auto_online_while_serving`), and
any other memory hot-added meanwhile (ACPI DIMMs, dax/kmem) is onlined alike
(docs/online-path.md).

:func:`describe` names the path a device takes (the log and ``vmem-guest status``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from vmem_guest import planner
from vmem_guest.blocks import Zone
from vmem_guest.hotplug import SYSFS_MEMORY
from vmem_guest.kernel_setting import changed_setting

AUTO_ONLINE_BLOCKS = SYSFS_MEMORY / "auto_online_blocks"
#: What ``auto_online_blocks`` does with a new block (memory-hotplug.rst); any
#: other word ("online": the kernel picks the zone) means AUTO.
AUTO_ONLINE_ZONES: dict[str, Zone | None] = {
    "offline": None,
    "online_movable": Zone.MOVABLE,
    "online_kernel": Zone.KERNEL,
}

log = logging.getLogger(__name__)


def planned_zone(policy: planner.Policy) -> Zone:
    """The zone most of the policy's blocks go to: ``auto`` onlines movable up to its
    ratio of kernel memory (planner ``_zone_for``), so movable is its common case."""
    return Zone.KERNEL if policy.online is planner.OnlinePolicy.KERNEL else Zone.MOVABLE


def auto_online_word(policy: planner.Policy) -> str:
    """The ``auto_online_blocks`` value the agent holds while it serves."""
    return planned_zone(policy).sysfs_word


@contextlib.contextmanager
def auto_online_while_serving(
    policy: planner.Policy, state_dir: Path, path: Path = AUTO_ONLINE_BLOCKS
) -> Iterator[bool]:
    """Hold ``auto_online_blocks`` at the policy's online type while the block runs; the
    original comes back on exit, after a SIGKILL at the next start
    (:func:`~vmem_guest.kernel_setting.changed_setting`). Yields False when it cannot
    be set: the agent then probes and onlines with two writes per block."""
    with changed_setting(path, auto_online_word(policy), state_dir, log) as applied:
        yield applied


def describe(auto_online: str, planned: Zone) -> str:
    """The path a new block takes with ``auto_online_blocks`` = ``auto_online`` when the
    driver plans it into ``planned`` (driver ``_online_block``)."""
    landed = AUTO_ONLINE_ZONES.get(auto_online, Zone.AUTO)
    target = planned.sysfs_word
    if landed is None:
        return f"probe then online ({target}): two writes per block"
    if landed is planned:
        return f"auto-online {target} via probe: one write per block"
    if landed is Zone.AUTO:
        return (
            f"probe auto-onlines ({auto_online}) into the kernel's zone; a block not in"
            f" {planned.name} is offlined and onlined ({target}) again"
        )
    return (
        f"probe auto-onlines ({auto_online}), then offline and online ({target}):"
        " three writes per block"
    )
