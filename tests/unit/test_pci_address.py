"""PCI addresses: the short and long forms people type, the canonical form sysfs and VFIO use."""

from __future__ import annotations

import pytest

from vmem_guest.errors import TransportError, UsageError
from vmem_guest.pci_address import canonical_bdf, check_bdf, normalize_bdf


@pytest.mark.parametrize(
    ("text", "full"),
    [
        ("0000:00:03.0", "0000:00:03.0"),
        ("00:03.0", "0000:00:03.0"),
        ("0000:0A:1f.7", "0000:0a:1f.7"),
        (" 01:00.1\n", "0000:01:00.1"),
        ("10000:00:02.0", "10000:00:02.0"),  # VMD-style domains
    ],
)
def test_normalize_bdf(text: str, full: str) -> None:
    assert normalize_bdf(text) == full


@pytest.mark.parametrize(
    "text",
    ["", "3.0", "00:03", "0000:00:03.8", "0000:00:20.0", "../../etc", "00:03.0/x", "g0:03.0"],
)
def test_normalize_bdf_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="not a PCI address"):
        normalize_bdf(text)


@pytest.mark.parametrize("bdf", ["00:03.0", "0000:00:03.8", "../../etc", "0000:00:03.0/x"])
def test_check_bdf_rejects(bdf: str) -> None:
    with pytest.raises(TransportError):
        check_bdf(bdf)


@pytest.mark.parametrize("bdf", ["0000:00:03.0", "0000:0a:1f.7", "10000:00:02.0"])
def test_check_bdf_accepts_the_canonical_form(bdf: str) -> None:
    assert check_bdf(bdf) == bdf


@pytest.mark.parametrize("bdf", ["0000:00:0A.0", " 0000:00:03.0", "0000:00:03.0\n"])
def test_check_bdf_rejects_what_is_not_canonical(bdf: str) -> None:
    """What a person may type (upper case, blanks) names no sysfs directory as such."""
    assert normalize_bdf(bdf) != bdf
    with pytest.raises(TransportError, match="not a PCI address"):
        check_bdf(bdf)


def test_canonical_bdf_is_none_for_a_non_address() -> None:
    assert canonical_bdf("00:03.0") == "0000:00:03.0"
    assert canonical_bdf("0000:00:20.0") is None  # device numbers stop at 0x1f
    assert canonical_bdf("") is None
