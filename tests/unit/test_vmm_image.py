"""The conformance image's guest side without a VM (vmem_guest/vmm_image.py): the
kernel command line's options, the report over every device, and the console
report the host finds again."""

from __future__ import annotations

from typing import Any

import pytest

from vmem_guest.errors import UsageError, VmemError
from vmem_guest.vmm_image import (
    DEFAULT_EXAMPLES,
    REPORT_BEGIN,
    REPORT_END,
    ImageOptions,
    console_lines,
    fuzz_every_device,
    parse_cmdline,
    report_from_console,
)

CMDLINE = "console=ttyS0 quiet initcall_blacklist=virtio_mem_driver_init vfio.x=1"


def test_defaults_without_options() -> None:
    assert parse_cmdline(CMDLINE) == ImageOptions("fuzz", DEFAULT_EXAMPLES, 40, None)


def test_options_are_read() -> None:
    words = "vmem_guest.mode=agent vmem_guest.examples=7 vmem_guest.max_steps=9 vmem_guest.seed=-3"
    assert parse_cmdline(f"{CMDLINE} {words}") == ImageOptions("agent", 7, 9, -3)


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("vmem_guest.mode=fuz", "vmem_guest.mode=fuz: expected one of fuzz, agent"),
        ("vmem_guest.examples=0", "vmem_guest.examples=0: expected a positive integer"),
        ("vmem_guest.max_steps=x", "vmem_guest.max_steps=x: expected a positive integer"),
        ("vmem_guest.seed=1.5", "vmem_guest.seed=1.5: expected an integer"),
        ("vmem_guest.exmples=3", "unknown kernel command line option vmem_guest.exmples"),
    ],
)
def test_a_bad_option_is_refused_in_one_line(word: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_cmdline(f"{CMDLINE} {word}")
    assert caught.value.message == message


def _report(bdf: str, mismatches: int = 0) -> dict[str, Any]:
    return {"device": bdf, "mismatches": mismatches}


def test_every_device_is_fuzzed_and_a_refusal_is_reported() -> None:
    def fuzz_one(bdf: str) -> dict[str, Any]:
        if bdf == "0000:00:02.0":
            raise VmemError("driven by the in-kernel virtio_mem driver")
        return _report(bdf)

    report = fuzz_every_device(ImageOptions(), ["0000:00:01.0", "0000:00:02.0"], fuzz_one)
    assert report["devices"] == [
        _report("0000:00:01.0"),
        {"device": "0000:00:02.0", "error": "driven by the in-kernel virtio_mem driver"},
    ]
    assert report["ok"] is False


@pytest.mark.parametrize(
    ("reports", "ok"),
    [([], False), ([_report("a")], True), ([_report("a"), _report("b", 1)], False)],
)
def test_ok_needs_a_device_and_no_mismatch(reports: list[dict[str, Any]], ok: bool) -> None:
    by_bdf = {r["device"]: r for r in reports}
    report = fuzz_every_device(ImageOptions(), list(by_bdf), by_bdf.__getitem__)
    assert report["ok"] is ok
    assert report["options"]["examples"] == DEFAULT_EXAMPLES


def test_the_console_report_is_found_again_among_kernel_lines() -> None:
    report = fuzz_every_device(ImageOptions(), ["0000:00:01.0"], _report)
    lines = console_lines(report, lambda device: f"text of {device['device']}")
    assert "text of 0000:00:01.0" in lines
    assert "vmem-guest conformance: PASS (1 device(s))" in lines
    console = "\r\n".join(["[    0.1] Linux version 6.1", *lines, "[   30.2] reboot: Power down"])
    assert report_from_console(console) == report


def test_a_report_broken_at_a_line_end_is_joined() -> None:
    console = f"{REPORT_BEGIN}\n" + '{"ok": true,\n "devices": []}' + f"\n{REPORT_END}\n"
    assert report_from_console(console) == {"ok": True, "devices": []}


@pytest.mark.parametrize(
    ("console", "message"),
    [
        ("boot\nreboot: Power down\n", "no complete conformance report in the console output"),
        (f'{REPORT_BEGIN}\n{{"ok": tr', "no complete conformance report in the console output"),
        (f'{REPORT_BEGIN}\n{{"ok": tr\n{REPORT_END}\n', "the console's conformance report"),
    ],
)
def test_a_missing_or_cut_report_is_an_error(console: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        report_from_console(console)
