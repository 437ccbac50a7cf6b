"""The simulator's kernel: memory blocks in a dict, behind the ``KernelMemory`` seam.

:class:`FakeKernelMemory` stands in for ``hotplug.SysfsMemory`` in the simulator
(``vmem-guest sim``), the fuzzers and the tests: it answers like Linux's memory
hotplug (probe, online into a zone, offline, EINVAL for what Linux refuses) and
can refuse offlines, on chosen blocks or at random, as a busy kernel would.

Any memory operation can also be made to fail the way a kernel short of memory
or busy does (``FakeKernelMemory.refuse``, ``sim.pages.FakePages.refuse``): a
probe (``add_memory`` fails allocating the memmap: ENOMEM; the hotplug lock is
contended: EBUSY), an online (``online_pages``: ENOMEM, EBUSY), an offline, a
soft offline (no migration target: ENOMEM; isolation failed: EBUSY) and an
unpoison. A refused operation changes nothing, as in Linux.
"""

from __future__ import annotations

import enum
import errno
import random
from collections.abc import Callable

from vmem_guest.blocks import Zone
from vmem_guest.errors import KernelError, OfflineRefused
from vmem_guest.hotplug import KernelBlock, KernelBlockState, offline_error


class KernelOp(enum.Enum):
    """A memory operation a fake kernel can be made to refuse (the value is its name in
    a KernelError)."""

    PROBE = "probe"
    ONLINE = "online"
    OFFLINE = "offline"
    SOFT_OFFLINE = "soft offline"
    UNPOISON = "unpoison"


#: The operations of FakeKernelMemory; the others are FakePages's.
BLOCK_OPS = frozenset({KernelOp.PROBE, KernelOp.ONLINE, KernelOp.OFFLINE})


