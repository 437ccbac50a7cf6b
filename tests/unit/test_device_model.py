"""The device model answers as QEMU's hw/virtio/virtio-mem.c does (docs/protocol.md section 1)."""

from __future__ import annotations

import random

import pytest

from vmem_guest import spec
from vmem_guest.device import DeviceConfig, RequestChannel, VirtioMemDevice, parse_response
from vmem_guest.errors import DeviceBroken
from vmem_guest.sim import DeviceModel
from vmem_guest.sim.device_model import usable_region_for
from vmem_guest.spec import BlockState, RequestType, ResponseType

MiB = 1 << 20
GiB = 1 << 30
BS = 2 * MiB
ADDR = 4 * GiB
REGION = 1 * GiB
REQUESTED = 64 * MiB
USABLE = REQUESTED + 256 * MiB

PLUG, UNPLUG, UNPLUG_ALL, STATE = (
    RequestType.PLUG,
    RequestType.UNPLUG,
    RequestType.UNPLUG_ALL,
    RequestType.STATE,
)
ACK, NACK, BUSY, ERROR = ResponseType.ACK, ResponseType.NACK, ResponseType.BUSY, ResponseType.ERROR


def make(**overrides: int) -> DeviceModel:
    kwargs = {"addr": ADDR, "region_size": REGION, "block_size": BS, "requested_size": REQUESTED}
    kwargs.update(overrides)
    return DeviceModel(
        addr=kwargs["addr"],
        region_size=kwargs["region_size"],
        block_size=kwargs["block_size"],
        requested_size=kwargs["requested_size"],
        node_id=kwargs.get("node_id", 0),
    )


def send(model: DeviceModel, req_type: RequestType, addr: int = 0, nb_blocks: int = 0) -> object:
    """The response type, or (ACK, state) for an ACKed STATE."""
    resp = parse_response(model.submit(spec.encode_request(req_type, addr, nb_blocks)), req_type)
    return resp.type if resp.state is None else (resp.type, resp.state)


def blk(index: int) -> int:
    """Guest-physical address of device block ``index``."""
    return ADDR + index * BS


@pytest.fixture
def model() -> DeviceModel:
    return make()


def config(model: DeviceModel) -> DeviceConfig:
    return DeviceConfig.from_bytes(model.read_config())


# -- config space and geometry (virtio_mem_get_config, realize) -----------------


def test_config_bytes_are_a_valid_snapshot(model: DeviceModel) -> None:
    cfg = config(model)
    assert len(model.read_config()) == spec.VirtioMemConfig.SPEC_SIZE
    assert (cfg.block_size, cfg.addr, cfg.region_size) == (BS, ADDR, REGION)
    assert (cfg.requested_size, cfg.plugged_size, cfg.usable_region_size) == (REQUESTED, 0, USABLE)


def test_config_follows_plugged_size(model: DeviceModel) -> None:
    assert send(model, PLUG, blk(0), 3) is ACK
    assert config(model).plugged_size == 3 * BS == model.plugged_size


def test_node_id_is_in_config() -> None:
    assert config(make(node_id=1)).node_id == 1


def test_model_is_a_request_channel(model: DeviceModel) -> None:
    channel: RequestChannel = model
    device = VirtioMemDevice(channel, "vm0")
    assert device.plug(blk(0), 1).acked
    assert device.state(blk(0), 2).state is BlockState.MIXED


