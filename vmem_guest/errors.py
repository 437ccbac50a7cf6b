"""The one exception hierarchy of vmem_guest.

Every error the package raises derives from :class:`VmemError` and carries
structured fields (never only a message), so the CLI can print one line and
the agent can decide what to do without parsing text::

    VmemError
     +-- UsageError            bad input from a user (CLI argument, size, address)
     +-- DeviceError           the device, or what it told us, is unusable
     |    +-- ConfigError      config space violates the spec (bounds, alignment)
     |    +-- ResponseError    a response we cannot accept (unknown type, ERROR)
     |    +-- DeviceBroken     the device is marked broken; stop touching it
     |    +-- DeviceTimeout    no answer within the timeout
     +-- TransportError        VFIO / virtio-pci / virtqueue plumbing failed
     |    +-- IoctlError       one ioctl failed (name, errno)
     |    +-- PagemapRefused   pagemap could not be read now (ENOMEM...): retry later
     +-- KernelError           a sysfs memory-hotplug write or read failed (block, errno)
     |    +-- OfflineRefused   the kernel refused to offline a block (EBUSY and friends)
     |    +-- PageRefused      the kernel would not give up one page (soft offline)
     +-- TrackerError          the state file is unusable (corrupt, foreign, locked)
     |    +-- TrackerLocked    another process owns the tracker
     +-- SafetyError           an action would break a safety invariant (docs/design.md s.5)
     |    +-- HolesKeepBlockOnline  a block with taken subblocks is never offlined (block)
     |    +-- HibernationRefused  device memory cannot be given back before a hibernation
     +-- RequirementMissing    the guest lacks what the agent needs (docs/requirements.md)
     +-- Mismatch              fuzzing: the device and the model disagree (after, differences)
     +-- DeviceLost            fuzzing: the device under test stopped answering (reason, after)

Mismatch and DeviceLost carry the request sequence that led to them, so they
are defined beside it, in :mod:`vmem_guest.conformance.findings`; only the
conformance fuzzer raises them.
"""

from __future__ import annotations

import errno as errno_mod
import os


class VmemError(Exception):
    """Root of every vmem_guest error.

    Attributes:
        message: one human-readable line.
        fields: structured context (addresses, errnos, names) for logs and ``--json``.
    """

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields: dict[str, object] = fields

    def __str__(self) -> str:
        return self.message

    def as_dict(self) -> dict[str, object]:
        """A JSON-friendly view: ``{"error": class, "message": ..., **fields}``."""
        return {"error": type(self).__name__, "message": self.message, **self.fields}


class UsageError(VmemError):
    """Bad input from a user: the command cannot run as asked."""


class DeviceError(VmemError):
    """The device, or something it told us, cannot be used."""


class ConfigError(DeviceError):
    """The device config space violates the spec (bounds, alignment, power of two)."""


class ResponseError(DeviceError):
    """A response the driver cannot accept: unknown type, ERROR, bad length or id."""


class DeviceBroken(DeviceError):
    """The device was marked broken after an ERROR or a protocol violation."""


class DeviceTimeout(DeviceError):
    """The device did not answer a request within the timeout."""


class TransportError(VmemError):
    """VFIO, virtio-pci or virtqueue plumbing failed."""


class IoctlError(TransportError):
    """One ioctl failed.

    Attributes (in ``fields``): ``ioctl`` (its name), ``errno``.
    """

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        name = errno_mod.errorcode.get(err, str(err))
        text = f"{ioctl} failed: {name} ({os.strerror(err)})"
        if detail:
            text = f"{text}: {detail}"
        super().__init__(text, ioctl=ioctl, errno=err)
        self.ioctl = ioctl
        self.errno = err


class PagemapRefused(TransportError):
    """The kernel could not open or read ``/proc/self/pagemap`` just now (ENOMEM,
    EAGAIN, EINTR): an allocation of its own failed (``pagemap_read`` allocates a
    buffer on every read), which says nothing about the pages. The no-IOMMU check
    before a request could not run, so the request was not sent: try again later,
    as after a BUSY (docs/safety.md, "Kernel faults"). A page that did move is a
    plain TransportError and stays fatal.

    Attributes (in ``fields``): ``op`` ("open" or "read"), ``errno``, ``path``.
    """

    def __init__(self, op: str, err: int, path: str) -> None:
        name = errno_mod.errorcode.get(err, str(err))
        super().__init__(
            f"{op} {path} failed: {name} ({os.strerror(err)}); the DMA pages are checked"
            " again before the next request",
            op=op,
            errno=err,
            path=path,
        )
        self.op = op
        self.errno = err


class KernelError(VmemError):
    """A memory-hotplug operation through sysfs failed.

    Attributes (in ``fields``): ``op``, ``block`` (memory block index or None),
    ``errno``.
    """

    def __init__(self, op: str, block: int | None, err: int, detail: str = "") -> None:
        where = f" memory{block}" if block is not None else ""
        name = errno_mod.errorcode.get(err, str(err))
        text = f"{op}{where} failed: {name} ({os.strerror(err)})"
        if detail:
            text = f"{text}: {detail}"
        super().__init__(text, op=op, block=block, errno=err)
        self.op = op
        self.block = block
        self.errno = err


class OfflineRefused(KernelError):
    """The kernel refused to offline a memory block (EBUSY, EAGAIN, ENOMEM...)."""


class PageRefused(KernelError):
    """The kernel would not take one page out of use (``soft_offline_page``).

    EBUSY (migration or isolation failed, a race lost), EIO (unmovable: slab,
    page tables, reserved), ENOMEM (no migration target), or a page that stayed
    unpoisoned after the rounds a take allows. ``block`` holds the page frame
    number's memory block when known; ``fields["pfn"]`` the page.
    """

    def __init__(self, pfn: int, err: int, detail: str = "", block: int | None = None) -> None:
        super().__init__(f"soft offline of pfn {pfn:#x}", block, err, detail)
        self.fields["pfn"] = pfn
        self.pfn = pfn


class TrackerError(VmemError):
    """The tracker file cannot be used: corrupt, from another device, or unsafe."""


class TrackerLocked(TrackerError):
    """Another process already owns the tracker (holds its exclusive lock)."""


class SafetyError(VmemError):
    """An action would break a safety invariant (docs/design.md section 5)."""


class HolesKeepBlockOnline(SafetyError):
    """A memory block holding taken subblocks (holes, or subblocks being taken) is never
    offlined (docs/design.md section 2 and 5.1): onlining it again would free every
    page, holes included, and the poisoned pages of a block of holes only would keep
    HardwareCorrupted raised (6.1) or the block from coming online again (6.2+). It
    stays online until growth gives its holes back.

    Attributes (in ``fields``): ``block``, ``taken`` and ``plugged`` (its subblocks
    taken and plugged).
    """

    def __init__(self, block: int, taken: int, plugged: int) -> None:
        what = "only holes" if not plugged else f"{taken} taken subblocks and {plugged} plugged"
        super().__init__(
            f"memory{block} holds {what}: it is never offlined (it stays online until"
            " growth gives its holes back)",
            block=block,
            taken=taken,
            plugged=plugged,
        )
        self.block = block


class HibernationRefused(SafetyError):
    """Device memory cannot be given back before a hibernation (docs/lifecycle.md)."""


class RequirementMissing(VmemError):
    """The guest lacks something the agent needs (:mod:`vmem_guest.requirements`).

    Attributes (in ``fields``): ``requirement``, the name ``vmem-guest doctor`` lists it by.
    """
