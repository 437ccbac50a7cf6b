"""What the CLI's device commands do: find, bind, attach, run the agent, manual operations.

``cli.py`` parses and prints; this module does the work, so each command is a
function with typed arguments that tests can call too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmem_guest import binding, control, kexec_exposure, manual, metrics, pci, planner, requirements
from vmem_guest._linux.procfs import memtotal_bytes
from vmem_guest._linux.timerfd import ResumeWatch
from vmem_guest.agent import Agent, Listeners, StateListener
from vmem_guest.attach import Attached, attach
from vmem_guest.control import ControlServer, Emit
from vmem_guest.errors import (
    DeviceError,
    RequirementMissing,
    TrackerLocked,
    UsageError,
    VmemError,
)
from vmem_guest.hotplug import DEFAULT_OFFLINE_TIMEOUT, SysfsMemory
from vmem_guest.inhibit import SuspendGuard
from vmem_guest.online_path import auto_online_while_serving
from vmem_guest.pages import ProcPages
from vmem_guest.pci_events import PciMonitor
from vmem_guest.relief import ProcMemorySignals, Relief
from vmem_guest.sdnotify import Notifier
from vmem_guest.sdstatus import SystemdStatus
from vmem_guest.transport.channel import PciChannel
from vmem_guest.transport.dma import no_unevictable_compaction
from vmem_guest.transport.function import Access
from vmem_guest.transport.uio import UIO_PCI_GENERIC

log = logging.getLogger("vmem_guest.service")


@dataclasses.dataclass(frozen=True)
class RunOptions:
    state_dir: Path
    policy: planner.Policy = planner.DEFAULT_POLICY
    manual: bool = False
    allow_noiommu: bool = False
    devices: tuple[str, ...] = ()
    offline_timeout: float = DEFAULT_OFFLINE_TIMEOUT
    metrics_file: Path | None = None


def _kernel(offline_timeout: float = DEFAULT_OFFLINE_TIMEOUT) -> SysfsMemory:
    """The memory-hotplug interface, refused (RequirementMissing, in the words of
    ``vmem-guest doctor``) when not root or without the ``probe`` file."""
    uid = os.geteuid()
    if uid != 0:
        raise RequirementMissing(
            requirements.ROOT.refusal(requirements.not_root(uid)),
            requirement=requirements.ROOT.name,
        )
    kernel = SysfsMemory(offline_timeout=offline_timeout)
    if not kernel.has_probe():
        raise RequirementMissing(
            requirements.PROBE.refusal(requirements.no_probe(str(kernel.root / "probe"))),
            requirement=requirements.PROBE.name,
        )
    return kernel


def select_devices(
    devices: tuple[str, ...], *, wait_for_hotplug: bool = False
) -> list[pci.VirtioMemPci]:
    """The functions named in ``devices`` (``--device``), or every virtio-mem function.

    UsageError when a named one is malformed, absent or not virtio-mem
    (:func:`pci.get_device`), and when none is named and none is found, unless
    ``wait_for_hotplug`` (the agent, watching PCI uevents): then the empty list.
    """
    if devices:
        return [pci.get_device(bdf) for bdf in devices]
    found = pci.list_devices()
    if not found:
        if not wait_for_hotplug:
            raise UsageError("no virtio-mem device (1af4:1058) found")
        log.info("no virtio-mem device (1af4:1058) yet: waiting for one to be hot-plugged")
    return found


def bind_device(dev: pci.VirtioMemPci, allow_noiommu: bool) -> Access:
    """Bind ``dev`` to vfio-pci; the VFIO mode its group can then be opened in. A
    device already bound to uio_pci_generic (``bind --uio``) stays there: ``uio``.

    A device the in-kernel virtio_mem driver holds is refused (RequirementMissing):
    that driver owns the memory it plugged (docs/requirements.md)."""
    owner = dev.virtio_driver()
    if owner is not None:
        raise RequirementMissing(
            requirements.KERNEL_DRIVER.refusal(requirements.driven_by(dev.bdf, owner)),
            requirement=requirements.KERNEL_DRIVER.name,
            bdf=dev.bdf,
        )
    if dev.driver == UIO_PCI_GENERIC:
        return "uio"
    binding.bind(dev.bdf, allow_noiommu=allow_noiommu)
    return pci.get_device(dev.bdf).vfio_mode


def resolve_policy(policy: planner.Policy, memtotal: Callable[[], int]) -> planner.Policy:
    """``policy`` with what it leaves to be measured filled in: the kernel memory the
    ``auto`` ratio is based on is MemTotal at start unless the caller gave it (even
    when what it gave equals a default)."""
    if policy.kernel_memory_bytes is None:
        return dataclasses.replace(policy, kernel_memory_bytes=memtotal())
    return policy


#: What to do with a device refused for what it says: raise, or log and skip it.
OnRefused = Callable[[str, DeviceError], None]


def raise_refusal(bdf: str, exc: DeviceError) -> None:
    """Manual commands: a refused device is an error."""
    raise exc


def skip_refusal(bdf: str, exc: DeviceError) -> None:
    """The agent: a refused device is logged and left alone; the others are served."""
    log.error("%s: device refused, not serving it: %s", bdf, exc.message)


@dataclasses.dataclass
class DeviceAttacher:
    """Binds and attaches devices, at start and when one is hot-plugged later, into
    one list (``attached``) whose regions every no-IOMMU DMA buffer must stay out of."""

    state_dir: Path
    policy: planner.Policy
    allow_noiommu: bool
    kernel: SysfsMemory
    pages: ProcPages
    attached: list[Attached] = dataclasses.field(default_factory=list)

    def attach(self, dev: pci.VirtioMemPci) -> Attached:
        """Bind and attach ``dev`` (DeviceError when it is refused for what it says)."""
        mode = bind_device(dev, self.allow_noiommu)
        known = [(a.driver.geometry.addr, a.driver.geometry.end) for a in self.attached]
        item = attach(
            dev.bdf,
            mode=mode,
            state_dir=self.state_dir,
            kernel=self.kernel,
            policy=self.policy,
            guard_ranges=known,
            pages=self.pages,
        )
        item.driver.relief = Relief(ProcMemorySignals(), item.driver.clock)
        self.attached.append(item)
        self.guard_dma()
        return item

    def guard_dma(self) -> None:
        """No-IOMMU DMA pages must stay outside every device's region, not only their own."""
        regions = [(a.driver.geometry.addr, a.driver.geometry.end) for a in self.attached]
        for item in self.attached:
            if isinstance(item.channel, PciChannel):
                item.channel.guard_ranges[:] = regions
                if item.channel.buffer is not None:
                    item.channel.buffer.check_outside(regions)

    def serves(self, bdf: str) -> bool:
        return any(a.bdf == bdf and not a.closed for a in self.attached)

    def close(self) -> None:
        for item in self.attached:
            item.close()
        self.pages.close()


