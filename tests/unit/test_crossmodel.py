"""Attribution in the model-against-model run: a difference is pinned on the rule
that explains it (vmem_guest/conformance/crossmodel.py)."""

from __future__ import annotations

import dataclasses

from vmem_guest.conformance.crossmodel import (
    GEOMETRY,
    PROBES,
    attribute,
    replay,
    static_differences,
)
from vmem_guest.conformance.steps import PLUG, Step
from vmem_guest.sim.profiles import CLOUD_HYPERVISOR, FIRECRACKER, QEMU_10_0, STRATOVIRT

BASE, BLOCK = GEOMETRY["addr"], GEOMETRY["block_size"]


def plug_beyond() -> list[Step]:
    return [
        Step("resize", size=4 * BLOCK),
        Step("request", PLUG, BASE, 5, kind="plug_beyond_requested"),
    ]


def test_firecracker_error_beyond_requested_is_pinned_on_its_rule() -> None:
    steps = plug_beyond()
    # First the resize: Firecracker's usable region is the slot, QEMU's + 256 MiB.
    first = replay(FIRECRACKER, FIRECRACKER.rules, QEMU_10_0.rules, steps, GEOMETRY)
    assert first is not None and first.differences[0].what == "config.usable_region_size"
    candidates = QEMU_10_0.rules.differences(FIRECRACKER.rules)
    assert attribute(FIRECRACKER, QEMU_10_0.rules, candidates, steps[:1], GEOMETRY) == (
        "usable_policy",
    )
    # With that adopted, the PLUG's answer is what differs: ERROR, not NACK.
    slot = dataclasses.replace(QEMU_10_0.rules, usable_policy="slot")
    second = replay(FIRECRACKER, FIRECRACKER.rules, slot, steps, GEOMETRY)
    assert second is not None
    assert [(d.device, d.model) for d in second.differences] == [("ERROR", "NACK")]
    assert attribute(FIRECRACKER, slot, candidates, steps, GEOMETRY) == ("plug_beyond_requested",)


def test_the_same_rules_replay_without_a_difference() -> None:
    assert replay(STRATOVIRT, STRATOVIRT.rules, STRATOVIRT.rules, plug_beyond(), GEOMETRY) is None


def test_a_difference_no_rule_explains_is_not_pinned() -> None:
    # Cloud Hypervisor's answer to a misaligned PLUG beyond requested_size is NACK; with
    # every rule but requested_check_first adopted, only that rule can explain it.
    steps = [Step("request", PLUG, BASE + 4096, 1, kind="misaligned")]
    assert attribute(CLOUD_HYPERVISOR, QEMU_10_0.rules, ["unknown_request"], steps, GEOMETRY) == ()
    fields = ["unknown_request", "requested_check_first"]
    assert attribute(CLOUD_HYPERVISOR, QEMU_10_0.rules, fields, steps, GEOMETRY) == (
        "requested_check_first",
    )


def test_probes_show_the_16_bit_truncations() -> None:
    probes = {name: (geometry, steps) for name, geometry, steps in PROBES}
    geometry, steps = probes["unplug_all_run_u16"]
    # StratoVirt's rules but the truncation: the probe passes; with it, it fails.
    whole = STRATOVIRT.rules.__class__(**{**STRATOVIRT.rules.__dict__, "unplug_all_run_u16": False})
    assert replay(STRATOVIRT, STRATOVIRT.rules, whole, steps, geometry) is not None
    assert replay(STRATOVIRT, STRATOVIRT.rules, STRATOVIRT.rules, steps, geometry) is None


def test_static_differences_name_their_source() -> None:
    rows = {row["field"]: row for row in static_differences(QEMU_10_0, FIRECRACKER)}
    assert {"default_features", "required_features", "acpi_pxm", "block_sizes"} <= set(rows)
    assert "device.rs:670-678" in rows["required_features"]["source"]
    assert rows["busy_requests"]["device_value"] == "{}"


def test_every_rule_has_the_spec_word() -> None:
    from vmem_guest.conformance.crossmodel import SPEC_WORD, STATIC_RULES

    fields = {f.name for f in dataclasses.fields(QEMU_10_0.rules)} - STATIC_RULES
    assert fields == set(SPEC_WORD)
    assert {level for level, _ in SPEC_WORD.values()} == {"MUST", "none"}


def test_rules_the_device_hides_are_not_expected() -> None:
    from vmem_guest.conformance.crossmodel import fuzz_differences

    # StratoVirt's model against Firecracker's device: no run-by-run UNPLUG_ALL (so
    # no 16-bit run cast to see), and ERROR beyond requested_size (so where the size
    # check goes cannot be seen).
    expected = fuzz_differences(STRATOVIRT, FIRECRACKER)
    assert "unplug_all_run_u16" not in expected
    assert "requested_check_first" not in expected
    assert "unplug_all_run_u16" in fuzz_differences(QEMU_10_0, STRATOVIRT)


def test_the_unplug_all_count_probe_shows_through_every_other_rule() -> None:
    """Cloud Hypervisor 51's 16-bit block count in UNPLUG_ALL against each device, with
    every other rule of that device already adopted (as the run has done by the time
    the probes come): the probe must still tell them apart. It did not against
    Firecracker (a slot-sized usable region left block 100 outside, and UNPLUG_ALL
    sets it to 0). Against a device whose UNPLUG_ALL goes run by run (StratoVirt) no
    block count is cast, so the rule is not expected there."""
    from vmem_guest.conformance.crossmodel import fuzz_differences
    from vmem_guest.sim.profiles import CLOUD_HYPERVISOR_51, PROFILES

    geometry, steps = {name: (g, s) for name, g, s in PROBES}["unplug_all_count_u16"]
    for device in PROFILES.values():
        if device.rules.unplug_all_by_runs:
            assert "unplug_all_count_u16" not in fuzz_differences(CLOUD_HYPERVISOR_51, device)
            continue
        for truncates in (True, False):
            if device.rules.unplug_all_count_u16 == truncates:
                continue
            model = dataclasses.replace(device.rules, unplug_all_count_u16=truncates)
            assert replay(device, device.rules, model, steps, geometry) is not None, device.name
        assert replay(device, device.rules, device.rules, steps, geometry) is None, device.name


def test_the_probes_find_nothing_the_fuzzing_left_hidden() -> None:
    """By the time the probes run, P has adopted Q's value of every rule the fuzzing
    expects; the rules it left hidden keep P's value. The probes must then show
    nothing for any pair, or the run would report an unexplained difference."""
    from vmem_guest.conformance.crossmodel import fuzz_differences
    from vmem_guest.sim.profiles import PROFILES

    for p in PROFILES.values():
        for q in PROFILES.values():
            adopted = {name: getattr(q.rules, name) for name in fuzz_differences(p, q)}
            rules = dataclasses.replace(p.rules, **adopted)
            for name, geometry, steps in PROBES:
                assert replay(q, q.rules, rules, steps, geometry) is None, (p.name, q.name, name)
