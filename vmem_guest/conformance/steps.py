"""One concrete input of a sequence, :class:`Step`, and its JSON form.

A step is what the device under test and the model receive: a request (sent
to both), a malformed request (the model only) or a host resize. A saved
failure is a list of steps, so :meth:`Step.as_dict` and :meth:`Step.from_dict`
are the regression-file format.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from vmem_guest import spec
from vmem_guest.spec import RequestType

#: ``addr`` is a le64 (spec 5.15.6): every generated address is taken modulo 2**64.
TOP = 1 << 64

#: What a step does: a request to both sides, a malformed request to the model
#: only, or a host resize of ``requested_size``.
Op = Literal["request", "malformed", "resize"]

PLUG = int(RequestType.PLUG)
UNPLUG = int(RequestType.UNPLUG)
UNPLUG_ALL = int(RequestType.UNPLUG_ALL)
STATE = int(RequestType.STATE)


def request_name(req_type: int) -> str:
    """``PLUG`` ... ``STATE`` for a request type, ``type=N`` for any other value."""
    try:
        return RequestType(req_type).name
    except ValueError:
        return f"type={req_type}"


@dataclasses.dataclass(frozen=True)
class Step:
    """One concrete input.

    ``req_type``, ``addr`` and ``nb_blocks`` are the request's fields, sent as
    they are (a generated request may be invalid on purpose); ``length`` is how
    many of its 24 bytes are sent; ``size`` is a resize's new ``requested_size``.
    ``kind`` says how the step was generated (``valid``, ``misaligned``,
    ``cleanup``...), for people reading a report.
    """

    op: Op
    req_type: int = 0
    addr: int = 0
    nb_blocks: int = 0
    length: int = spec.VirtioMemReq.SPEC_SIZE
    size: int = 0
    kind: str = ""

    def raw(self) -> bytes:
        """The request bytes, truncated to ``length``; the type is written as it is,
        known or not (``encode_request`` takes only known types)."""
        full = bytearray(spec.encode_request(RequestType.PLUG, self.addr, self.nb_blocks))
        full[0:2] = self.req_type.to_bytes(2, "little")
        return bytes(full[: self.length])

    def describe(self) -> str:
        """One line for a report: ``PLUG addr=0x... nb_blocks=N [kind]``."""
        if self.op == "resize":
            return f"host resize requested-size={self.size:#x}"
        name = request_name(self.req_type)
        text = (
            name
            if self.req_type == UNPLUG_ALL
            else f"{name} addr={self.addr:#x} nb_blocks={self.nb_blocks}"
        )
        if self.op == "malformed":
            text += f" ({self.length} bytes, model only)"
        return f"{text} [{self.kind}]" if self.kind else text

    def as_dict(self) -> dict[str, Any]:
        """The step's fields, for JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Step:
        """The step of :meth:`as_dict`'s output; unknown keys are ignored."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})
