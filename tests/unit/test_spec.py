"""The wire layouts against the protocol facts (docs/protocol.md section 1).

Every expected number here is copied from that section's tables, and the
golden byte strings in ``fixtures/`` were written by hand from the spec:
none of them is produced by the code under test.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest

from vmem_guest import spec
from vmem_guest.device import DeviceConfig, parse_response
from vmem_guest.spec import BlockState, Feature, RequestType, ResponseType

FIXTURES = Path(__file__).parent / "fixtures"
MiB = 1 << 20
GiB = 1 << 30


def golden(name: str) -> bytes:
    """Bytes of a hand-written ``.hex`` fixture: '#' starts a comment, spaces are ignored."""
    text = (FIXTURES / name).read_text()
    digits = "".join(line.split("#", 1)[0].replace(" ", "") for line in text.splitlines())
    return bytes.fromhex(digits)


# (layout, size from docs/protocol.md, {field: offset} from docs/protocol.md)
LAYOUTS = [
    (
        spec.VirtioMemConfig,
        56,
        {
            "block_size": 0,
            "node_id": 8,
            "padding": 10,
            "addr": 16,
            "region_size": 24,
            "usable_region_size": 32,
            "plugged_size": 40,
            "requested_size": 48,
        },
    ),
    (
        spec.VirtioMemReq,
        24,
        {"type": 0, "padding": 2, "addr": 8, "nb_blocks": 16, "padding2": 18},
    ),
    (spec.VirtioMemResp, 10, {"type": 0, "padding": 2, "state": 8}),
]

# (layout, field, size in bytes) from docs/protocol.md: u64 = 8, u16 = 2, padding arrays.
FIELD_SIZES = [
    (spec.VirtioMemConfig, "block_size", 8),
    (spec.VirtioMemConfig, "node_id", 2),
    (spec.VirtioMemConfig, "padding", 6),
    (spec.VirtioMemConfig, "addr", 8),
    (spec.VirtioMemConfig, "region_size", 8),
    (spec.VirtioMemConfig, "usable_region_size", 8),
    (spec.VirtioMemConfig, "plugged_size", 8),
    (spec.VirtioMemConfig, "requested_size", 8),
    (spec.VirtioMemReq, "type", 2),
    (spec.VirtioMemReq, "padding", 6),
    (spec.VirtioMemReq, "addr", 8),
    (spec.VirtioMemReq, "nb_blocks", 2),
    (spec.VirtioMemReq, "padding2", 6),
    (spec.VirtioMemResp, "type", 2),
    (spec.VirtioMemResp, "padding", 6),
    (spec.VirtioMemResp, "state", 2),
]


@pytest.mark.parametrize(
    ("layout", "size", "offsets"), LAYOUTS, ids=lambda x: getattr(x, "__name__", "")
)
def test_layout_size_matches_spec(
    layout: type[ctypes.Structure], size: int, offsets: object
) -> None:
    assert size == layout.SPEC_SIZE  # type: ignore[attr-defined]
    assert ctypes.sizeof(layout) == size


@pytest.mark.parametrize(
    ("layout", "size", "offsets"), LAYOUTS, ids=lambda x: getattr(x, "__name__", "")
)
def test_layout_offsets_match_spec(
    layout: type[ctypes.Structure], size: int, offsets: dict[str, int]
) -> None:
    actual = {name: getattr(layout, name).offset for name, *_ in layout._fields_}
    assert actual == offsets


@pytest.mark.parametrize(("layout", "field", "size"), FIELD_SIZES)
def test_field_sizes_match_spec(layout: type[ctypes.Structure], field: str, size: int) -> None:
    assert getattr(layout, field).size == size


def test_every_layout_is_listed_and_little_endian() -> None:
    assert set(spec.LAYOUTS) == {spec.VirtioMemConfig, spec.VirtioMemReq, spec.VirtioMemResp}
    for layout in spec.LAYOUTS:
        assert issubclass(layout, ctypes.LittleEndianStructure)


def test_enum_values_match_spec() -> None:
    assert {m.name: m.value for m in RequestType} == {
        "PLUG": 0,
        "UNPLUG": 1,
        "UNPLUG_ALL": 2,
        "STATE": 3,
    }
    assert {m.name: m.value for m in ResponseType} == {"ACK": 0, "NACK": 1, "BUSY": 2, "ERROR": 3}
    assert {m.name: m.value for m in BlockState} == {"PLUGGED": 0, "UNPLUGGED": 1, "MIXED": 2}
    assert Feature.ACPI_PXM == 0
    assert Feature.UNPLUGGED_INACCESSIBLE == 1
    assert Feature.PERSISTENT_SUSPEND == 2
    assert Feature.VERSION_1 == 32
    assert Feature.ACCESS_PLATFORM == 33


def test_device_identity_constants() -> None:
    assert spec.VIRTIO_ID_MEM == 24
    assert spec.PCI_VENDOR_ID == 0x1AF4
    assert spec.PCI_DEVICE_ID == 0x1058
    assert spec.REQUEST_QUEUE == 0
    assert spec.MAX_BLOCKS_PER_REQUEST == 65535


def test_golden_fixtures_have_spec_lengths() -> None:
    # Guards the hand-written fixtures themselves against a dropped or doubled byte.
    assert len(golden("plug_request.hex")) == 24
    assert len(golden("unplug_all_request.hex")) == 24
    assert len(golden("state_mixed_response.hex")) == 10
    assert len(golden("config.hex")) == 56


def test_encode_plug_request_matches_golden_bytes() -> None:
    assert spec.encode_request(RequestType.PLUG, 0x1_0000_0000, 64) == golden("plug_request.hex")


def test_encode_unplug_all_matches_golden_bytes() -> None:
    assert spec.encode_request(RequestType.UNPLUG_ALL) == golden("unplug_all_request.hex")


def test_golden_plug_request_parses_back() -> None:
    req = spec.VirtioMemReq.from_buffer_copy(golden("plug_request.hex"))
    assert (req.type, req.addr, req.nb_blocks) == (RequestType.PLUG, 0x1_0000_0000, 64)


def test_request_fields_land_on_their_bytes() -> None:
    raw = spec.encode_request(RequestType.STATE, 0x1122_3344_5566_7788, 0xABCD)
    assert raw[0:2] == b"\x03\x00"
    assert raw[2:8] == bytes(6)
    assert raw[8:16] == bytes.fromhex("8877665544332211")
    assert raw[16:18] == bytes.fromhex("cdab")
    assert raw[18:24] == bytes(6)


def test_encode_response_matches_golden_bytes() -> None:
    raw = spec.encode_response(ResponseType.ACK, BlockState.MIXED)
    assert raw == golden("state_mixed_response.hex")
    assert spec.encode_response(ResponseType.BUSY) == bytes.fromhex("0200" + "00" * 8)


def test_golden_state_response_parses() -> None:
    resp = parse_response(golden("state_mixed_response.hex"), RequestType.STATE)
    assert resp.type is ResponseType.ACK
    assert resp.state is BlockState.MIXED


def test_golden_config_parses_to_expected_device_config() -> None:
    cfg = DeviceConfig.from_bytes(golden("config.hex"))
    assert cfg == DeviceConfig(
        block_size=2 * MiB,
        node_id=1,
        addr=0x1_4000_0000,
        region_size=4 * GiB,
        usable_region_size=1280 * MiB,
        plugged_size=512 * MiB,
        requested_size=1 * GiB,
    )
    assert cfg.end == 0x2_4000_0000
    assert cfg.nr_blocks == 2048


def test_golden_config_raw_layout() -> None:
    raw = spec.VirtioMemConfig.from_buffer_copy(golden("config.hex"))
    assert raw.block_size == 0x20_0000
    assert raw.node_id == 1
    assert bytes(raw.padding) == bytes.fromhex("deadbeef0000")
    assert raw.requested_size == 0x4000_0000


@pytest.mark.parametrize(
    ("req_type", "addr", "nb_blocks"),
    [
        (RequestType.PLUG, 0, 0x1_0000),  # would wrap to 0 blocks
        (RequestType.PLUG, 0, -1),  # would wrap to 65,535 blocks
        (RequestType.UNPLUG, 1 << 64, 1),  # would wrap to address 0
        (RequestType.STATE, -4096, 1),
        (0x1_0000, 0, 1),  # would wrap to PLUG
    ],
)
def test_encode_request_refuses_values_its_fields_cannot_hold(
    req_type: int, addr: int, nb_blocks: int
) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        spec.encode_request(req_type, addr, nb_blocks)  # type: ignore[arg-type]


def test_encode_request_field_limits_are_accepted() -> None:
    raw = spec.encode_request(RequestType.UNPLUG, (1 << 64) - 1, 0xFFFF)
    assert raw == bytes.fromhex("0100" + "00" * 6 + "ff" * 8 + "ffff" + "00" * 6)