@contextlib.contextmanager
def attached_devices(
    devices: list[pci.VirtioMemPci],
    *,
    state_dir: Path,
    policy: planner.Policy,
    allow_noiommu: bool,
    offline_timeout: float = DEFAULT_OFFLINE_TIMEOUT,
    on_refused: OnRefused = raise_refusal,
) -> Iterator[DeviceAttacher]:
    """Bind and attach ``devices``; release them all (and any attached later through
    the yielded attacher) on the way out.

    A device refused for what it says (DeviceError: a config that breaks the spec, a
    region over boot memory, a bad answer during recovery) goes to ``on_refused``:
    :func:`raise_refusal` (the default, manual commands) or :func:`skip_refusal` (the
    agent). If every device is refused, the first refusal is raised.
    """
    attacher = DeviceAttacher(
        state_dir=state_dir,
        policy=resolve_policy(policy, memtotal_bytes),
        allow_noiommu=allow_noiommu,
        kernel=_kernel(offline_timeout),
        pages=ProcPages(),
    )
    refused: list[DeviceError] = []
    try:
        for dev in devices:
            try:
                attacher.attach(dev)
            except DeviceError as exc:
                on_refused(dev.bdf, exc)
                refused.append(exc)
        if refused and not attacher.attached:
            raise refused[0]
        yield attacher
    finally:
        attacher.close()


class HotplugArrivals:
    """:class:`~vmem_guest.agent.Arrivals` from the kernel's PCI uevents: each
    virtio-mem function added and not yet served is bound and attached."""

    def __init__(
        self,
        monitor: PciMonitor,
        attacher: DeviceAttacher,
        lookup: Callable[[str], pci.VirtioMemPci] = pci.get_device,
    ) -> None:
        """``lookup``: the virtio-mem function at an address (UsageError if it is not one)."""
        self.monitor = monitor
        self.attacher = attacher
        self.lookup = lookup

    def fileno(self) -> int:
        return self.monitor.fileno()

    def arrived(self) -> list[Attached]:
        new: list[Attached] = []
        for bdf in self.monitor.added():
            try:
                dev = self.lookup(bdf)
            except UsageError:
                continue  # not virtio-mem (a root port, another device), or gone again
            if self.attacher.serves(dev.bdf):
                continue
            log.info("%s: virtio-mem device hot-plugged: binding and attaching it", dev.bdf)
            try:
                new.append(self.attacher.attach(dev))
            except VmemError as exc:
                log.error("%s: hot-plugged device not served: %s", dev.bdf, exc.message)
        return new