@pytest.mark.parametrize(
    "overrides",
    [
        {"block_size": 3 * MiB},
        {"block_size": 512 * 1024},
        {"region_size": 0},
        {"region_size": REGION + MiB},
        {"addr": ADDR + MiB},
        {"addr": (1 << 64) - 512 * MiB},
        {"requested_size": REQUESTED + MiB},
        {"requested_size": REGION + BS},
        {"node_id": 1 << 16},
    ],
)
def test_geometry_qemu_refuses_is_a_value_error(overrides: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        make(**overrides)


def test_usable_region_is_requested_plus_256m_capped_by_region() -> None:
    assert make(requested_size=900 * MiB).usable_region_size == REGION
    assert make(requested_size=0).usable_region_size == 0


def test_usable_region_is_aligned_up_to_the_block_size() -> None:
    model = make(block_size=GiB, region_size=4 * GiB, requested_size=GiB)
    assert model.usable_region_size == 2 * GiB
    assert usable_region_for(GiB, 4 * GiB, GiB) == 2 * GiB


# -- virtio_mem_valid_range: ERROR --------------------------------------------------


@pytest.mark.parametrize("req_type", [PLUG, UNPLUG, STATE])
def test_misaligned_address_is_error(model: DeviceModel, req_type: RequestType) -> None:
    assert send(model, req_type, blk(1) + 4096, 1) is ERROR


@pytest.mark.parametrize("req_type", [PLUG, UNPLUG, STATE])
def test_zero_blocks_is_error(model: DeviceModel, req_type: RequestType) -> None:
    assert send(model, req_type, blk(0), 0) is ERROR


@pytest.mark.parametrize("req_type", [PLUG, UNPLUG, STATE])
def test_range_overflowing_64_bits_is_error(model: DeviceModel, req_type: RequestType) -> None:
    assert send(model, req_type, (1 << 64) - BS, 2) is ERROR


def test_region_at_the_top_of_the_address_space_keeps_qemus_uint64_wrap() -> None:
    top = make(addr=(1 << 64) - REGION, requested_size=REGION)
    # addr + usable_region_size wraps to 0 in QEMU's uint64_t: every range is invalid.
    assert send(top, PLUG, top.addr, 1) is ERROR
    below = make(addr=(1 << 64) - REGION, requested_size=REQUESTED)
    assert send(below, PLUG, below.addr, 1) is ACK
    assert send(below, PLUG, (1 << 64) - BS, 2) is ERROR


@pytest.mark.parametrize("req_type", [PLUG, UNPLUG, STATE])
def test_range_outside_usable_region_is_error(model: DeviceModel, req_type: RequestType) -> None:
    usable_blocks = USABLE // BS
    assert send(model, req_type, ADDR - BS, 1) is ERROR
    assert send(model, req_type, blk(usable_blocks), 1) is ERROR
    assert send(model, req_type, blk(usable_blocks - 1), 2) is ERROR
    assert send(model, req_type, ADDR + REGION, 1) is ERROR


def test_whole_usable_region_is_a_valid_range(model: DeviceModel) -> None:
    assert send(model, STATE, ADDR, USABLE // BS) == (ACK, BlockState.UNPLUGGED)


# -- virtio_mem_state_change_request: NACK, then ERROR -----------------------------


def test_plug_beyond_requested_size_is_nack(model: DeviceModel) -> None:
    limit = REQUESTED // BS
    assert send(model, PLUG, blk(0), limit + 1) is NACK
    assert send(model, PLUG, blk(0), limit) is ACK
    assert send(model, PLUG, blk(limit), 1) is NACK
    assert model.plugged_size == REQUESTED


def test_nack_is_checked_before_the_block_states(model: DeviceModel) -> None:
    assert send(model, PLUG, blk(0), REQUESTED // BS) is ACK
    assert send(model, PLUG, blk(0), 1) is NACK  # plugged already, but NACK comes first


def test_double_plug_is_error(model: DeviceModel) -> None:
    assert send(model, PLUG, blk(4), 2) is ACK
    assert send(model, PLUG, blk(4), 2) is ERROR
    assert send(model, PLUG, blk(3), 2) is ERROR  # partly plugged
    assert model.plugged_blocks() == {4, 5}


def test_double_unplug_is_error(model: DeviceModel) -> None:
    assert send(model, UNPLUG, blk(0), 1) is ERROR
    assert send(model, PLUG, blk(0), 2) is ACK
    assert send(model, UNPLUG, blk(0), 3) is ERROR  # partly plugged
    assert send(model, UNPLUG, blk(0), 2) is ACK
    assert send(model, UNPLUG, blk(0), 2) is ERROR
    assert model.plugged_size == 0


def test_unplug_is_never_nacked(model: DeviceModel) -> None:
    assert send(model, PLUG, blk(0), 8) is ACK
    model.resize(0)
    assert send(model, UNPLUG, blk(0), 8) is ACK


def test_plug_ack_sets_blocks_and_unplug_ack_clears_them(model: DeviceModel) -> None:
    assert send(model, PLUG, blk(10), 3) is ACK
    assert [model.is_plugged(i) for i in (9, 10, 11, 12, 13)] == [False, True, True, True, False]
    assert model.bitmap()[10:13] == b"\x01\x01\x01"
    assert send(model, UNPLUG, blk(11), 1) is ACK
    assert model.plugged_blocks() == {10, 12}
    assert model.plugged_size == 2 * BS
    with pytest.raises(IndexError):
        model.is_plugged(REGION // BS)


# -- BUSY (virtio_mem_set_block_state / virtio_mem_is_busy) -------------------------


def test_busy_next_answers_busy_and_changes_nothing(model: DeviceModel) -> None:
    model.busy_next = 2
    assert send(model, PLUG, blk(0), 1) is BUSY
    assert send(model, PLUG, blk(0), 1) is BUSY
    assert model.busy_next == 0 and model.plugged_size == 0
    assert send(model, PLUG, blk(0), 1) is ACK


def test_busy_on_unplug(model: DeviceModel) -> None:
    assert send(model, PLUG, blk(0), 1) is ACK
    model.busy_next = 1
    assert send(model, UNPLUG, blk(0), 1) is BUSY
    assert model.is_plugged(0)


def test_busy_on_unplug_all(model: DeviceModel) -> None:
    assert send(model, PLUG, blk(0), 1) is ACK
    model.resize(0)
    model.busy_next = 1
    assert send(model, UNPLUG_ALL) is BUSY
    assert model.plugged_size == BS and model.usable_region_size == USABLE


def test_busy_comes_after_error_and_nack(model: DeviceModel) -> None:
    model.busy_next = 1
    assert send(model, PLUG, blk(0) + 1, 1) is ERROR
    assert send(model, PLUG, blk(0), REQUESTED // BS + 1) is NACK
    assert send(model, UNPLUG, blk(0), 1) is ERROR
    assert model.busy_next == 1  # not consumed by requests that fail first


def test_state_is_never_busy(model: DeviceModel) -> None:
    model.busy_next = 1
    model.busy_rate = 1.0
    assert send(model, STATE, blk(0), 1) == (ACK, BlockState.UNPLUGGED)
    assert model.busy_next == 1


def test_busy_rate_draws_from_rng() -> None:
    def answers(seed: int) -> list[object]:
        model = DeviceModel(
            addr=ADDR, region_size=REGION, block_size=BS, requested_size=REQUESTED,
            rng=random.Random(seed),
        )  # fmt: skip
        model.busy_rate = 0.5
        return [send(model, PLUG, blk(i), 1) for i in range(30)]

    first = answers(7)
    assert first == answers(7)
    assert BUSY in first and ACK in first


def test_unplug_all_with_nothing_plugged_can_be_busy_in_qemu_7_2(model: DeviceModel) -> None:
    model.busy_next = 1
    assert send(model, UNPLUG_ALL) is BUSY
    model.busy_unplug_all_when_empty = False  # QEMU >= 8.1
    model.busy_next = 1
    assert send(model, UNPLUG_ALL) is ACK
    assert model.busy_next == 1


# -- UNPLUG_ALL (virtio_mem_unplug_all) ------------------------------------------


def test_unplug_all_unplugs_everything(model: DeviceModel) -> None:
    assert send(model, PLUG, blk(0), 4) is ACK
    assert send(model, PLUG, blk(20), 4) is ACK
    assert send(model, UNPLUG_ALL) is ACK
    assert model.plugged_size == 0 and model.plugged_blocks() == set()


def test_unplug_all_shrinks_the_usable_region(model: DeviceModel) -> None:
    model.resize(512 * MiB)
    assert model.usable_region_size == 768 * MiB
    model.resize(REQUESTED)
    assert model.usable_region_size == 768 * MiB  # resize only grows it
    assert send(model, UNPLUG_ALL) is ACK
    assert model.usable_region_size == USABLE


def test_unplug_all_with_nothing_requested_empties_the_usable_region(model: DeviceModel) -> None:
    model.resize(0)
    assert send(model, UNPLUG_ALL) is ACK
    assert model.usable_region_size == 0
    assert send(model, STATE, blk(0), 1) is ERROR


# -- STATE (virtio_mem_state_request) ---------------------------------------------


def test_state_plugged_unplugged_mixed(model: DeviceModel) -> None:
    assert send(model, PLUG, blk(2), 2) is ACK
    assert send(model, STATE, blk(2), 2) == (ACK, BlockState.PLUGGED)
    assert send(model, STATE, blk(4), 2) == (ACK, BlockState.UNPLUGGED)
    assert send(model, STATE, blk(1), 2) == (ACK, BlockState.MIXED)
    assert send(model, STATE, blk(0), 6) == (ACK, BlockState.MIXED)


# -- qom-set requested-size (virtio_mem_set_requested_size) -----------------------


@pytest.mark.parametrize("size", [BS + 4096, REGION + BS, -BS])
def test_resize_qemu_refuses_is_a_value_error(model: DeviceModel, size: int) -> None:
    calls: list[None] = []
    model.on_config_change = lambda: calls.append(None)
    with pytest.raises(ValueError):
        model.resize(size)
    assert (model.requested_size, model.usable_region_size, calls) == (REQUESTED, USABLE, [])


def test_usable_region_only_grows_on_resize(model: DeviceModel) -> None:
    model.resize(128 * MiB)
    assert model.usable_region_size == 384 * MiB
    model.resize(32 * MiB)
    assert model.requested_size == 32 * MiB
    assert model.usable_region_size == 384 * MiB
    model.resize(0)
    assert model.usable_region_size == 384 * MiB
    model.resize(REGION)
    assert model.usable_region_size == REGION


def test_config_change_fires_on_every_accepted_resize(model: DeviceModel) -> None:
    calls: list[tuple[int, int]] = []
    model.on_config_change = lambda: calls.append((model.requested_size, model.usable_region_size))
    model.resize(128 * MiB)
    model.resize(128 * MiB)  # QEMU notifies even when nothing changed
    assert calls == [(128 * MiB, 384 * MiB), (128 * MiB, 384 * MiB)]


def test_config_change_does_not_fire_for_requests_or_resets(model: DeviceModel) -> None:
    model.resize(512 * MiB)
    model.resize(0)
    calls: list[None] = []
    model.on_config_change = lambda: calls.append(None)
    assert send(model, PLUG, blk(0), 1) is NACK
    assert send(model, UNPLUG_ALL) is ACK  # shrinks usable: QEMU raises no interrupt
    assert model.usable_region_size == 0
    model.system_reset()
    model.device_reset()
    assert calls == []


def test_config_change_fires_when_the_device_breaks(model: DeviceModel) -> None:
    calls: list[bool] = []
    model.on_config_change = lambda: calls.append(model.broken)
    with pytest.raises(DeviceBroken):
        model.submit(b"\x00" * 8)
    assert calls == [True]


# -- resets ---------------------------------------------------------------------


def test_system_reset_unplugs_all_and_recomputes_usable(model: DeviceModel) -> None:
    model.resize(REGION)
    assert send(model, PLUG, blk(0), 100) is ACK
    model.resize(REQUESTED)
    model.system_reset()
    assert model.plugged_size == 0 and model.plugged_blocks() == set()
    assert model.requested_size == REQUESTED
    assert model.usable_region_size == USABLE


def test_system_reset_clears_broken(model: DeviceModel) -> None:
    with pytest.raises(DeviceBroken):
        model.submit(b"")
    model.system_reset()
    assert not model.broken
    assert send(model, PLUG, blk(0), 1) is ACK


def test_device_reset_keeps_block_state(model: DeviceModel) -> None:
    assert send(model, PLUG, blk(3), 5) is ACK
    model.device_reset()
    assert model.plugged_blocks() == {3, 4, 5, 6, 7}
    assert model.plugged_size == 5 * BS
    assert model.usable_region_size == USABLE


# -- protocol violations (virtio_mem_handle_request -> virtio_error) ---------------


def test_short_request_breaks_the_device_until_reset(model: DeviceModel) -> None:
    assert send(model, PLUG, blk(0), 1) is ACK
    with pytest.raises(DeviceBroken):
        model.submit(spec.encode_request(PLUG, blk(1), 1)[:23])
    assert model.broken and model.broken_reason is not None
    assert "request size" in model.broken_reason
    with pytest.raises(DeviceBroken):
        model.submit(spec.encode_request(STATE, blk(0), 1))  # answers nothing
    model.device_reset()
    assert not model.broken and model.broken_reason is None
    assert send(model, STATE, blk(0), 1) == (ACK, BlockState.PLUGGED)


def test_unknown_type_breaks_the_device_until_reset(model: DeviceModel) -> None:
    raw = bytearray(spec.encode_request(PLUG, blk(0), 1))
    raw[0] = 4
    with pytest.raises(DeviceBroken):
        model.submit(bytes(raw))
    assert model.broken and "unknown request type: 4" in str(model.broken_reason)
    with pytest.raises(DeviceBroken):
        model.submit(spec.encode_request(UNPLUG_ALL))
    model.device_reset()
    assert send(model, UNPLUG_ALL) is ACK


def test_padding_and_trailing_bytes_are_ignored(model: DeviceModel) -> None:
    raw = bytearray(spec.encode_request(PLUG, blk(0), 1))
    raw[2:8] = b"\xff" * 6
    raw[18:24] = b"\xff" * 6
    assert parse_response(model.submit(bytes(raw) + b"junk"), PLUG).type is ACK


def test_stats_count_answers_and_requests_count_calls(model: DeviceModel) -> None:
    send(model, PLUG, blk(0), 1)
    send(model, PLUG, blk(0), 1)
    send(model, STATE, blk(0), 1)
    with pytest.raises(DeviceBroken):
        model.submit(b"")
    assert model.stats == {("PLUG", "ACK"): 1, ("PLUG", "ERROR"): 1, ("STATE", "ACK"): 1}
    assert model.requests == 4


def test_responses_are_ten_bytes(model: DeviceModel) -> None:
    for raw in (spec.encode_request(PLUG, blk(0), 1), spec.encode_request(STATE, blk(0), 1)):
        assert len(model.submit(raw)) == spec.VirtioMemResp.SPEC_SIZE
