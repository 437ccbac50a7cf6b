"""The kernel's memory-hotplug interface, as the agent needs it.

:class:`KernelMemory` is the seam: :class:`SysfsMemory` is the real thing over
``/sys/devices/system/memory`` (any root, so tests can point it at a fake
tree), ``sim.kernel.FakeKernelMemory`` is an in-process model for the simulator
and the fuzzers. Both map failures to :class:`~vmem_guest.errors.KernelError`;
a refused offline is :class:`~vmem_guest.errors.OfflineRefused`.

Facts (docs/protocol.md section 4, Linux memory-hotplug.rst):

* ``probe`` adds one memory block at a block-aligned physical address; EEXIST
  means it is already present. The kernel checks nothing else.
* ``memoryN/state`` takes ``online``, ``online_movable``, ``online_kernel``,
  ``offline``; offlining may fail with EBUSY (unmovable pages).
* there is no way to remove a memory block from userspace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import functools
import os
import signal
import threading
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

from vmem_guest._linux.procfs import MEMINFO, PROC_ROOT, meminfo_bytes
from vmem_guest._linux.sysfs import SYSFS_ROOT, read_value, write_word
from vmem_guest.blocks import Zone
from vmem_guest.errors import KernelError, OfflineRefused

SYSFS_MEMORY = SYSFS_ROOT / "devices/system/memory"
#: A random id the kernel draws at every boot.
BOOT_ID = PROC_ROOT / "sys/kernel/random/boot_id"

#: Seconds one offline may take before it is interrupted and counted as refused.
DEFAULT_OFFLINE_TIMEOUT = 10.0
#: Memory that must stay available after an offline (on top of the block itself).
OFFLINE_RESERVE = 64 << 20
#: errnos with which the kernel refuses an offline that may succeed later.
RETRYABLE_OFFLINE_ERRNOS = frozenset(
    {errno.EBUSY, errno.EAGAIN, errno.ENOMEM, errno.EINTR, errno.ETIMEDOUT}
)


class KernelBlockState(enum.Enum):
    """A memory block as the kernel sees it."""

    ABSENT = "absent"  # no memoryN directory: never probed
    OFFLINE = "offline"
    ONLINE = "online"


@dataclasses.dataclass(frozen=True)
class KernelBlock:
    """What sysfs says about one memory block."""

    index: int
    state: KernelBlockState
    zone: Zone = Zone.NONE
    node: int = -1


class KernelMemory(Protocol):
    """Operations on Linux memory blocks (indices are the kernel's ``memoryN``)."""

    def block_size(self) -> int:
        """``block_size_bytes``: the memory block size in bytes."""

    def auto_online_blocks(self) -> str:
        """``auto_online_blocks``: what the kernel does with newly added blocks."""

    def block(self, index: int) -> KernelBlock:
        """The state of memory block ``index`` (ABSENT if not present)."""

    def state(self, index: int) -> KernelBlockState:
        """Only the state of block ``index``: one read, no zone or node."""

    def probe(self, phys_addr: int) -> bool:
        """Add the memory block at ``phys_addr``; False if it was already present."""

    def online(self, index: int, zone: Zone) -> None:
        """Online block ``index`` into ``zone``."""

    def node(self, index: int) -> int:
        """The NUMA node of present block ``index`` (-1 unknown)."""

    def offline(self, index: int) -> None:
        """Offline block ``index``; OfflineRefused when the kernel says no."""

    def present_blocks(self) -> list[int]:
        """Indices of every present memory block (online or offline), sorted."""

    def boot_id(self) -> str:
        """An id of the running boot: it changes when the guest reboots."""


def offline_error(index: int, err: int) -> KernelError:
    """The error for an offline of block ``index`` that failed with ``err``.

    The kernel's refusals that may be lifted later (busy, unmovable pages) are
    :class:`OfflineRefused`; anything else (EINVAL: already offline...) a plain
    :class:`KernelError`.
    """
    if err in RETRYABLE_OFFLINE_ERRNOS:
        return OfflineRefused("offline", index, err)
    return KernelError("offline", index, err)


def _zone_from_valid_zones(text: str) -> Zone:
    """An online block's ``valid_zones`` names the one zone it is in."""
    first = text.split()[0] if text.split() else ""
    if first == "Movable":
        return Zone.MOVABLE
    if first in ("Normal", "DMA32", "DMA"):
        return Zone.KERNEL
    return Zone.AUTO


def _is_memory_block_name(name: str) -> bool:
    """``memoryN`` (not ``memory_failure`` or the like)."""
    return name.startswith("memory") and name[6:].isdigit()


class _DeadlinePassed(Exception):
    """Raised by the SIGALRM handler of :func:`_deadline`."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Interrupt a blocking system call after ``seconds`` (main thread only)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: types.FrameType | None) -> None:
        raise _DeadlinePassed

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class SysfsMemory:
    """KernelMemory over a sysfs memory directory (``root``)."""

    def __init__(
        self,
        root: Path = SYSFS_MEMORY,
        offline_timeout: float = DEFAULT_OFFLINE_TIMEOUT,
        boot_id_file: Path = BOOT_ID,
        meminfo: Path = MEMINFO,
        offline_reserve: int = OFFLINE_RESERVE,
    ) -> None:
        self.root = root
        self.boot_id_file = boot_id_file
        self.meminfo = meminfo
        self.offline_reserve = offline_reserve
        self.offline_timeout = offline_timeout
        self._block_size: int | None = None  # fixed at boot
        self._nodes: dict[int, int] = {}  # a present block never changes node

    def _read(self, rel: str, block: int | None = None) -> str:
        try:
            return read_value(self.root / rel)
        except OSError as exc:
            raise KernelError(f"read {rel}", block, exc.errno or errno.EIO) from exc

    def _write(self, rel: str, word: str, error: Callable[[int], KernelError]) -> None:
        """Write ``word`` to ``rel``; a failure raises ``error(errno)``."""
        try:
            write_word(self.root / rel, word)
        except OSError as exc:
            raise error(exc.errno or errno.EIO) from exc

    def block_size(self) -> int:
        if self._block_size is None:
            self._block_size = self._read_block_size()
        return self._block_size

    def _read_block_size(self) -> int:
        text = self._read("block_size_bytes")
        try:
            size = int(text, 16)
        except ValueError:
            raise KernelError("read block_size_bytes", None, errno.EINVAL, text) from None
        if size <= 0 or size & (size - 1):
            raise KernelError("read block_size_bytes", None, errno.EINVAL, f"{size:#x}")
        return size

    def auto_online_blocks(self) -> str:
        return self._read("auto_online_blocks")

    def has_probe(self) -> bool:
        """True when the kernel has CONFIG_ARCH_MEMORY_PROBE (the ``probe`` file)."""
        return (self.root / "probe").exists()

    def block(self, index: int) -> KernelBlock:
        state = self.state(index)
        if state is KernelBlockState.ABSENT:
            return KernelBlock(index, state)
        if state is KernelBlockState.OFFLINE:
            return KernelBlock(index, state, Zone.NONE, self.node(index))
        zone = _zone_from_valid_zones(self._read(f"memory{index}/valid_zones", index))
        return KernelBlock(index, state, zone, self.node(index))

    def state(self, index: int) -> KernelBlockState:
        name = f"memory{index}"
        try:
            # A str path, not pathlib: this is on the path of every block.
            state_text = read_value(f"{self.root}/{name}/state")
        except FileNotFoundError as exc:
            if not (self.root / name).is_dir():
                return KernelBlockState.ABSENT
            raise KernelError(f"read {name}/state", index, errno.ENOENT) from exc
        except OSError as exc:
            raise KernelError(f"read {name}/state", index, exc.errno or errno.EIO) from exc
        return KernelBlockState.ONLINE if state_text == "online" else KernelBlockState.OFFLINE

    def online_blocks_in(self, addr: int, size: int) -> list[int]:
        """The online memory blocks overlapping [addr, addr + size)."""
        block_size = self.block_size()
        first, last = addr // block_size, (addr + size - 1) // block_size
        return [
            index
            for index in range(first, last + 1)
            if self.state(index) is KernelBlockState.ONLINE
        ]

    def node(self, index: int) -> int:
        if index not in self._nodes:
            self._nodes[index] = self._read_node(index)
        return self._nodes[index]

    def _read_node(self, index: int) -> int:
        """The ``nodeN`` link in ``memoryN`` (one getdents, no pathlib glob)."""
        with contextlib.suppress(OSError):
            for name in os.listdir(f"{self.root}/memory{index}"):
                if name.startswith("node") and name[4:].isdigit():
                    return int(name[4:])
        return -1

    def probe(self, phys_addr: int) -> bool:
        error = functools.partial(KernelError, "probe", phys_addr // self.block_size())
        try:
            self._write("probe", f"{phys_addr:#x}", error)
        except KernelError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise
        return True

    def online(self, index: int, zone: Zone) -> None:
        error = functools.partial(KernelError, "online", index)
        self._write(f"memory{index}/state", zone.sysfs_word, error)

    def offline(self, index: int) -> None:
        """Offline with a deadline: Linux's offline_pages() retries page migration
        until a signal arrives, so a block whose pages cannot move elsewhere would
        hold the agent forever. SIGALRM at the deadline makes the write fail with
        EINTR; we report that as a refusal (ETIMEDOUT), to be retried later.

        Not even tried (ENOMEM) when MemAvailable could not take the whole block
        plus a reserve: while offline_pages() retries, the block is isolated and
        its pages look for room, and a guest with none left OOM-kills its
        biggest process (seen in the pressure test)."""
        self._check_room_for(index)
        error = functools.partial(offline_error, index)
        try:
            with _deadline(self.offline_timeout):
                self._write(f"memory{index}/state", "offline", error)
        except _DeadlinePassed:
            if self.block(index).state is KernelBlockState.OFFLINE:
                return  # the alarm raced with a successful offline
            raise OfflineRefused(
                "offline",
                index,
                errno.ETIMEDOUT,
                f"pages did not migrate in {self.offline_timeout} s",
            ) from None

    def _check_room_for(self, index: int) -> None:
        available = self.mem_available()
        needed = self.block_size() + self.offline_reserve
        if available is not None and available < needed:
            raise OfflineRefused(
                "offline",
                index,
                errno.ENOMEM,
                f"MemAvailable {available >> 20} MiB < block + reserve {needed >> 20} MiB",
            )

    def mem_available(self) -> int | None:
        """MemAvailable from /proc/meminfo in bytes (None if it cannot be read)."""
        return meminfo_bytes("MemAvailable", self.meminfo)

    def present_blocks(self) -> list[int]:
        try:
            names = os.listdir(self.root)
        except OSError as exc:
            raise KernelError(f"list {self.root}", None, exc.errno or errno.EIO) from exc
        return sorted(int(name[6:]) for name in names if _is_memory_block_name(name))

    def boot_id(self) -> str:
        try:
            return read_value(self.boot_id_file)
        except OSError as exc:
            raise KernelError(f"read {self.boot_id_file}", None, exc.errno or errno.EIO) from exc

    def online_blocks(self) -> Iterable[int]:
        """Indices of every online memory block (for status and checks)."""
        for entry in self.root.glob("memory[0-9]*"):
            index = int(entry.name[6:])
            if self.block(index).state is KernelBlockState.ONLINE:
                yield index