def _refuse_if_an_agent_answers(path: Path) -> None:
    """UsageError when an agent already serves ``path`` (before any device is touched:
    a second agent must neither open a device nor replace the first one's socket)."""
    running = control.call(path, control.Ping())
    if running is not None:
        raise UsageError(
            f"an agent is already running (pid {running.get('pid', '?')}, devices"
            f" {', '.join(running.get('devices', [])) or 'none'}); stop it first",
            pid=running.get("pid"),
        )


def run_agent(options: RunOptions) -> None:
    """``vmem-guest run``: serve every (chosen) device until SIGTERM."""
    path = control.socket_path(options.state_dir)
    _refuse_if_an_agent_answers(path)
    if options.metrics_file is not None and (
        why := metrics.check_metrics_path(options.metrics_file)
    ):
        raise UsageError(why)
    for warning in kexec_exposure.startup_warnings():
        log.warning(warning)
    try:
        with (
            Notifier.from_environment() as notifier,  # before any child starts
            _hotplug_monitor(options.devices) as monitor,
            no_unevictable_compaction(options.state_dir),
            auto_online_while_serving(options.policy, options.state_dir),
            attached_devices(
                select_devices(options.devices, wait_for_hotplug=monitor is not None),
                state_dir=options.state_dir,
                policy=options.policy,
                allow_noiommu=options.allow_noiommu,
                offline_timeout=options.offline_timeout,
                on_refused=skip_refusal,
            ) as attacher,
        ):
            _serve(attacher, path, options, monitor, notifier)
    except TrackerLocked as exc:
        raise UsageError(
            f"{exc.message}: another vmem-guest process owns the device; stop it first",
            **exc.fields,
        ) from None


@contextlib.contextmanager
def _hotplug_monitor(named: tuple[str, ...]) -> Iterator[PciMonitor | None]:
    """The PCI uevent monitor when no device is named (``--device`` serves only those),
    started before the devices are listed: one added while the others are being
    attached is then in its queue, not missed (one already served is skipped)."""
    monitor = None if named else PciMonitor.open()
    if monitor is None:
        yield None
        return
    with monitor:
        yield monitor


def _serve(
    attacher: DeviceAttacher,
    path: Path,
    options: RunOptions,
    monitor: PciMonitor | None,
    notifier: Notifier | None = None,
) -> None:
    """The agent's loop over the attacher's devices, its control socket at ``path``;
    devices hot-plugged later are served through ``monitor`` when there is one; the
    service manager is told its state through ``notifier`` when there is one."""

    def make_server(handler: Any) -> ControlServer:
        return ControlServer(path, handler, allowed_uids=frozenset({0}))

    with contextlib.ExitStack() as stack:
        watch = stack.enter_context(_resume_watch())
        guard = SuspendGuard()
        stack.callback(guard.close)
        arrivals = HotplugArrivals(monitor, attacher) if monitor is not None else None
        listeners: list[StateListener] = []
        if notifier is not None:
            listeners.append(SystemdStatus(notifier))
        if options.metrics_file is not None:
            published = metrics.MetricsFile(options.metrics_file, log)
            stack.callback(published.close)
            listeners.append(published)
        agent = Agent(
            list(attacher.attached),
            make_server,
            manual_mode=options.manual,
            resume_watch=watch,
            suspend_guard=guard,
            arrivals=arrivals,
            listener=Listeners(listeners) if listeners else None,
        )
        try:
            agent.run()
        finally:
            agent.close()


@contextlib.contextmanager
def _resume_watch() -> Iterator[ResumeWatch | None]:
    """The timerfd that tells the agent of a resume; None (and a warning) without one."""
    try:
        watch = ResumeWatch()
    except OSError as exc:
        log.warning("no timerfd (%s): a resume from suspend will go unnoticed", exc.strerror)
        yield None
        return
    with watch:
        yield watch


def manual_command(
    request: control.DeviceOperation,
    *,
    state_dir: Path,
    allow_noiommu: bool = False,
    on_progress: Emit | None = None,
) -> dict[str, Any]:
    """A manual operation: through the agent's socket when one runs, else directly."""
    via_agent = control.call(control.socket_path(state_dir), request, on_progress)
    if via_agent is not None:
        return via_agent
    bdf = request.device
    devices = select_devices((bdf,) if bdf is not None else ())
    if len(devices) != 1:
        names = ", ".join(dev.bdf for dev in devices)
        raise UsageError(f"several virtio-mem devices ({names}): choose one with --device")
    emit = on_progress or (lambda _progress: None)
    try:
        with attached_devices(
            devices,
            state_dir=state_dir,
            policy=planner.DEFAULT_POLICY,
            allow_noiommu=allow_noiommu,
        ) as attacher:
            return manual.perform(attacher.attached[0].driver, request, emit)
    except TrackerLocked as exc:
        raise UsageError(
            f"device {devices[0].bdf} is owned by another vmem-guest process"
            f" (pid {exc.fields.get('holder_pid', '?')}); stop it or use its socket",
            device=devices[0].bdf,
        ) from None
