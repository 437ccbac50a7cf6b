"""Sizes and addresses as users type them (units.py)."""

from __future__ import annotations

import pytest

from vmem_guest.errors import UsageError
from vmem_guest.units import (
    MAX_VALUE,
    format_size,
    parse_address,
    parse_size,
    parse_size_list,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512M", 512 * MiB),
        ("4GiB", 4 * GiB),
        ("1g", GiB),
        ("1G", GiB),
        ("1gib", GiB),
        ("2T", 2 * TiB),
        ("64K", 64 * KiB),
        ("64KB", 64 * KiB),
        ("4096", 4096),
        ("0", 0),
        ("7B", 7),
        ("0x8000000", 128 * MiB),
        ("0X8000000", 128 * MiB),
        ("0xFFFFffff", 0xFFFF_FFFF),
        ("1 G", GiB),
        ("  3M  ", 3 * MiB),
        ("1000M", 1000 * MiB),
        ("0xffffffffffffffff", MAX_VALUE),
        ("18446744073709551615", MAX_VALUE),
        ("16777215T", 16777215 * TiB),
        ("00000000000000000000000001K", KiB),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "12Q",
        "-1G",
        "",
        "   ",
        "1.5G",
        "0x",
        "0x10G",
        "G",
        "1GG",
        "1iB",  # "iB" needs a unit letter before it
        "1e9",
        "+1G",
        "1_000",
        "0b101",
        "1 G B",
        "\u0661G",  # ARABIC-INDIC DIGIT ONE: \d without re.ASCII would accept it
        "\uff11G",  # FULLWIDTH DIGIT ONE
        # 2**64 and above, in every notation:
        "18446744073709551616",
        "16777216T",
        "16384P",
        "0x10000000000000000",
        "99999999999999999999999G",
        "1" * 5000,  # int() alone would raise ValueError (4300-digit limit), not UsageError
    ],
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_size(text)
    message = info.value.message
    assert "\n" not in message
    assert len(message) < 200, "the one-line error must not echo an unbounded input"


def test_usage_error_carries_the_value() -> None:
    with pytest.raises(UsageError) as info:
        parse_size("12Q")
    assert info.value.fields["value"] == "12Q"
    assert "12Q" in str(info.value)


def test_address_errors_say_address() -> None:
    with pytest.raises(UsageError, match=r"^invalid address '0x1g'"):
        parse_address("0x1g")
    with pytest.raises(UsageError, match=r"^address '0x1000.*' does not fit in 64 bits"):
        parse_address("0x1" + "0" * 16)
    with pytest.raises(UsageError, match=r"^invalid size '-1'"):
        parse_size("-1")


def test_parse_address() -> None:
    assert parse_address("0x100000000") == 0x1_0000_0000
    assert parse_address("4G") == 4 * GiB
    with pytest.raises(UsageError):
        parse_address("0x1" + "0" * 16)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1G,3G,1000M,0", [GiB, 3 * GiB, 1000 * MiB, 0]),
        ("0x8000000", [128 * MiB]),
        ("1G, 2G", [GiB, 2 * GiB]),
    ],
)
def test_parse_size_list(text: str, expected: list[int]) -> None:
    assert parse_size_list(text) == expected


@pytest.mark.parametrize("text", ["", " ", ",", "1G,", ",1G", "1G,,2G", "1G, ,2G"])
def test_parse_size_list_rejects_empty_items(text: str) -> None:
    with pytest.raises(UsageError, match="empty item"):
        parse_size_list(text)


def test_parse_size_list_rejects_bad_item() -> None:
    with pytest.raises(UsageError, match="12Q"):
        parse_size_list("1G,12Q")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0"),
        (1, "1B"),
        (1536, "1536B"),
        (KiB, "1KiB"),
        (4096, "4KiB"),
        (128 * MiB, "128MiB"),
        (1000 * MiB, "1000MiB"),
        (104 * MiB, "104MiB"),
        (GiB, "1GiB"),
        (3 * GiB, "3GiB"),
        (3 * GiB + 2 * MiB, "3074MiB"),
        (TiB, "1TiB"),
        (MAX_VALUE, f"{MAX_VALUE}B"),
    ],
)
def test_format_size(value: int, expected: str) -> None:
    assert format_size(value) == expected


@pytest.mark.parametrize("value", [1, 4096, 1000 * MiB, 3 * GiB + 4 * KiB, 5 * TiB, MAX_VALUE])
def test_format_then_parse_round_trips(value: int) -> None:
    assert parse_size(format_size(value)) == value
