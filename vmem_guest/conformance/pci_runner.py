"""``vmem-guest fuzz`` on a real virtio-mem PCI function: :func:`fuzz_pci_device`.

Around :func:`~vmem_guest.conformance.run.fuzz`: the device is chosen and
bound to vfio-pci the way the agent does it (:func:`vmem_guest.service.select_devices`,
:func:`~vmem_guest.service.bind_device`), under the device's tracker lock, and
only when nobody uses it: no other vmem-guest process, no in-kernel driver,
no memory block of its region online, nothing plugged. Only raw requests are
sent; nothing is probed or onlined.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from vmem_guest import pci, service, spec
from vmem_guest.conformance.checker import Resize
from vmem_guest.conformance.compare import config_fields
from vmem_guest.conformance.result import FuzzResult
from vmem_guest.conformance.run import DEFAULT_EXAMPLES, DEFAULT_MAX_STEPS, fuzz
from vmem_guest.errors import TrackerLocked, UsageError, VmemError
from vmem_guest.hotplug import SysfsMemory
from vmem_guest.sim.profiles import DeviceProfile
from vmem_guest.spec import RequestType
from vmem_guest.tracker import device_locked
from vmem_guest.transport.channel import PciChannel
from vmem_guest.transport.dma import no_unevictable_compaction
from vmem_guest.transport.function import Access

log = logging.getLogger("vmem_guest.conformance")


@contextlib.contextmanager
def device_lock(state_dir: Path, bdf: str) -> Iterator[None]:
    """Hold the device's tracker lock (the one the agent holds) while fuzzing.

    UsageError when another process (the agent, a manual command) owns the device.
    """
    try:
        with device_locked(state_dir, bdf):
            yield
    except TrackerLocked as exc:
        holder = exc.fields.get("holder_pid") or "?"
        raise UsageError(
            f"device {bdf} is owned by another vmem-guest process (pid {holder}); "
            "stop the agent before fuzzing its device",
            device=bdf,
        ) from None


def fuzz_pci_device(
    bdf: str | None,
    *,
    allow_noiommu: bool,
    state_dir: Path,
    examples: int = DEFAULT_EXAMPLES,
    seed: int | None = None,
    max_steps: int = DEFAULT_MAX_STEPS,
    results_dir: Path | None = None,
    resize: Resize | None = None,
    profile: DeviceProfile | None = None,
) -> FuzzResult:
    """``vmem-guest fuzz``: the engine against a real virtio-mem PCI function.

    ``profile`` None: chosen from the features the device offers.

    ``bdf`` None: the one virtio-mem function there is. ``resize``: how to
    change the device's ``requested_size`` from the host
    (:class:`~vmem_guest.conformance.host_resize.HostResizeFiles` with a
    harness); None: no resizes. Failures and hypothesis's database go to
    ``results_dir`` (default ``state_dir/conformance``).

    Refuses (UsageError) when the device is owned by another vmem-guest process,
    bound to the in-kernel virtio-mem driver, has memory online or anything
    plugged. Binds it to vfio-pci like the agent, raw requests only, nothing
    probed or onlined; UNPLUG_ALL after every example.
    """
    dev = _one_device(bdf)
    results = results_dir or state_dir / "conformance"
    with device_lock(state_dir, dev.bdf):
        _refuse_kernel_driver(dev)
        mode = service.bind_device(dev, allow_noiommu)
        with no_unevictable_compaction(state_dir):
            with PciChannel.open(dev.bdf, mode=mode) as channel:
                cfg = _unused_config(channel, dev.bdf, SysfsMemory())
                log.info("fuzzing %s: %s", dev.bdf, cfg)
                result = fuzz(
                    channel,
                    examples=examples,
                    seed=seed,
                    max_steps=max_steps,
                    resize=resize,
                    database=results / "hypothesis",
                    save_dir=results,
                    profile=profile,
                    offered_features=channel.offered_features,
                )
            result.device = dev.bdf
            if result.lost is not None:
                _unplug_all_after_reset(dev.bdf, mode)
            return result


def _one_device(bdf: str | None) -> pci.VirtioMemPci:
    """The function at ``bdf``, or the only virtio-mem function; UsageError otherwise."""
    found = service.select_devices((bdf,) if bdf is not None else ())
    if len(found) != 1:
        names = ", ".join(d.bdf for d in found)
        raise UsageError(f"choose a device with --device (virtio-mem devices: {names})")
    return found[0]


def _refuse_kernel_driver(dev: pci.VirtioMemPci) -> None:
    owner = dev.virtio_driver()
    if owner is not None:
        raise UsageError(
            f"{dev.bdf} is driven by the in-kernel {owner} driver: it owns the device's "
            "memory; the fuzzer needs a device no driver uses"
        )


def _unused_config(channel: PciChannel, bdf: str, memory: SysfsMemory) -> dict[str, int]:
    """The device's config fields; UsageError when a memory block of its region is
    online."""
    cfg = config_fields(channel.read_config())
    online = memory.online_blocks_in(cfg["addr"], cfg["region_size"])
    if online:
        raise UsageError(
            f"memory blocks {online} of {bdf}'s region are online: the "
            "fuzzer runs only on a device whose memory nobody uses"
        )
    return cfg


def _unplug_all_after_reset(bdf: str, mode: Access) -> None:
    """One more UNPLUG_ALL after a lost device: closing the channel reset it, and a
    reset keeps every block's state (docs/protocol.md section 1, "Device rules")."""
    log.warning("device lost; trying UNPLUG_ALL after a reset")
    with contextlib.suppress(VmemError), PciChannel.open(bdf, mode=mode) as fresh:
        fresh.submit(spec.encode_request(RequestType.UNPLUG_ALL))
