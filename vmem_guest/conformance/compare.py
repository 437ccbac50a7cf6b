"""What is compared after every step: the answer to a request and the config fields."""

from __future__ import annotations

from vmem_guest import spec
from vmem_guest.conformance.findings import Difference
from vmem_guest.device import parse_response
from vmem_guest.errors import ResponseError
from vmem_guest.spec import RequestType

#: Config fields compared after every request (spec 5.15.4; the padding is not).
CONFIG_FIELDS = (
    "block_size",
    "node_id",
    "addr",
    "region_size",
    "usable_region_size",
    "plugged_size",
    "requested_size",
)


def answer_text(raw: bytes, req_type: int) -> str:
    """A response as compared: its type (``ACK``, ``NACK``...), with the state for an
    ACKed STATE (``ACK MIXED``), or why it is no valid answer to ``req_type``."""
    try:
        response = parse_response(raw, RequestType(req_type))
    except ResponseError as exc:
        return f"invalid response {raw.hex()} ({exc.message})"
    if response.state is not None:
        return f"{response.type.name} {response.state.name}"
    return response.type.name


def config_fields(raw: bytes) -> dict[str, int]:
    """The compared fields of a config space; empty when ``raw`` is too short for one."""
    if len(raw) < spec.VirtioMemConfig.SPEC_SIZE:
        return {}
    cfg = spec.VirtioMemConfig.from_buffer_copy(raw[: spec.VirtioMemConfig.SPEC_SIZE])
    return {name: int(getattr(cfg, name)) for name in CONFIG_FIELDS}


def config_differences(device_raw: bytes, model_raw: bytes) -> list[Difference]:
    """Every config field that differs (``config.<field>``), values in hex."""
    device, model = config_fields(device_raw), config_fields(model_raw)
    if not device:
        size = spec.VirtioMemConfig.SPEC_SIZE
        return [Difference("config", f"{len(device_raw)} bytes", f"{size} bytes")]
    return [
        Difference(f"config.{name}", f"{device[name]:#x}", f"{model[name]:#x}")
        for name in CONFIG_FIELDS
        if device[name] != model[name]
    ]
