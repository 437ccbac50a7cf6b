"""VirtioMemDevice and its checks on what the device says (device.py).

The channel is a tiny fake that replays canned bytes and records what was
sent, so every assertion is about device.py alone.
"""

from __future__ import annotations

import dataclasses
import struct

import pytest

from vmem_guest.device import DeviceConfig, Response, VirtioMemDevice, parse_response
from vmem_guest.errors import ConfigError, DeviceError, ResponseError
from vmem_guest.spec import BlockState, RequestType, ResponseType

MiB, GiB = 1 << 20, 1 << 30
U64 = 1 << 64

GOOD = DeviceConfig(
    block_size=2 * MiB,
    node_id=0,
    addr=4 * GiB,
    region_size=4 * GiB,
    usable_region_size=1280 * MiB,
    plugged_size=512 * MiB,
    requested_size=1 * GiB,
)


def config_bytes(cfg: DeviceConfig, padding: bytes = bytes(6)) -> bytes:
    """The 56 config bytes, packed with struct (not with the code under test)."""
    return struct.pack(
        "<QH6sQQQQQ",
        cfg.block_size,
        cfg.node_id,
        padding,
        cfg.addr,
        cfg.region_size,
        cfg.usable_region_size,
        cfg.plugged_size,
        cfg.requested_size,
    )


def resp(resp_type: int, state: int = 0, padding: bytes = bytes(6)) -> bytes:
    return struct.pack("<H6sH", resp_type, padding, state)


class FakeChannel:
    """Replays responses in order and records every request."""

    def __init__(self, responses: list[bytes] | None = None, config: bytes = b"") -> None:
        self.responses = list(responses or [])
        self.config = config or config_bytes(GOOD)
        self.sent: list[bytes] = []

    def read_config(self) -> bytes:
        return self.config

    def submit(self, request: bytes) -> bytes:
        self.sent.append(request)
        return self.responses.pop(0)


# --- DeviceConfig.validate ------------------------------------------------------


def test_good_config_validates_and_parses() -> None:
    GOOD.validate()
    assert DeviceConfig.from_bytes(config_bytes(GOOD)) == GOOD
    assert GOOD.end == 8 * GiB
    assert GOOD.usable_end == 4 * GiB + 1280 * MiB
    assert GOOD.nr_blocks == 2048


def test_padding_is_ignored() -> None:
    assert DeviceConfig.from_bytes(config_bytes(GOOD, b"\xff" * 6)) == GOOD


@pytest.mark.parametrize("block_size", [0, 1, 2048, 3 * MiB, 2 * MiB + 4096, (1 << 63) + 1])
def test_bad_block_size_is_refused(block_size: int) -> None:
    cfg = dataclasses.replace(GOOD, block_size=block_size)
    with pytest.raises(ConfigError, match="block_size"):
        cfg.validate()


def test_smallest_block_size_is_one_page() -> None:
    cfg = DeviceConfig(4096, 0, 4096, 4096, 4096, 0, 0)
    cfg.validate()
    with pytest.raises(ConfigError):
        dataclasses.replace(cfg, block_size=2048, region_size=2048).validate()


@pytest.mark.parametrize(
    "field", ["addr", "region_size", "usable_region_size", "plugged_size", "requested_size"]
)
def test_fields_must_be_multiples_of_block_size(field: str) -> None:
    cfg = dataclasses.replace(GOOD, **{field: getattr(GOOD, field) + 4096})
    with pytest.raises(ConfigError, match=field) as info:
        cfg.validate()
    assert info.value.fields["field"] == field


def test_region_zero_is_refused() -> None:
    cfg = dataclasses.replace(
        GOOD, region_size=0, usable_region_size=0, plugged_size=0, requested_size=0
    )
    with pytest.raises(ConfigError, match="region_size is 0"):
        cfg.validate()


def test_region_overflowing_64_bits_is_refused() -> None:
    cfg = dataclasses.replace(GOOD, addr=U64 - 2 * GiB)
    with pytest.raises(ConfigError, match="overflows"):
        cfg.validate()


def test_region_ending_exactly_at_2_64_is_accepted() -> None:
    dataclasses.replace(GOOD, addr=U64 - GOOD.region_size).validate()


