"""Device profiles: QEMU 7.2 and 10.0 told apart by what a driver can see."""

from __future__ import annotations

from vmem_guest import conformance, spec
from vmem_guest.sim import DeviceModel
from vmem_guest.sim.profiles import PROFILES, QEMU_7_2, QEMU_10_0, profile_for_offer
from vmem_guest.spec import Feature, RequestType, ResponseType

MiB, GiB = 1 << 20, 1 << 30
VERSION_1 = 1 << Feature.VERSION_1
#: Measured: what QEMU 7.2's and 10.0.2's virtio-mem-pci offer on q35 with NUMA nodes
#: (7.2: tests/unit/test_virtio_pci_channel.QEMU72_OFFER, device-type bits).
QEMU72_DEVICE_BITS = 1 << Feature.ACPI_PXM
QEMU10_DEVICE_BITS = (
    (1 << Feature.ACPI_PXM)
    | (1 << Feature.UNPLUGGED_INACCESSIBLE)
    | (1 << Feature.PERSISTENT_SUSPEND)
)


def geometry() -> dict[str, int]:
    return {"addr": 4 * GiB, "region_size": 2 * GiB, "block_size": 2 * MiB, "requested_size": 0}


def test_the_offer_chooses_the_profile() -> None:
    assert profile_for_offer(VERSION_1 | QEMU10_DEVICE_BITS) is QEMU_10_0
    assert profile_for_offer(VERSION_1 | QEMU72_DEVICE_BITS) is QEMU_7_2
    # 7.2 with unplugged-inaccessible=on offers bit 1 too: that alone is not 10.0.
    assert profile_for_offer(1 << Feature.UNPLUGGED_INACCESSIBLE) is QEMU_7_2
    assert {"qemu-7.2", "qemu-10.0", "cloud-hypervisor", "firecracker", "stratovirt"} <= set(PROFILES)


def test_feature_differences_name_each_unexpected_bit() -> None:
    assert QEMU_10_0.feature_differences(VERSION_1 | QEMU10_DEVICE_BITS) == []
    assert QEMU_7_2.feature_differences(VERSION_1 | QEMU72_DEVICE_BITS) == []
    differences = QEMU_7_2.feature_differences(QEMU10_DEVICE_BITS)
    assert len(differences) == 2
    assert differences[1] == ("PERSISTENT_SUSPEND offered; profile qemu-7.2 does not offer it")
    # ACPI_PXM follows the VM's NUMA nodes, not the version: never a difference.
    assert QEMU_10_0.feature_differences(QEMU10_DEVICE_BITS & ~1) == []


def unplug_all_when_empty(model: DeviceModel) -> ResponseType:
    model.busy_next = 1  # as if a migration were running
    answer = model.submit(spec.encode_request(RequestType.UNPLUG_ALL))
    return ResponseType(answer[0])


def test_the_profiles_model_follows_its_qemu() -> None:
    # virtio_mem_unplug_all: 7.2 checks "migration -> BUSY" first; 8.1+ ACKs when empty.
    assert unplug_all_when_empty(QEMU_7_2.model(**geometry())) is ResponseType.BUSY
    assert unplug_all_when_empty(QEMU_10_0.model(**geometry())) is ResponseType.ACK


def test_the_fuzzer_reports_features_its_profile_does_not_expect() -> None:
    device = DeviceModel(**geometry())
    forced = conformance.fuzz(
        device, examples=5, seed=1, profile=QEMU_7_2, offered_features=QEMU10_DEVICE_BITS
    )
    assert forced.profile == "qemu-7.2" and forced.mismatches == 1
    assert forced.as_dict()["feature_differences"] == forced.feature_differences != []
    chosen = conformance.fuzz(device, examples=5, seed=1, offered_features=QEMU10_DEVICE_BITS)
    assert (chosen.profile, chosen.mismatches, chosen.feature_differences) == ("qemu-10.0", 0, [])
