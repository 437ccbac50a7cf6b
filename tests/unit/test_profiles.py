"""Device profiles: QEMU 7.2 and 10.0 told apart by what a driver can see."""

from __future__ import annotations

import pytest

from vmem_guest import conformance, spec
from vmem_guest.errors import DeviceBroken, DeviceTimeout
from vmem_guest.sim import DeviceModel
from vmem_guest.sim.profiles import PROFILES, QEMU_7_2, QEMU_10_0, profile_for_offer
from vmem_guest.spec import BlockState, Feature, RequestType, ResponseType

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
    assert {"qemu-7.2", "qemu-10.0", "cloud-hypervisor", "firecracker", "stratovirt"} <= set(
        PROFILES
    )


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


# --- the other implementations (docs/device-profiles.md) ---------------------------

BLOCK = 2 * MiB
BASE = 4 * GiB


def other(name: str, region: int = 1 * GiB, requested: int = 0) -> DeviceModel:
    model = PROFILES[name].model(
        addr=BASE, region_size=region, block_size=BLOCK, requested_size=requested
    )
    return model


def ask(model: DeviceModel, req: RequestType, index: int = 0, nb: int = 1) -> ResponseType:
    raw = model.submit(spec.encode_request(req, BASE + index * BLOCK, nb))
    return ResponseType(int.from_bytes(raw[:2], "little"))


def state(model: DeviceModel, index: int, nb: int = 1) -> int:
    raw = model.submit(spec.encode_request(RequestType.STATE, BASE + index * BLOCK, nb))
    return int.from_bytes(raw[8:10], "little")


def test_firecracker_errors_beyond_requested_and_zeroes_usable_on_unplug_all() -> None:
    fc = other("firecracker")
    assert fc.usable_region_size == 0  # device.rs:122-127
    fc.resize(10 * BLOCK)
    assert fc.usable_region_size == 128 * MiB  # rounded up to the slot, device.rs:573-580
    assert ask(fc, RequestType.PLUG, 0, 11) is ResponseType.ERROR  # device.rs:328-331
    assert ask(fc, RequestType.PLUG, 0, 10) is ResponseType.ACK
    assert ask(fc, RequestType.UNPLUG_ALL) is ResponseType.ACK
    assert fc.usable_region_size == 0 < fc.requested_size  # device.rs:418
    fc.busy_next = 3  # never BUSY
    fc.resize(10 * BLOCK)  # the same size grows it again
    assert fc.usable_region_size == 128 * MiB
    assert ask(fc, RequestType.PLUG, 0, 1) is ResponseType.ACK


def test_firecracker_leaves_a_malformed_request_unanswered_and_goes_on() -> None:
    fc = other("firecracker", requested=BLOCK)
    with pytest.raises(DeviceTimeout):
        fc.submit(b"\x00" * 8)
    with pytest.raises(DeviceTimeout):
        fc.submit(spec.encode_request(RequestType.PLUG, BASE, 1)[:0] + b"\x07" + b"\x00" * 23)
    assert ask(fc, RequestType.STATE, 0) is ResponseType.ACK


def test_cloud_hypervisor_nacks_before_range_checks_and_keeps_the_whole_region() -> None:
    ch = other("cloud-hypervisor")
    assert ch.usable_region_size == 1 * GiB  # mem.rs:785
    raw = ch.submit(spec.encode_request(RequestType.PLUG, BASE + 4096, 1))
    assert ResponseType(raw[0]) is ResponseType.NACK  # mem.rs:501-506; QEMU: ERROR
    ch.resize(4 * BLOCK)
    assert ask(ch, RequestType.PLUG, 100, 4) is ResponseType.ACK
    assert ask(ch, RequestType.UNPLUG_ALL) is ResponseType.ACK
    assert ch.usable_region_size == 1 * GiB
    assert ch.submit(b"\x00" * 10) == b""  # used with length 0, mem.rs:638-647
    raw = ch.submit(b"\x09" + b"\x00" * 23)
    assert ResponseType(raw[0]) is ResponseType.ERROR  # mem.rs:660-663
    with pytest.raises(ValueError):
        ch.resize(4 * BLOCK)  # mem.rs:225-228


