"""A device that misbehaves: the device model behind a lying config space and a faulty ring.

The agent must never trust the device (docs/design.md section 5, spec 5.15.4 and
5.15.6): every config value and every response is checked, and a device that
breaks the rules is refused (at attach) or no longer touched (later), with a
clear error. :class:`HostileChannel` is how the tests show it. It runs the
honest :class:`~vmem_guest.sim.device_model.DeviceModel` and, from a chosen
request on, misbehaves in one way (:class:`Fault`): in the config space it
serves, in the responses it writes, or in the used ring. Requests travel over
a real :class:`~vmem_guest.transport.virtqueue.Virtqueue` (the agent's own
ring code) to a :class:`~vmem_guest.sim.ring.RingDevice`, so used-ring faults
meet the same checks as with QEMU.

It also keeps what a hostile device cannot hide: which device blocks the
driver was told, by an ACK it accepted, are plugged (:attr:`acked_plugged`).
The safety promise under test is that no online memory block covers a block
outside that set.
"""

from __future__ import annotations

from vmem_guest import spec
from vmem_guest.hotplug import KernelBlockState
from vmem_guest.sim.channel import SimChannel
from vmem_guest.sim.device_model import DeviceModel
from vmem_guest.sim.faults import Fault
from vmem_guest.sim.kernel import FakeKernelMemory
from vmem_guest.sim.ring import ring_pair
from vmem_guest.spec import RequestType, ResponseType

_U64 = 1 << 64


class HostileChannel(SimChannel):
    """A :class:`SimChannel` whose device starts misbehaving after ``honest_requests``.

    A config fault that starts in the middle of a run raises a config-change
    interrupt, as a device announcing new values would.

    Attributes:
        fault: how it misbehaves.
        honest_requests: requests answered honestly first (0: lie from the start).
        boot_memory_addr: where boot memory is (for REGION_OVERLAPS_BOOT).
        acked_plugged: device blocks (indices from ``addr``) the driver accepted an
            ACKed PLUG for and has not had an ACKed UNPLUG or UNPLUG_ALL for since.
        answered: requests that reached the device.
    """

    def __init__(
        self,
        model: DeviceModel,
        fault: Fault,
        *,
        honest_requests: int = 0,
        boot_memory_addr: int = 0,
        timeout: float = 0.05,
    ) -> None:
        super().__init__(model)
        self.fault = fault
        self.honest_requests = honest_requests
        self.boot_memory_addr = boot_memory_addr
        self.timeout = timeout
        self.acked_plugged: set[int] = set()
        self.answered = 0
        self.queue, self.ring = ring_pair(self._answer)

    @property
    def active(self) -> bool:
        return self.answered >= self.honest_requests

    # --- config space -----------------------------------------------------------

    def read_config(self) -> bytes:
        raw = super().read_config()
        if not (self.active and self.fault.in_config):
            return raw
        cfg = spec.VirtioMemConfig.from_buffer_copy(raw)
        self._lie(cfg)
        return bytes(cfg)

    def _lie(self, cfg: spec.VirtioMemConfig) -> None:
        fault, block = self.fault, cfg.block_size
        if fault is Fault.BLOCK_SIZE_ZERO:
            cfg.block_size = 0
        elif fault is Fault.BLOCK_SIZE_NOT_POW2:
            cfg.block_size = block * 3
        elif fault is Fault.SIZE_NOT_MULTIPLE:
            cfg.requested_size += block // 2
        elif fault is Fault.REGION_OVERFLOW:
            cfg.addr = _U64 - block
        elif fault is Fault.REGION_OVERLAPS_BOOT:
            cfg.addr = self.boot_memory_addr
        else:  # USABLE_SHRINKS: cut the usable region below the plugged memory
            plugged = self.model.plugged_blocks()
            cfg.usable_region_size = max(plugged, default=0) * block
            cfg.requested_size = min(cfg.requested_size, cfg.usable_region_size)

    # --- requests -----------------------------------------------------------------

    def submit(self, request: bytes) -> bytes:
        with self.lock:
            ring = self.ring
            ring.used_id = ring.used_len = None
            ring.silent = False
            if self.active:
                if self.fault is Fault.WRONG_USED_ID:
                    ring.used_id = 7
                elif self.fault is Fault.WRONG_USED_LEN:
                    ring.used_len = 4
                elif self.fault is Fault.NEVER_ANSWERS:
                    ring.silent = True
            response = self.queue.submit(request, self.timeout)
        self._note_ack(request, response)
        return response

    def _answer(self, request: bytes) -> bytes:
        """The device side: the model answers, then the fault (if active) rewrites it."""
        was_active = self.active
        response = self.model.submit(request)
        self.answered += 1
        if was_active:
            response = self._rewrite(request, response)
        elif self.active and self.fault.in_config:
            self._config_interrupt()  # the lie starts now: announce "new" values
        return response

    def _rewrite(self, request: bytes, response: bytes) -> bytes:
        req_type = spec.VirtioMemReq.from_buffer_copy(request).type
        if self.fault is Fault.UNKNOWN_RESPONSE:
            return bytes(spec.VirtioMemResp(type=7))
        if self.fault is Fault.UNKNOWN_STATE and req_type == RequestType.STATE:
            return spec.encode_response(ResponseType.ACK, 9)
        if self.fault is Fault.ERROR_ANSWER:
            return spec.encode_response(ResponseType.ERROR)
        return response

    def _note_ack(self, request: bytes, response: bytes) -> None:
        """Track the plugged blocks the driver has been told of (only well-formed ACKs)."""
        req = spec.VirtioMemReq.from_buffer_copy(request)
        resp = spec.VirtioMemResp.from_buffer_copy(response)
        if resp.type != ResponseType.ACK:
            return
        first = (req.addr - self.model.addr) // self.model.block_size
        blocks = set(range(first, first + req.nb_blocks))
        if req.type == RequestType.PLUG:
            self.acked_plugged |= blocks
        elif req.type == RequestType.UNPLUG:
            self.acked_plugged -= blocks
        elif req.type == RequestType.UNPLUG_ALL:
            self.acked_plugged.clear()

    def unacked_online(self, kernel: FakeKernelMemory) -> list[int]:
        """Online memory blocks in the region over a block the driver was not ACKed.

        The safety promise: this is always empty, whatever the device does.
        """
        model, size = self.model, kernel.memory_block_size
        per_block = max(1, size // model.block_size)
        region = range(model.addr // size, (model.addr + model.region_size) // size)
        bad = []
        for index, block in kernel.blocks.items():
            if block.state is not KernelBlockState.ONLINE or index not in region:
                continue
            first = (index * size - model.addr) // model.block_size
            if not set(range(first, first + per_block)) <= self.acked_plugged:
                bad.append(index)
        return bad
