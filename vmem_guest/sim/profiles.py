"""Named device profiles: what distinguishes one QEMU's virtio-mem device from another's.

The request rules are the same in QEMU 7.2 and 10.0.2 (same checks in the same order:
``virtio_mem_valid_range``, ``virtio_mem_state_change_request``,
``virtio_mem_state_request``); what differs, and what a profile holds:

* ``virtio_mem_unplug_all`` with nothing plugged: up to 8.0 the "migration running ->
  BUSY" check comes first, so it can answer BUSY; from 8.1 it always ACKs
  (:attr:`DeviceProfile.busy_unplug_all_when_empty`).
* The device-type feature bits offered by default (``virtio_mem_get_features``) for a
  plain ``memory-backend-ram`` on q35: 7.2 leaves ``unplugged-inaccessible`` off for
  it; 10.0 turns it on by default and offers VIRTIO_MEM_F_PERSISTENT_SUSPEND on
  pc/q35. ACPI_PXM depends on the VM having NUMA nodes, not on the version, so it is
  not part of a profile.
* MSI-X: ``virtio-mem-pci`` has no ``vectors`` in 7.2 (INTx only); 10.0 gives it two.
* S3 wake-up: 7.2 unplugs everything (``virtio_mem_system_reset`` runs); 10.0 skips
  the unplug on ``RESET_TYPE_WAKEUP`` and keeps every block's state.

The conformance fuzzer picks a profile from what the device offers
(:func:`profile_for_offer`) or takes one by name (``vmem-guest fuzz --profile``),
builds its model from it, and reports offered features that differ from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vmem_guest.sim.device_model import DeviceModel
from vmem_guest.spec import Feature

#: The feature bits a profile speaks for (ACPI_PXM follows the VM's NUMA set-up).
PROFILED_FEATURES = (1 << Feature.UNPLUGGED_INACCESSIBLE) | (1 << Feature.PERSISTENT_SUSPEND)


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """One QEMU version's virtio-mem device, as far as a driver can tell them apart."""

    name: str
    busy_unplug_all_when_empty: bool
    #: Of :data:`PROFILED_FEATURES`, the bits offered by default.
    default_features: int
    msix_vectors: int
    keeps_blocks_on_wakeup: bool

    def model(self, **geometry: Any) -> DeviceModel:
        """A :class:`DeviceModel` with this profile's rules (a ``model_factory``)."""
        model = DeviceModel(**geometry)
        model.busy_unplug_all_when_empty = self.busy_unplug_all_when_empty
        return model

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
)
QEMU_10_0 = DeviceProfile(
    name="qemu-10.0",
    busy_unplug_all_when_empty=False,
    default_features=PROFILED_FEATURES,
    msix_vectors=2,
    keeps_blocks_on_wakeup=True,
)
PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (QEMU_7_2, QEMU_10_0)}


def profile_for_offer(offered: int) -> DeviceProfile:
    """The profile a device's offered features point to: PERSISTENT_SUSPEND exists
    only in the newer QEMU; without it, 7.2 (UNPLUGGED_INACCESSIBLE alone says
    nothing: 7.2 offers it too when ``unplugged-inaccessible=on``)."""
    return QEMU_10_0 if offered & (1 << Feature.PERSISTENT_SUSPEND) else QEMU_7_2