@pytest.mark.parametrize("field", ["usable_region_size", "plugged_size", "requested_size"])
def test_sizes_above_region_are_refused(field: str) -> None:
    changes = {field: GOOD.region_size + 2 * MiB}
    if field == "requested_size":
        changes["usable_region_size"] = GOOD.region_size + 2 * MiB
    cfg = dataclasses.replace(GOOD, **changes)
    with pytest.raises(ConfigError, match="exceeds region_size"):
        cfg.validate()


def test_requested_above_usable_is_tolerated() -> None:
    # Firecracker sets usable_region_size to 0 on UNPLUG_ALL whatever requested_size is
    # (device.rs:418): a device MUST broken, tolerated; the planner stays in the usable
    # region (tests/unit/test_planner.py::test_requested_beyond_usable_plans_within_usable).
    cfg = dataclasses.replace(GOOD, requested_size=GOOD.usable_region_size + 2 * MiB)
    cfg.validate()
    assert cfg.requested_beyond_usable
    assert not GOOD.requested_beyond_usable


def test_plugged_above_requested_is_allowed() -> None:
    # After the host shrinks the request, plugged may exceed it until the guest unplugs.
    plugged = GOOD.usable_region_size
    dataclasses.replace(GOOD, plugged_size=plugged, requested_size=0).validate()


def test_plugged_above_usable_is_refused() -> None:
    # Blocks are plugged only inside the usable region, which shrinks only when
    # nothing is plugged (spec 5.15.4): a device saying otherwise is lying.
    cfg = dataclasses.replace(GOOD, plugged_size=GOOD.usable_region_size + 2 * MiB)
    with pytest.raises(ConfigError, match="plugged_size exceeds usable_region_size"):
        cfg.validate()


@pytest.mark.parametrize("length", [0, 1, 48, 55])
def test_short_config_is_refused(length: int) -> None:
    with pytest.raises(ConfigError, match=f"{length} bytes"):
        DeviceConfig.from_bytes(config_bytes(GOOD)[:length])


def test_from_bytes_validates() -> None:
    bad = dataclasses.replace(GOOD, block_size=3 * MiB)
    with pytest.raises(ConfigError):
        DeviceConfig.from_bytes(config_bytes(bad))


def test_config_errors_are_device_errors() -> None:
    assert issubclass(ConfigError, DeviceError)
    assert issubclass(ResponseError, DeviceError)


# --- parse_response ---------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 2, 8, 9])
def test_short_response_is_refused(length: int) -> None:
    with pytest.raises(ResponseError, match=f"{length} bytes"):
        parse_response(resp(0)[:length], RequestType.PLUG)


@pytest.mark.parametrize("resp_type", [4, 5, 0x100, 0xFFFF])
@pytest.mark.parametrize("req_type", list(RequestType))
def test_unknown_response_type_is_refused(resp_type: int, req_type: RequestType) -> None:
    with pytest.raises(ResponseError, match="unknown response type") as info:
        parse_response(resp(resp_type), req_type)
    assert info.value.fields["type"] == resp_type


@pytest.mark.parametrize("resp_type", list(ResponseType))
@pytest.mark.parametrize("req_type", [RequestType.PLUG, RequestType.UNPLUG, RequestType.UNPLUG_ALL])
def test_known_types_parse(resp_type: ResponseType, req_type: RequestType) -> None:
    assert parse_response(resp(resp_type), req_type) == Response(resp_type, None)


@pytest.mark.parametrize("state", list(BlockState))
def test_acked_state_carries_the_state(state: BlockState) -> None:
    parsed = parse_response(resp(ResponseType.ACK, state), RequestType.STATE)
    assert parsed.type is ResponseType.ACK
    assert parsed.state is state
    assert parsed.acked


@pytest.mark.parametrize("state", [3, 4, 0xFFFF])
def test_unknown_state_is_refused(state: int) -> None:
    with pytest.raises(ResponseError, match="unknown block state") as info:
        parse_response(resp(ResponseType.ACK, state), RequestType.STATE)
    assert info.value.fields["state"] == state


@pytest.mark.parametrize("req_type", [RequestType.PLUG, RequestType.UNPLUG, RequestType.UNPLUG_ALL])
def test_state_field_is_ignored_for_other_requests(req_type: RequestType) -> None:
    parsed = parse_response(resp(ResponseType.ACK, 0xBEEF), req_type)
    assert parsed == Response(ResponseType.ACK, None)