def test_cloud_hypervisor_51_unplug_all_leaves_blocks_past_the_u16_count() -> None:
    region = ((1 << 16) + 64) * BLOCK
    ch = other("cloud-hypervisor-51", region=region, requested=8 * BLOCK)
    assert ask(ch, RequestType.PLUG, 10, 1) is ResponseType.ACK
    assert ask(ch, RequestType.PLUG, 100, 1) is ResponseType.ACK
    assert ask(ch, RequestType.UNPLUG_ALL) is ResponseType.ACK
    assert ch.plugged_size == 0
    assert state(ch, 10) == BlockState.UNPLUGGED  # among the first 64 cleared
    assert state(ch, 100) == BlockState.PLUGGED  # mem.rs:589-591, `as u16`
    with pytest.raises(DeviceBroken):
        ch.submit(b"\x05" + b"\x00" * 23)  # the worker ends
    with pytest.raises(DeviceBroken):
        ch.submit(spec.encode_request(RequestType.STATE, BASE, 1))
    ch.device_reset()
    assert state(ch, 100) == BlockState.PLUGGED


def test_stratovirt_nacks_where_the_spec_says_error_or_ack() -> None:
    sv = other("stratovirt", requested=6 * BLOCK)
    assert ask(sv, RequestType.PLUG, 0, 0) is ResponseType.NACK  # memory.rs:449
    assert ask(sv, RequestType.PLUG, 0, 6) is ResponseType.ACK
    assert ask(sv, RequestType.PLUG, 8, 2) is ResponseType.NACK
    sv.resize(4 * BLOCK)
    # 6 plugged, 4 requested: an UNPLUG of 3 would go below -> NACK (memory.rs:468-471).
    assert ask(sv, RequestType.UNPLUG, 0, 3) is ResponseType.NACK
    assert ask(sv, RequestType.UNPLUG, 0, 2) is ResponseType.ACK
    # UNPLUG_ALL goes run by run through those checks: NACK while requested > 0.
    assert ask(sv, RequestType.UNPLUG_ALL) is ResponseType.NACK
    assert sv.plugged_size == 4 * BLOCK
    sv.resize(0)
    assert ask(sv, RequestType.UNPLUG_ALL) is ResponseType.ACK
    assert sv.plugged_size == 0


def test_stratovirt_unplug_all_stops_at_a_run_of_65536_blocks() -> None:
    region = ((1 << 16) + 64) * BLOCK
    sv = other("stratovirt", region=region, requested=(1 << 16) * BLOCK)
    assert ask(sv, RequestType.PLUG, 0, 0xFFFF) is ResponseType.ACK
    assert ask(sv, RequestType.PLUG, 0xFFFF, 1) is ResponseType.ACK
    sv.resize(0)
    assert ask(sv, RequestType.UNPLUG_ALL) is ResponseType.ACK  # memory.rs:282
    assert sv.plugged_size == (1 << 16) * BLOCK


def test_stratovirt_reset_forgets_blocks_and_keeps_plugged_size() -> None:
    sv = other("stratovirt", requested=4 * BLOCK)
    assert ask(sv, RequestType.PLUG, 0, 4) is ResponseType.ACK
    sv.device_reset()  # memory.rs:821-826
    assert sv.plugged_size == 4 * BLOCK
    assert state(sv, 0, 4) == BlockState.UNPLUGGED
    sv.busy_next = 1  # only PLUG answers BUSY (memory.rs:334-337)
    sv.resize(8 * BLOCK)
    assert ask(sv, RequestType.STATE, 0) is ResponseType.ACK
    assert ask(sv, RequestType.PLUG, 4, 1) is ResponseType.BUSY


def test_block_sizes_each_profile_accepts() -> None:
    assert PROFILES["cloud-hypervisor"].accepts_block_size(2 * MiB)
    assert not PROFILES["cloud-hypervisor"].accepts_block_size(4 * MiB)
    assert PROFILES["firecracker"].accepts_block_size(4 * MiB)
    assert not PROFILES["firecracker"].accepts_block_size(1 * MiB)
    assert PROFILES["stratovirt"].accepts_block_size(48 << 10)  # not a power of two
    assert not QEMU_10_0.accepts_block_size(48 << 10)
    assert QEMU_10_0.accepts_block_size(1 * MiB)
    fc = PROFILES["firecracker"]
    assert fc.required_features == 1 << Feature.UNPLUGGED_INACCESSIBLE
    assert fc.feature_differences(1 << Feature.UNPLUGGED_INACCESSIBLE) == []


def test_every_differing_value_names_its_source_line() -> None:
    for profile in PROFILES.values():
        if profile.name.startswith("qemu"):
            continue
        for field in profile.rules.differences(QEMU_10_0.rules):
            assert field in profile.sources, (profile.name, field)
