"""Named device profiles: what distinguishes one virtio-mem implementation from another.

A profile is data: the model's rules (:class:`~vmem_guest.sim.rules.ModelRules`,
what a driver sees through requests and config reads), what the device offers
and requires at negotiation, which block sizes it accepts, and for every value
that differs from QEMU 10.0 the source line it was read from
(:attr:`DeviceProfile.sources`). docs/device-profiles.md is the table of all of
them, with the virtio specification's word on each row.

QEMU 7.2 and 10.0 (qemu/qemu ``hw/virtio/virtio-mem.c``) share their request
rules (``virtio_mem_valid_range``, ``virtio_mem_state_change_request``,
``virtio_mem_state_request``); they differ in:

* ``virtio_mem_unplug_all`` with nothing plugged: up to 8.0 the "migration running ->
  BUSY" check comes first, so it can answer BUSY; from 8.1 it always ACKs.
* The device-type feature bits offered by default (``virtio_mem_get_features``) for a
  plain ``memory-backend-ram`` on q35: 7.2 leaves ``unplugged-inaccessible`` off for
  it; 10.0 turns it on by default and offers VIRTIO_MEM_F_PERSISTENT_SUSPEND on
  pc/q35. ACPI_PXM depends on the VM having NUMA nodes, not on the version, so it is
  not part of a QEMU profile.
* MSI-X: ``virtio-mem-pci`` has no ``vectors`` in 7.2 (INTx only); 10.0 gives it two.
* S3 wake-up: 7.2 unplugs everything (``virtio_mem_system_reset`` runs); 10.0 skips
  the unplug on ``RESET_TYPE_WAKEUP`` and keeps every block's state.

The other implementations were read, not run (none runs here without KVM), each at
a pinned commit: :data:`CLOUD_HYPERVISOR` (and :data:`CLOUD_HYPERVISOR_51`, its
v51.0 release, before the fixes of May 2026), :data:`FIRECRACKER`,
:data:`STRATOVIRT`.

The conformance fuzzer picks a QEMU profile from what the device offers
(:func:`profile_for_offer`; the offer cannot tell the other VMMs apart) or takes one
by name (``vmem-guest fuzz --profile``), builds its model from it, and reports
offered features that differ from it. ``vmem-guest fuzz --profile P --device-model Q``
runs the model of one profile against the model of another
(:mod:`vmem_guest.conformance.crossmodel`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from vmem_guest.sim.device_model import DeviceModel
from vmem_guest.sim.rules import QEMU_RULES, ModelRules
from vmem_guest.spec import Feature, RequestType, ResponseType

#: The feature bits a profile speaks for (ACPI_PXM follows the VM's NUMA set-up).
PROFILED_FEATURES = (1 << Feature.UNPLUGGED_INACCESSIBLE) | (1 << Feature.PERSISTENT_SUSPEND)

MiB = 1 << 20

#: Where each implementation was read (repository @ commit).
QEMU_SOURCE = "qemu/qemu@228957fea3a998735524abf6354634f1fb710e61 hw/virtio/virtio-mem.c"
CH_SOURCE = (
    "cloud-hypervisor/cloud-hypervisor@ae44c2971c83dd2b1bd704fa81102ec0dec4e7d4"
    " virtio-devices/src/mem.rs"
)
CH51_SOURCE = (
    "cloud-hypervisor/cloud-hypervisor@00e106e53e7ba48b01f194f7887b20b9a0bfb905 (v51.0)"
    " virtio-devices/src/mem.rs"
)
FC_SOURCE = (
    "firecracker-microvm/firecracker@81b38b9dad6056d7a48073e95ac5a9aed51cb2ab"
    " src/vmm/src/devices/virtio/mem/device.rs"
)
SV_SOURCE = (
    "openeuler-mirror/stratovirt@d5b320371f25a7198c7b09cf26b27b7c2cfa4e5c"
    " virtio/src/device/memory.rs"
)


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """One implementation's virtio-mem device, as far as a driver can tell them apart.

    ``rules`` are what requests and config reads show (the model's switches);
    the other fields are what negotiation and configuration show. ``sources``
    maps a field name (a ``rules`` field or one of these) to the source line it
    was read from, for every value that differs from ``qemu-10.0``.
    """

    name: str
    busy_unplug_all_when_empty: bool
    #: Of :data:`PROFILED_FEATURES`, the bits offered by default.
    default_features: int
    msix_vectors: int
    keeps_blocks_on_wakeup: bool
    rules: ModelRules = QEMU_RULES
    #: Where the implementation was read (repository@commit path).
    source: str = QEMU_SOURCE
    #: Device-type feature bits the device refuses to activate without (FEATURES_OK
    #: or DRIVER_OK fails when the driver does not accept them).
    required_features: int = 0
    #: When ACPI_PXM is offered: ``numa`` (when the VM gives the device a node) or ``never``.
    acpi_pxm: str = "numa"
    #: Which ``block_size`` values the device can be configured with, in words, and
    #: as numbers: at least ``min_block_size``, at most ``max_block_size`` (None: no
    #: limit), a multiple of ``block_size_granule``, and a power of two if so marked.
    block_sizes: str = "a power of two, at least 1 MiB and the backend's page size"
    min_block_size: int = MiB
    max_block_size: int | None = None
    block_size_granule: int = MiB
    block_size_power_of_two: bool = True
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def model(self, **geometry: Any) -> DeviceModel:
        """A :class:`DeviceModel` with this profile's rules (a ``model_factory``)."""
        rules = dataclasses.replace(
            self.rules, busy_unplug_all_when_empty=self.busy_unplug_all_when_empty
        )
        return DeviceModel(rules=rules, **geometry)

    def accepts_block_size(self, block_size: int) -> bool:
        """Whether this device can be configured with ``block_size`` (bytes)."""
        if block_size < self.min_block_size or block_size % self.block_size_granule:
            return False
        if self.max_block_size is not None and block_size > self.max_block_size:
            return False
        return not self.block_size_power_of_two or not block_size & (block_size - 1)

    def feature_differences(self, offered: int) -> list[str]:
        """What of ``offered`` (the device's feature word) this profile did not expect."""
        differences = []
        for feature in (Feature.UNPLUGGED_INACCESSIBLE, Feature.PERSISTENT_SUSPEND):
            bit = 1 << feature
            expected, seen = bool(self.default_features & bit), bool(offered & bit)
            if expected != seen:
                differences.append(
                    f"{feature.name} {'offered' if seen else 'not offered'}; profile"
                    f" {self.name} {'offers' if expected else 'does not offer'} it"
                )
        return differences


QEMU_7_2 = DeviceProfile(
    name="qemu-7.2",
    busy_unplug_all_when_empty=True,
    default_features=0,
    msix_vectors=0,
    keeps_blocks_on_wakeup=False,
    source="qemu/qemu v7.2.0 hw/virtio/virtio-mem.c",
    sources={
        "default_features": "virtio_mem_get_features (unplugged-inaccessible off by default)",
        "busy_unplug_all_when_empty": "virtio_mem_unplug_all (the migration BUSY check"
        " before the plugged test, until 8.1)",
    },
)
QEMU_10_0 = DeviceProfile(
    name="qemu-10.0",
    busy_unplug_all_when_empty=False,
    default_features=PROFILED_FEATURES,
    msix_vectors=2,
    keeps_blocks_on_wakeup=True,
    # virtio_mem_unplug_all: the BUSY check only with memory plugged (QEMU 8.1 on).
    rules=ModelRules(busy_unplug_all_when_empty=False),
)

#: Cloud Hypervisor, newest read (after "virtio-devices: mem: Use usize for block
#: counts in internal bitmap APIs", dfee31a84, and the parse-error fixes of May 2026).
CLOUD_HYPERVISOR = DeviceProfile(
    name="cloud-hypervisor",
    busy_unplug_all_when_empty=False,
    default_features=0,
    msix_vectors=2,
    keeps_blocks_on_wakeup=True,
    source=CH_SOURCE,
    rules=ModelRules(
        requested_check_first=True,  # mem.rs:501-506: NACK checked before is_valid_range
        usable_policy="region",  # mem.rs:785: usable_region_size = region.len(), never changed
        busy_requests=frozenset(),  # mem.rs:72-73: VIRTIO_MEM_RESP_BUSY is dead code
        busy_unplug_all_when_empty=False,
        short_request="empty",  # mem.rs:283-285, 638-647: used with length 0
        unknown_request="error",  # mem.rs:660-663: answered ERROR
        resize_same_refused=True,  # mem.rs:225-228: "new size ... identical" refused
    ),
    acpi_pxm="numa",
    block_sizes="2 MiB only",
    min_block_size=2 * MiB,
    max_block_size=2 * MiB,
    sources={
        "requested_check_first": "mem.rs:501-506",
        "usable_policy": "mem.rs:785 (usable_region_size: region.len()); resize 224-246"
        " and unplug_all 561-596 leave it",
        "busy_requests": "mem.rs:72-73 (BUSY unused); discard failure answers ERROR 519-522,"
        " 563-566",
        "short_request": "mem.rs:283-285 (InvalidRequest), 638-647 (add_used length 0)",
        "unknown_request": "mem.rs:660-663",
        "resize_same_refused": "mem.rs:225-228",
        "default_features": "mem.rs:779-802 (VERSION_1; ACPI_PXM with a NUMA node)",
        "block_sizes": "mem.rs:55, 782 (VIRTIO_MEM_DEFAULT_BLOCK_SIZE)",
        "reset": "mem.rs:1005-1008 (common reset only: blocks kept)",
    },
)

#: Cloud Hypervisor v51.0 (February 2026): UNPLUG_ALL clears ``(nr_blocks as u16)``
#: bitmap entries; a request it cannot parse or of an unknown type ends the worker.
CLOUD_HYPERVISOR_51 = dataclasses.replace(
    CLOUD_HYPERVISOR,
    name="cloud-hypervisor-51",
    source=CH51_SOURCE,
    rules=dataclasses.replace(
        CLOUD_HYPERVISOR.rules,
        unplug_all_count_u16=True,  # v51.0 mem.rs:589-591: (region_size / block_size) as u16
        short_request="dies",  # v51.0 mem.rs:296-297, 644: parse error ends process_queue
        unknown_request="dies",  # v51.0 mem.rs:657: Err(UnknownRequestType)
    ),
    # Line numbers of the v51.0 file.
    sources={
        "requested_check_first": "mem.rs:502-507",
        "usable_policy": "mem.rs:781 (usable_region_size: region.len()); resize 237-259"
        " and unplug_all 563-597 leave it",
        "busy_requests": "mem.rs:73-74 (BUSY unused); discard failure answers ERROR 521-524,"
        " 565-568",
        "unplug_all_count_u16": "mem.rs:589-591 (fixed by dfee31a84)",
        "short_request": "mem.rs:296-297, 644 (fixed by 6a1fe123c)",
        "unknown_request": "mem.rs:657 (fixed by 97e16f249)",
        "resize_same_refused": "mem.rs:238-241",
        "default_features": "mem.rs:775-798 (VERSION_1; ACPI_PXM with a NUMA node)",
        "block_sizes": "mem.rs:56, 778 (VIRTIO_MEM_DEFAULT_BLOCK_SIZE)",
        "reset": "mem.rs:1014-1018 (common reset only: blocks kept)",
    },
)

FIRECRACKER = DeviceProfile(
    name="firecracker",
    busy_unplug_all_when_empty=False,
    default_features=1 << Feature.UNPLUGGED_INACCESSIBLE,
    msix_vectors=0,
    keeps_blocks_on_wakeup=True,
    source=FC_SOURCE,
    rules=ModelRules(
        plug_beyond_requested=ResponseType.ERROR,  # device.rs:328-331, 350-354
        usable_policy="slot",  # device.rs:573-580: requested rounded up to slot_size
        unplug_all_usable="zero",  # device.rs:418: usable_region_size = 0
        busy_requests=frozenset(),  # request.rs:83-103: ack() and error() only
        busy_unplug_all_when_empty=False,
        short_request="unanswered",  # device.rs:244-246, 447: no used entry
        unknown_request="unanswered",  # device.rs:457: Err before any response
    ),
    required_features=1 << Feature.UNPLUGGED_INACCESSIBLE,
    acpi_pxm="never",
    block_sizes="a power of two, at least 2 MiB",
    min_block_size=2 * MiB,
    sources={
        "plug_beyond_requested": "device.rs:328-331 (PlugRequestIsTooBig), 350-354 (error())",
        "usable_policy": "device.rs:122-127 (starts at 0), 573-580 (slot rounding)",
        "unplug_all_usable": "device.rs:418",
        "busy_requests": "request.rs:83-103 (Response::error, ack, ack_with_state only)",
        "short_request": "device.rs:244-246, 447 (parse error: never used)",
        "unknown_request": "device.rs:457",
        "default_features": "device.rs:155",
        "acpi_pxm": "device.rs:155 (VERSION_1 and UNPLUGGED_INACCESSIBLE only)",
        "required_features": "device.rs:670-678",
        "block_sizes": "src/vmm/src/vmm_config/memory_hotplug.rs:52-60",
        "reset": "device.rs:652-661 (blocks kept)",
    },
)

STRATOVIRT = DeviceProfile(
    name="stratovirt",
    busy_unplug_all_when_empty=False,
    default_features=0,
    msix_vectors=2,
    keeps_blocks_on_wakeup=True,
    source=SV_SOURCE,
    rules=ModelRules(
        requested_check_first=True,  # memory.rs:448-451 before plug_range's checks
        empty_plug_nack=True,  # memory.rs:449: "|| plug_size == 0" -> NACK
        unplug_nack_below_requested=True,  # memory.rs:468-471
        usable_policy="region",  # memory.rs:677: usable_region_size = region_size
        unplug_all_by_runs=True,  # memory.rs:491-509 over top_plugged_range 276-288
        unplug_all_run_u16=True,  # memory.rs:282: (end - begin) as u16
        busy_requests=frozenset({int(RequestType.PLUG)}),  # memory.rs:334-337
        busy_unplug_all_when_empty=False,
        reset_forgets_blocks=True,  # memory.rs:821-826: activate builds a new bitmap
    ),
    acpi_pxm="never",
    block_sizes="any multiple of 16 KiB (otherwise 32 MiB, silently)",
    min_block_size=16 << 10,
    block_size_granule=16 << 10,
    block_size_power_of_two=False,
    sources={
        "requested_check_first": "memory.rs:448-451 (before plug_range 320-329)",
        "empty_plug_nack": "memory.rs:449",
        "unplug_nack_below_requested": "memory.rs:468-471",
        "usable_policy": "memory.rs:677; update_request 710-726 and unplug_all 491-509 leave it",
        "unplug_all_by_runs": "memory.rs:491-509 (through handle_unplug_request 463-481)",
        "unplug_all_run_u16": "memory.rs:282 ((end - begin) as u16), 495-497",
        "busy_requests": "memory.rs:334-337 (add_subregion failure; UNPLUG's answers ERROR"
        " 365-368)",
        "reset_forgets_blocks": "memory.rs:821-826 (new MemRegionState) and 842-844",
        "short_request": "memory.rs:524-528 (iov_read_object error), 616-622 (report_virtio_error)",
        "unknown_request": "memory.rs:600-602, 616-622",
        "default_features": "memory.rs:755-766 (UNPLUGGED_INACCESSIBLE only when configured)",
        "acpi_pxm": "memory.rs:678-687 (node forced to NUMA_NONE, 4097)",
        "block_sizes": "memory.rs:665-674 (DEFAULT_MEM_BLOCK_ALIGN_SIZE 16 KiB, 67-68)",
    },
)

PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (QEMU_7_2, QEMU_10_0, CLOUD_HYPERVISOR, CLOUD_HYPERVISOR_51, FIRECRACKER, STRATOVIRT)
}


def profile_for_offer(offered: int) -> DeviceProfile:
    """The profile a device's offered features point to: PERSISTENT_SUSPEND exists
    only in the newer QEMU; without it, 7.2 (UNPLUGGED_INACCESSIBLE alone says
    nothing: 7.2 offers it too when ``unplugged-inaccessible=on``). The offer cannot
    tell the other implementations apart: name them with ``--profile``."""
    return QEMU_10_0 if offered & (1 << Feature.PERSISTENT_SUSPEND) else QEMU_7_2