@pytest.mark.parametrize("resp_type", [ResponseType.NACK, ResponseType.BUSY, ResponseType.ERROR])
def test_state_field_is_ignored_when_state_is_not_acked(resp_type: ResponseType) -> None:
    parsed = parse_response(resp(resp_type, 0xBEEF), RequestType.STATE)
    assert parsed == Response(resp_type, None)
    assert not parsed.acked


def test_response_padding_and_trailing_bytes_are_ignored() -> None:
    raw = resp(ResponseType.ACK, BlockState.UNPLUGGED, padding=b"\xaa" * 6) + b"\xff" * 6
    assert parse_response(raw, RequestType.STATE) == Response(
        ResponseType.ACK, BlockState.UNPLUGGED
    )


# --- VirtioMemDevice ----------------------------------------------------------------


def test_plug_sends_the_request_bytes_and_parses_the_answer() -> None:
    channel = FakeChannel([resp(ResponseType.ACK)])
    device = VirtioMemDevice(channel, "vm0")
    assert device.plug(4 * GiB, 64) == Response(ResponseType.ACK)
    expected = struct.pack("<H6xQH6x", 0, 4 * GiB, 64)
    assert channel.sent == [expected]
    assert device.requests_sent == 1


@pytest.mark.parametrize(
    ("method", "req_type"),
    [("plug", 0), ("unplug", 1), ("state", 3)],
)
def test_range_requests_carry_type_addr_and_count(method: str, req_type: int) -> None:
    channel = FakeChannel([resp(ResponseType.NACK)])
    device = VirtioMemDevice(channel, "vm0")
    answer = getattr(device, method)(0x1_2340_0000, 65535)
    assert answer.type is ResponseType.NACK
    assert channel.sent == [struct.pack("<H6xQH6x", req_type, 0x1_2340_0000, 65535)]


def test_state_request_returns_the_state() -> None:
    channel = FakeChannel([resp(ResponseType.ACK, BlockState.MIXED)])
    device = VirtioMemDevice(channel, "vm0")
    assert device.state(4 * GiB, 2) == Response(ResponseType.ACK, BlockState.MIXED)


def test_unplug_all_sends_only_the_type() -> None:
    channel = FakeChannel([resp(ResponseType.BUSY)])
    device = VirtioMemDevice(channel, "vm0")
    assert device.unplug_all().type is ResponseType.BUSY
    assert channel.sent == [struct.pack("<H22x", 2)]


@pytest.mark.parametrize("nb_blocks", [0, -1, 65536, 1 << 20])
@pytest.mark.parametrize("method", ["plug", "unplug", "state"])
def test_bad_block_counts_are_refused_before_sending(method: str, nb_blocks: int) -> None:
    channel = FakeChannel([resp(ResponseType.ACK)])
    device = VirtioMemDevice(channel, "vm0")
    with pytest.raises(ValueError, match="nb_blocks"):
        getattr(device, method)(4 * GiB, nb_blocks)
    assert channel.sent == []
    assert device.requests_sent == 0


@pytest.mark.parametrize("addr", [-1, U64, U64 + 4 * GiB])
def test_addresses_outside_64_bits_are_refused_before_sending(addr: int) -> None:
    channel = FakeChannel([resp(ResponseType.ACK)])
    device = VirtioMemDevice(channel, "vm0")
    with pytest.raises(ValueError, match="64-bit"):
        device.plug(addr, 1)
    assert channel.sent == []


def test_bad_response_raises_after_sending() -> None:
    channel = FakeChannel([resp(7)])
    device = VirtioMemDevice(channel, "vm0")
    with pytest.raises(ResponseError):
        device.unplug(4 * GiB, 1)
    assert len(channel.sent) == 1


def test_config_reads_and_validates() -> None:
    assert VirtioMemDevice(FakeChannel(), "vm0").config() == GOOD
    broken = FakeChannel(config=config_bytes(dataclasses.replace(GOOD, requested_size=8 * GiB)))
    with pytest.raises(ConfigError):
        VirtioMemDevice(broken, "vm0").config()
