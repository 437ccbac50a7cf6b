"""No-IOMMU DMA buffers are placed outside every virtio-mem region (memfd_secret first)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from vmem_guest.errors import SafetyError
from vmem_guest.transport import dma

REGION = (0x1_0000_0000, 0x2_0000_0000)
INSIDE, OUTSIDE = 0x1_0000_5000, 0x7C48000


class Placed(dma.PhysBuffer):
    """PhysBuffer whose physical address comes from a script, one per allocation."""

    script: Iterator[int]
    made: list[Placed]

    def _read_physical(self) -> list[int]:
        if not hasattr(self, "_phys"):
            self._phys = next(Placed.script)
            Placed.made.append(self)
        return [self._phys]


def place(monkeypatch: pytest.MonkeyPatch, addresses: list[int], *, secret: bool) -> dma.PhysBuffer:
    Placed.script = iter(addresses)
    Placed.made = []
    fd = os.memfd_create("fake-secretmem") if secret else None
    monkeypatch.setattr(dma.secretmem, "memfd_secret", lambda: fd)
    return Placed.outside(dma.PAGE_SIZE, [REGION], attempts=4)


def test_misplaced_pages_are_held_then_released(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = place(monkeypatch, [INSIDE, INSIDE + 0x1000, OUTSIDE], secret=False)
    assert buffer.bus_pages == [OUTSIDE]
    assert [b._anchor is None for b in Placed.made] == [True, True, False]
    buffer.close()


def test_memfd_secret_is_tried_first(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = place(monkeypatch, [OUTSIDE], secret=True)
    assert buffer.bus_pages == [OUTSIDE]
    assert len(Placed.made) == 1
    buffer.close()


def test_misplaced_secret_page_falls_back_to_anonymous(monkeypatch: pytest.MonkeyPatch) -> None:
    buffer = place(monkeypatch, [INSIDE, OUTSIDE], secret=True)
    assert buffer.bus_pages == [OUTSIDE]
    buffer.close()


def test_no_page_outside_is_a_safety_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SafetyError, match=r"secretmem\.enable=1"):
        place(monkeypatch, [INSIDE] * 8, secret=False)
    assert all(b._anchor is None for b in Placed.made)  # nothing leaked


def test_secret_false_takes_a_plain_page_and_says_which(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before a hibernation the ring leaves memfd_secret memory: no memfd_secret asked
    for, and no warning that it is missing."""
    Placed.script, Placed.made = iter([OUTSIDE]), []
    monkeypatch.setattr(dma.secretmem, "memfd_secret", lambda: pytest.fail("memfd_secret asked"))
    with caplog.at_level("WARNING"):
        buffer = Placed.outside(dma.PAGE_SIZE, [REGION], attempts=4, secret=False)
    assert buffer.bus_pages == [OUTSIDE] and buffer.secret is False
    assert caplog.records == []
    buffer.close()
    secret = place(monkeypatch, [OUTSIDE], secret=True)
    assert secret.secret is True
    secret.close()