class FakeKernelMemory:
    """An in-process kernel for the simulator and the fuzzers.

    It records every probe, online and offline, refuses offlines on chosen
    blocks (``refuse_offline``) or at random (``offline_fail_rate``), and can
    online new blocks on its own like ``auto_online_blocks`` would.
    """

    def __init__(
        self,
        memory_block_size: int = 128 << 20,
        *,
        auto_online: str = "offline",
        offline_fail_rate: float = 0.0,
        rng: random.Random | None = None,
        node: int = 0,
    ) -> None:
        self.memory_block_size = memory_block_size
        self.auto_online = auto_online
        self.offline_fail_rate = offline_fail_rate
        self.rng = rng or random.Random(0)
        self.home_node = node
        self.blocks: dict[int, KernelBlock] = {}
        self.refuse_offline: set[int] = set()
        self.offline_refusals = 0
        #: Operations refused, each with its errno and the chance of a refusal per call,
        #: until :meth:`stop_refusing`.
        self.refusing: dict[KernelOp, tuple[int, float]] = {}
        #: How many times each operation was refused that way.
        self.refused: dict[KernelOp, int] = dict.fromkeys(BLOCK_OPS, 0)
        self.probes: list[int] = []
        self.boots = 1
        self.boot_memory: dict[int, KernelBlock] = {}
        #: Called with (physical address, size) whenever a block goes online: Linux
        #: re-initialises its memmap then (``online_pages``), which wipes PG_hwpoison;
        #: ``sim.pages.FakePages.block_onlined`` models it.
        self.on_online: Callable[[int, int], None] | None = None

    def refuse(self, op: KernelOp, err: int, rate: float = 1.0) -> None:
        """Refuse ``op`` (probe, online or offline) with ``err`` from now on: every call,
        or each call with probability ``rate`` (drawn from ``rng``)."""
        if op not in BLOCK_OPS:
            raise ValueError(f"{op.value} is a page operation (sim.pages.FakePages)")
        self.refusing[op] = (err, rate)

    def stop_refusing(self) -> None:
        self.refusing.clear()

    def _refusal(self, op: KernelOp) -> int | None:
        refusal = self.refusing.get(op)
        if refusal is None:
            return None
        err, rate = refusal
        if rate < 1.0 and self.rng.random() >= rate:
            return None
        self.refused[op] += 1
        return err

    def block_size(self) -> int:
        return self.memory_block_size

    def auto_online_blocks(self) -> str:
        return self.auto_online

    def block(self, index: int) -> KernelBlock:
        return self.blocks.get(index, KernelBlock(index, KernelBlockState.ABSENT))

    def state(self, index: int) -> KernelBlockState:
        return self.block(index).state

    def probe(self, phys_addr: int) -> bool:
        if phys_addr % self.memory_block_size:
            raise KernelError("probe", None, errno.EINVAL, f"{phys_addr:#x} not block aligned")
        index = phys_addr // self.memory_block_size
        if index in self.blocks:
            return False
        err = self._refusal(KernelOp.PROBE)
        if err is not None:
            raise KernelError("probe", index, err, "add_memory failed")
        self.probes.append(phys_addr)
        state = KernelBlockState.OFFLINE
        zone = Zone.NONE
        if self.auto_online.startswith("online"):
            # online_kernel lands in ZONE_NORMAL; online (kernel's choice) as online(AUTO).
            zone = Zone.KERNEL if self.auto_online == "online_kernel" else Zone.MOVABLE
            state = KernelBlockState.ONLINE
            self._onlined(index)
        self.blocks[index] = KernelBlock(index, state, zone, self.home_node)
        return True

    def _onlined(self, index: int) -> None:
        if self.on_online is not None:
            self.on_online(index * self.memory_block_size, self.memory_block_size)

    def node(self, index: int) -> int:
        return self.block(index).node

    def online(self, index: int, zone: Zone) -> None:
        current = self.block(index)
        if current.state is KernelBlockState.ABSENT:
            raise KernelError("online", index, errno.ENOENT)
        if current.state is KernelBlockState.ONLINE:
            raise KernelError("online", index, errno.EINVAL, "already online")
        err = self._refusal(KernelOp.ONLINE)
        if err is not None:
            raise KernelError("online", index, err)
        landed = Zone.MOVABLE if zone is Zone.AUTO else zone
        self._onlined(index)
        self.blocks[index] = KernelBlock(index, KernelBlockState.ONLINE, landed, self.home_node)

    def offline(self, index: int) -> None:
        current = self.block(index)
        if current.state is KernelBlockState.ABSENT:
            raise KernelError("offline", index, errno.ENOENT)
        if current.state is KernelBlockState.OFFLINE:
            # Linux: device_offline() of an offline device returns 1, state_store -> EINVAL.
            raise KernelError("offline", index, errno.EINVAL, "already offline")
        refused = index in self.refuse_offline or (
            self.offline_fail_rate > 0 and self.rng.random() < self.offline_fail_rate
        )
        if refused:
            self.offline_refusals += 1
            raise OfflineRefused("offline", index, errno.EBUSY)
        err = self._refusal(KernelOp.OFFLINE)
        if err is not None:
            raise offline_error(index, err)
        self.blocks[index] = KernelBlock(index, KernelBlockState.OFFLINE, Zone.NONE, self.home_node)

    def present_blocks(self) -> list[int]:
        return sorted(self.blocks)

    def boot_id(self) -> str:
        return f"fake-boot-{self.boots}"

    def add_boot_memory(self, start: int, size: int) -> None:
        """Online ``[start, start + size)`` as the kernel's own boot memory (ZONE_NORMAL)."""
        first, count = start // self.memory_block_size, size // self.memory_block_size
        for index in range(first, first + count):
            block = KernelBlock(index, KernelBlockState.ONLINE, Zone.KERNEL, self.home_node)
            self.boot_memory[index] = self.blocks[index] = block

    def reboot(self) -> None:
        """A guest reboot: hotplugged blocks are gone, boot memory is back online."""
        self.blocks = dict(self.boot_memory)
        self.refuse_offline.clear()
        self.refusing.clear()
        self.boots += 1
