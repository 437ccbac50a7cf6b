"""The no-IOMMU check before each request meets a kernel that cannot read pagemap
just now (ENOMEM or EAGAIN from the open or the read, as Linux's fault injection
makes it in the test VM: ``make faults``): the request is not sent, the driver waits
as after a BUSY and converges once the kernel serves pagemap again. A DMA page that
really moved, or that lies in the device's region, still marks the device broken
(docs/safety.md, "Kernel faults")."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_dma import FakePagemap, PresetPhysBuffer
from test_driver import ADDR, GEOMETRY, MB0, MIB, Rig, Sent, online_blocks, unit
from test_linux_plumbing import PagemapFaults

from vmem_guest.driver import MANUAL_BUSY_RETRIES, Outcome
from vmem_guest.errors import PagemapRefused
from vmem_guest.spec import RequestType, ResponseType
from vmem_guest.transport import dma

PFNS = [0x1000, 0x1001]  # 16 MiB: far below the device's region
REGION = (ADDR, ADDR + GEOMETRY.region_size)


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[dma.PhysBuffer]:
    buf = PresetPhysBuffer(2 * dma.PAGE_SIZE, FakePagemap(tmp_path / "pagemap"), list(PFNS))
    yield buf
    buf.close()


@pytest.fixture
def faults(buffer: dma.PhysBuffer, monkeypatch: pytest.MonkeyPatch) -> PagemapFaults:
    return PagemapFaults(buffer.pagemap_path, monkeypatch)


@pytest.fixture
def rig(tmp_path: Path, buffer: dma.PhysBuffer) -> Iterator[Rig]:
    """A driver whose every request is preceded by the no-IOMMU check, as
    ``PciChannel.submit`` does: the device sees nothing when the check raises."""
    made = Rig(tmp_path / "state")
    made.state_dir.mkdir()

    def check(sent: Sent) -> bytes | None:
        buffer.check_outside([REGION])
        return None

    made.channel.before_submit = check
    made.open()
    yield made
    made.close()


@pytest.mark.parametrize("op", ["open", "read"])
@pytest.mark.parametrize("err", [errno.ENOMEM, errno.EAGAIN])
def test_a_pagemap_the_kernel_cannot_read_now_defers_the_request(
    rig: Rig, faults: PagemapFaults, op: str, err: int
) -> None:
    assert rig.driver is not None and rig.tracker is not None
    faults.fail(op, 3, err)
    rig.model.resize(256 * MIB)
    waits = []
    for _ in range(3):
        result = rig.driver.step()
        assert result.outcome is Outcome.WAIT, result
        assert f"{op} {faults.path} failed: {errno.errorcode[err]}" in result.detail
        waits.append(result.wait_seconds)
        rig.clock.advance(result.wait_seconds)
    # Not broken, nothing sent, nothing pending: a BUSY's backoff, doubling.
    assert rig.driver.broken_reason is None
    assert rig.tracker.intent is None
    assert rig.model.plugged_blocks() == set()
    assert waits == [0.05, 0.1, 0.2]
    results = rig.converge()
    assert results[-1].outcome is Outcome.DONE
    assert rig.model.plugged_blocks() == set(unit(0)) | set(unit(1))
    assert online_blocks(rig) == {MB0, MB0 + 1}
    assert faults.calls[op] > 3  # the check ran again, and passed


def test_a_page_that_moved_still_breaks_the_device(rig: Rig, buffer: dma.PhysBuffer) -> None:
    assert rig.driver is not None
    FakePagemap(buffer.pagemap_path).set(buffer, [0x1000, 0x2000])  # migrated
    rig.model.resize(256 * MIB)
    result = rig.driver.step()
    assert result.outcome is Outcome.BROKEN and "moved" in result.detail
    assert rig.model.plugged_blocks() == set()


def test_a_page_inside_the_device_region_still_breaks_the_device(
    rig: Rig, buffer: dma.PhysBuffer
) -> None:
    assert rig.driver is not None
    inside = ADDR // dma.PAGE_SIZE
    FakePagemap(buffer.pagemap_path).set(buffer, [inside, inside + 1])
    buffer.bus_pages = [inside * dma.PAGE_SIZE, (inside + 1) * dma.PAGE_SIZE]  # placed there
    rig.model.resize(256 * MIB)
    result = rig.driver.step()
    assert result.outcome is Outcome.BROKEN and "lies in virtio-mem region" in result.detail
    assert rig.model.plugged_blocks() == set()


def test_the_manual_api_retries_a_request_pagemap_kept_back(
    rig: Rig, faults: PagemapFaults
) -> None:
    assert rig.driver is not None and rig.tracker is not None
    rig.model.resize(256 * MIB)
    slept: list[float] = []
    faults.fail("open", 2)
    addr = GEOMETRY.subblock_addr(0)
    response = rig.driver.manual_request(RequestType.PLUG, addr, 64, slept.append)
    assert response.type is ResponseType.ACK and len(slept) == 2
    assert rig.model.plugged_blocks() == set(unit(0))
    # Refused past the retries: the error reaches the caller, the device is not broken.
    faults.fail("read", MANUAL_BUSY_RETRIES + 1)
    with pytest.raises(PagemapRefused) as caught:
        rig.driver.manual_request(RequestType.PLUG, GEOMETRY.subblock_addr(64), 64, slept.append)
    assert caught.value.fields["op"] == "read" and caught.value.errno == errno.ENOMEM
    assert rig.driver.broken_reason is None and rig.tracker.intent is None
    assert rig.model.plugged_blocks() == set(unit(0))
