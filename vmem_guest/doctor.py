"""``vmem-guest doctor``: does this guest have what the agent needs?

Each :class:`Check` pairs a requirement (:mod:`vmem_guest.requirements`: its level,
what the agent uses it for, what missing it costs, the fix) with a probe that looks
at the running system through a :class:`Host`: the roots of sysfs, procfs, /dev,
/lib/modules and the state directory, and the few things that are not files
(the effective uid, whether libudev loads), so tests run every probe against a fake
tree. A probe returns a :class:`Finding`: OK, MISSING or NOT_NEEDED (a check that
does not apply to this guest, such as secretmem under a vIOMMU) or UNKNOWN (it
cannot be told yet), with what it saw.

:func:`examine` runs them all; :class:`Report` says whether ``run`` with the same
options could start (``ready``: no required item missing). The reasons and the
kernel sources behind each check are in docs/requirements.md.
"""

from __future__ import annotations

import dataclasses
import enum
import gzip
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from vmem_guest import (
    config_peek,
    control,
    kernel_setting,
    kexec_exposure,
    online_path,
    pci,
    planner,
    requirements,
)
from vmem_guest._linux.procfs import PROC_ROOT
from vmem_guest._linux.sysfs import SYSFS_ROOT, read_value_or_none
from vmem_guest.blocks import Geometry
from vmem_guest.errors import VmemError
from vmem_guest.inhibit import SYSTEMD_RUNTIME_DIR
from vmem_guest.pages import DEBUGFS, ProcPages
from vmem_guest.requirements import Level, Requirement
from vmem_guest.status_reads import PING_SECONDS
from vmem_guest.transport.uio import UIO_PCI_GENERIC
from vmem_guest.transport.vfio import DEV_ROOT
from vmem_guest.units import format_size

#: The oldest kernel series the agent is tested on.
TESTED_FROM = (6, 1)
#: What the agent's tracker files and the boot memory record live under by default.
DEFAULT_STATE_DIR = Path("/run/vmem-guest")


def _udev_loads() -> bool:
    return pci._udev_available()


@dataclasses.dataclass(frozen=True)
class Host:
    """Where the doctor looks: the real system by default, a fake tree in tests."""

    sys: Path = SYSFS_ROOT
    proc: Path = PROC_ROOT
    dev: Path = DEV_ROOT
    boot: Path = Path("/boot")
    lib_modules: Path = Path("/lib/modules")
    systemd_runtime: Path = Path(SYSTEMD_RUNTIME_DIR)
    state_dir: Path = DEFAULT_STATE_DIR
    euid: Callable[[], int] = os.geteuid
    udev_loads: Callable[[], bool] = _udev_loads
    which: Callable[[str], str | None] = shutil.which

    @property
    def memory(self) -> Path:
        return self.sys / "devices/system/memory"

    def release(self) -> str:
        """The running kernel's release (``uname -r``); empty when unreadable."""
        return read_value_or_none(self.proc / "sys/kernel/osrelease") or ""

    def kernel_config(self, option: str) -> str | None:
        """``y``, ``m`` or ``n`` for ``CONFIG_<option>`` from /proc/config.gz or
        /boot/config-<release>; None when neither can be read."""
        text = _read_config(self.proc / "config.gz", self.boot / f"config-{self.release()}")
        if text is None:
            return None
        for line in text.splitlines():
            if line.startswith(f"CONFIG_{option}="):
                return line.split("=", 1)[1].strip()
        return "n"


def _read_config(gz: Path, plain: Path) -> str | None:
    try:
        return gzip.decompress(gz.read_bytes()).decode(errors="replace")
    except (OSError, EOFError):
        pass
    try:
        return plain.read_text(errors="replace")
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class Options:
    """The ``run`` options the answer depends on."""

    noiommu: bool = False
    online_policy: planner.OnlinePolicy = planner.OnlinePolicy.MOVABLE


class Status(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    NOT_NEEDED = "not needed"
    UNKNOWN = "unknown"  # cannot be told yet; not counted as missing


@dataclasses.dataclass(frozen=True)
class Finding:
    """What one probe saw."""

    status: Status
    detail: str


def ok(detail: str) -> Finding:
    return Finding(Status.OK, detail)


def missing(detail: str) -> Finding:
    return Finding(Status.MISSING, detail)


def not_needed(detail: str) -> Finding:
    return Finding(Status.NOT_NEEDED, detail)


@dataclasses.dataclass(frozen=True)
class Survey:
    """What every probe may look at: the host, the options, the devices found."""

    host: Host
    options: Options
    devices: tuple[pci.VirtioMemPci, ...]

    def modes(self) -> set[str]:
        """How the devices would be driven: ``type1``, ``noiommu``, ``uio`` (bound to
        uio_pci_generic) and/or ``none``; without devices, what the host offers (a
        registered IOMMU: type1)."""
        if self.devices:
            return {_mode_of(d) for d in self.devices}
        return {"type1"} if _has_iommu(self.host) else {"noiommu"}

    def all_uio(self) -> bool:
        """Every device found is bound to uio_pci_generic: VFIO plays no part."""
        return bool(self.devices) and self.modes() == {"uio"}


def _mode_of(dev: pci.VirtioMemPci) -> str:
    if dev.driver == UIO_PCI_GENERIC:
        return "uio"
    return dev.iommu_kind or "none"


@dataclasses.dataclass(frozen=True)
class Check:
    """One requirement and the probe that looks for it."""

    requirement: Requirement
    probe: Callable[[Survey], Finding]


@dataclasses.dataclass(frozen=True)
class Result:
    """One check's outcome, with the requirement's words."""

    requirement: Requirement
    finding: Finding

    @property
    def failed(self) -> bool:
        """A required item that is missing: run cannot start."""
        return self.finding.status is Status.MISSING and self.requirement.level is Level.REQUIRED

    def as_dict(self) -> dict[str, str]:
        req = self.requirement
        return {
            "name": req.name,
            "level": req.level.value,
            "status": self.finding.status.value,
            "detail": self.finding.detail,
            "need": req.need,
            "cost": req.cost,
            "fix": req.fix,
        }


@dataclasses.dataclass(frozen=True)
class Report:
    """Every check's result and the devices seen."""

    release: str
    options: Options
    results: tuple[Result, ...]
    devices: tuple[dict[str, object], ...]

    @property
    def ready(self) -> bool:
        """No required item missing: ``run`` with these options can start."""
        return not any(result.failed for result in self.results)

    def as_dict(self) -> dict[str, object]:
        return {
            "ready": self.ready,
            "kernel": self.release,
            "options": {
                "noiommu": self.options.noiommu,
                "online_policy": self.options.online_policy.value,
            },
            "checks": [result.as_dict() for result in self.results],
            "devices": list(self.devices),
        }


# ----------------------------------------------------------------------------------------
# The probes.
# ----------------------------------------------------------------------------------------


def _root(survey: Survey) -> Finding:
    uid = survey.host.euid()
    if uid == 0:
        return ok("running as root")
    return missing(requirements.not_root(uid))


def _linux(survey: Survey) -> Finding:
    release = survey.host.release()
    version = _version(release)
    if version is None:
        return missing(f"cannot tell the kernel version ({release or 'no osrelease'})")
    shown = f"Linux {release}"
    if version < TESTED_FROM:
        return missing(f"{shown} is older than {TESTED_FROM[0]}.{TESTED_FROM[1]}")
    return ok(shown)


def _version(release: str) -> tuple[int, int] | None:
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()))
    except (IndexError, ValueError):
        return None


def _probe_file(survey: Survey) -> Finding:
    path = survey.host.memory / "probe"
    if path.exists():
        return ok(f"{path} exists")
    return missing(requirements.no_probe(str(path)))


def _block_size(survey: Survey) -> Finding:
    path = survey.host.memory / "block_size_bytes"
    text = read_value_or_none(path)
    if text is None:
        return missing(f"{path} cannot be read (no CONFIG_MEMORY_HOTPLUG?)")
    try:
        size = int(text, 16)
    except ValueError:
        return missing(f"{path} reads {text!r}, not a hex number")
    if size <= 0 or size & (size - 1):
        return missing(f"{path} reads {size:#x}, not a power of two")
    notes = [_device_fit(dev, survey.host.state_dir, size) for dev in survey.devices]
    detail = "; ".join([f"{format_size(size)} memory blocks", *(note for _, note in notes)])
    return missing(detail) if any(useless for useless, _ in notes) else ok(detail)


def _device_fit(dev: pci.VirtioMemPci, state_dir: Path, block_size: int) -> tuple[bool, str]:
    """(whether ``dev``'s region holds no whole memory block, one note on it). Its
    geometry comes from its tracker file when the agent attached it this boot, else
    from its config read through sysfs (:mod:`vmem_guest.config_peek`)."""
    geometry = _tracked_geometry(dev.bdf, state_dir)
    if geometry is None:
        config = config_peek.read_config_or_reason(dev.sysfs_path)
        if isinstance(config, str):
            return False, f"{dev.bdf}: device block size unknown: {config}"
        geometry = Geometry(config.addr, config.region_size, config.block_size, block_size)
    mode = "Big Block Mode" if geometry.big_block_mode else "Sub Block Mode"
    note = (
        f"{dev.bdf}: device block {format_size(geometry.block_size)}, {mode},"
        f" {geometry.nr_memory_blocks} whole memory blocks in its"
        f" {format_size(geometry.region_size)} region at {geometry.addr:#x}"
    )
    return geometry.nr_memory_blocks == 0, note


def _tracked_geometry(bdf: str, state_dir: Path) -> Geometry | None:
    """The geometry in ``bdf``'s tracker file, None when there is none to read."""
    from vmem_guest.tracker import TrackerReader, list_trackers

    try:
        paths = list_trackers(state_dir)
    except (OSError, VmemError):
        return None
    for path in paths:
        try:
            with TrackerReader.open(path) as reader:
                snapshot = reader.snapshot()
        except (OSError, VmemError):
            continue
        if snapshot.identity.name == bdf:
            return snapshot.geometry
    return None


def _vfio_pci(survey: Survey) -> Finding:
    if survey.all_uio():
        return not_needed("every device is bound to uio_pci_generic (bind --uio)")
    found = _vfio_pci_present(survey.host)
    if found.status is Status.MISSING:
        return missing(found.detail + _uio_fallback(survey.host))
    return found


def _vfio_pci_present(host: Host) -> Finding:
    if (host.sys / "bus/pci/drivers/vfio-pci").is_dir():
        return ok("vfio-pci is registered (built in or loaded)")
    return _driver_available(host, "vfio-pci", "VFIO_PCI")


def _driver_available(host: Host, module: str, option: str) -> Finding:
    """Whether ``module`` can be loaded (``modules.builtin``/``modules.dep`` of the
    running kernel) or is configured in (``CONFIG_<option>``)."""
    modules = host.lib_modules / host.release()
    for index in ("modules.builtin", "modules.dep"):
        text = _read_text(modules / index)
        if text is not None and f"/{module}.ko" in text:
            return ok(f"{module} is a module ({modules / index}); it is loaded when needed")
    setting = host.kernel_config(option)
    if setting in ("y", "m"):
        return ok(f"CONFIG_{option}={setting}")
    return missing(f"no {module}: not registered, not in {modules}")


def _uio_present(host: Host) -> Finding:
    if (host.sys / "bus/pci/drivers" / UIO_PCI_GENERIC).is_dir():
        return ok(f"{UIO_PCI_GENERIC} is registered (built in or loaded)")
    return _driver_available(host, UIO_PCI_GENERIC, "UIO_PCI_GENERIC")


def _uio_fallback(host: Host) -> str:
    """The words that point to the UIO path, when this kernel has it."""
    if _uio_present(host).status is Status.OK:
        return f"; fallback: vmem-guest bind --uio BDF ({UIO_PCI_GENERIC} is available)"
    return ""


def _uio(survey: Survey) -> Finding:
    """The UIO fallback: present, in use, or not needed because VFIO serves."""
    host = survey.host
    found = _uio_present(host)
    bound = [d.bdf for d in survey.devices if d.driver == UIO_PCI_GENERIC]
    if bound:
        return ok(f"{found.detail}; bound: {', '.join(bound)}")
    if found.status is Status.OK:
        return ok(f"{found.detail}; bind --uio BDF uses it where VFIO cannot")
    vfio_serves = (
        _vfio_pci_present(host).status is Status.OK and _dma_isolation(survey).status is Status.OK
    )
    if vfio_serves:
        return not_needed(f"VFIO serves the devices ({found.detail})")
    return found


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _has_iommu(host: Host) -> bool:
    try:
        return bool(os.listdir(host.sys / "class/iommu"))
    except OSError:
        return False


def _noiommu_supported(host: Host) -> bool | None:
    """Whether vfio has no-IOMMU mode; None when it cannot be told (vfio not loaded
    and no kernel config to read)."""
    if (host.sys / pci.NOIOMMU_PARAM).exists():
        return True
    if (host.sys / "module/vfio").exists():
        return False
    setting = host.kernel_config("VFIO_NOIOMMU")
    return None if setting is None else setting == "y"


def _dma_isolation(survey: Survey) -> Finding:
    host, opts = survey.host, survey.options
    if survey.devices:
        problems = [_device_isolation(d, opts) for d in survey.devices]
        found = [p for p in problems if p is not None]
        if found:
            return missing("; ".join(found))
        return ok(", ".join(f"{d.bdf}: {_mode_of(d)}" for d in survey.devices))
    if _has_iommu(host):
        return ok("an IOMMU is registered (VFIO type1)")
    supported = _noiommu_supported(host)
    if supported is False:
        return missing("no IOMMU, and this kernel's vfio has no no-IOMMU mode")
    where = "CONFIG_VFIO_NOIOMMU" if supported else "no-IOMMU mode (unverified: vfio not loaded)"
    if not opts.noiommu:
        return missing(f"no IOMMU: {where} needs run --noiommu")
    return ok(f"no IOMMU: {where}, allowed with --noiommu")


def _device_isolation(dev: pci.VirtioMemPci, opts: Options) -> str | None:
    """Why ``dev`` cannot be bound with these options, in run's own words (None for
    one bound to uio_pci_generic: ``bind --uio`` was the consent)."""
    if dev.driver == UIO_PCI_GENERIC:
        return None
    if dev.iommu_kind is None:
        return requirements.no_iommu_mode(dev.bdf)
    if dev.iommu_kind == "noiommu" and not opts.noiommu:
        return requirements.noiommu_not_allowed(dev.bdf)
    return None


def _interrupt_remapping(survey: Survey) -> Finding:
    if "type1" not in survey.modes():
        return not_needed("no device is behind an IOMMU (VFIO type1 not used)")
    host = survey.host
    param = host.sys / "module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"
    if read_value_or_none(param) in ("Y", "1"):
        return ok(f"{param} is Y (interrupts not isolated)")
    interrupts = _read_text(host.proc / "interrupts") or ""
    # An interrupt-remapping domain names its chips IR-...: IR-IO-APIC, IR-PCI-MSI
    # (arch/x86/kernel/apic/io_apic.c ioapic_ir_chip; docs/requirements.md).
    if "IR-" in interrupts:
        return ok("interrupt remapping is on (IR- chips in /proc/interrupts)")
    return missing("no IR- interrupt chip in /proc/interrupts, allow_unsafe_interrupts not set")


def _secretmem(survey: Survey) -> Finding:
    if not survey.modes() & {"noiommu", "uio"}:
        return not_needed("no device is driven without an IOMMU")
    param = survey.host.sys / "module/secretmem/parameters/enable"
    try:
        value = param.read_text().strip()
    except FileNotFoundError:
        return missing(f"{param} does not exist (no CONFIG_SECRETMEM)")
    except OSError as exc:
        return missing(f"{param} cannot be read: {exc.strerror} (it is root's)")
    if value in ("Y", "1"):
        return ok("memfd_secret enabled (secretmem.enable=Y)")
    return missing(f"memfd_secret disabled ({param} is {value})")


def _kernel_driver(survey: Survey) -> Finding:
    held = [(d.bdf, owner) for d in survey.devices if (owner := d.virtio_driver()) is not None]
    if held:
        return missing("; ".join(requirements.driven_by(bdf, owner) for bdf, owner in held))
    registered = survey.host.sys / "bus/virtio/drivers/virtio_mem"
    if registered.is_dir():
        return missing(
            f"virtio_mem is registered ({registered}): it takes every virtio-mem device "
            "at boot, at hot-plug and when vfio-pci lets one go"
        )
    return ok("virtio_mem is not registered")


def _page_check(which: str) -> Callable[[Survey], Finding]:
    """A probe over one :class:`ProcPages` check: ``which`` names its method."""

    def probe(survey: Survey) -> Finding:
        host = survey.host
        pages = ProcPages(
            memory_root=host.memory,
            kpageflags=host.proc / "kpageflags",
            debugfs=host.sys / DEBUGFS.relative_to(SYSFS_ROOT),
            lockdown=host.sys / "kernel/security/lockdown",
        )
        found = getattr(pages, which)()
        if found is None:
            return ok(_PAGE_OK[which])
        return missing(found[1])

    return probe


_PAGE_OK = {
    "soft_offline_missing": "soft_offline_page exists",
    "kpageflags_unreadable": "/proc/kpageflags is readable",
    "locked_down": "not locked down",
}


def _debugfs(survey: Survey) -> Finding:
    return _unpoison(survey, requirements.DEBUGFS)


def _hwpoison(survey: Survey) -> Finding:
    return _unpoison(survey, requirements.HWPOISON_INJECT)


def _unpoison(survey: Survey, which: Requirement) -> Finding:
    """One of the two reasons unpoison-pfn can be missing (debugfs not mounted, or the
    module not loaded); the other one's miss is this one's OK or NOT_NEEDED."""
    host = survey.host
    debugfs = host.sys / DEBUGFS.relative_to(SYSFS_ROOT)
    pages = ProcPages(memory_root=host.memory, debugfs=debugfs)
    found = pages.unpoison_missing()
    if found is None:
        return ok(f"{debugfs / 'hwpoison/unpoison-pfn'} exists")
    requirement, detail = found
    if requirement is which:
        return missing(detail)
    if which is requirements.HWPOISON_INJECT:
        return Finding(Status.UNKNOWN, "cannot be told before debugfs is mounted")
    return ok(f"debugfs is mounted at {debugfs}")


def _auto_online(survey: Survey) -> Finding:
    """Informational: the agent sets the value itself while it serves (online_path)."""
    host, policy = survey.host, survey.options.online_policy
    path = host.memory / "auto_online_blocks"
    value = read_value_or_none(path)
    if value is None:
        return missing(f"{path} cannot be read")
    boot = _cmdline_word(host, "memhp_default_state")
    held = online_path.auto_online_word(planner.Policy(online=policy))
    said = f"auto_online_blocks is {value}" + (
        f" (memhp_default_state={boot} at boot)" if boot else ""
    )
    said += f"; run --online-policy {policy.value} holds it at {held} while it serves"
    record = kernel_setting.record_path(host.state_dir, online_path.AUTO_ONLINE_BLOCKS)
    if record.exists() and not _agent_answers(host.state_dir):
        said += f" ({record} is a killed agent's record: the next run puts the original back)"
    return ok(said)


def _agent_answers(state_dir: Path) -> bool:
    """Whether an agent serves ``state_dir`` now (its record is then its own, live)."""
    try:
        socket = control.socket_path(state_dir)
        return control.call(socket, control.Ping(), timeout=PING_SECONDS) is not None
    except (VmemError, TimeoutError, OSError):
        return False


def _cmdline_word(host: Host, key: str) -> str | None:
    for word in (_read_text(host.proc / "cmdline") or "").split():
        if word.startswith(f"{key}="):
            return word.split("=", 1)[1]
    return None


def _sleep_inhibitor(survey: Survey) -> Finding:
    host = survey.host
    if not host.systemd_runtime.is_dir():
        return missing(f"systemd is not running ({host.systemd_runtime} is absent)")
    program = host.which("systemd-inhibit")
    if program is None:
        return missing("systemd-inhibit is not installed")
    return ok(f"systemd runs, {program} is there")


def _kexec(survey: Survey) -> Finding:
    """Device-region ranges a kexec'd or crash kernel would take as RAM, and whether
    such a kernel is loaded (:mod:`vmem_guest.kexec_exposure`)."""
    regions = []
    for dev in survey.devices:
        region = _device_region(dev, survey.host.state_dir)
        if isinstance(region, str):
            return Finding(Status.UNKNOWN, region)
        regions.append(region)
    if not regions:
        return not_needed("no virtio-mem device: the agent adds no memory")
    exposure = kexec_exposure.examine(regions, survey.host.sys, survey.host.proc)
    if exposure is None:
        return Finding(Status.UNKNOWN, "neither /sys/firmware/memmap nor /proc/iomem can be read")
    return missing(exposure.summary()) if exposure.exposed else ok(exposure.summary())


def _device_region(dev: pci.VirtioMemPci, state_dir: Path) -> kexec_exposure.Span | str:
    """``dev``'s region (from its tracker file, else its config through sysfs), or why
    it cannot be told."""
    geometry = _tracked_geometry(dev.bdf, state_dir)
    if geometry is not None:
        addr, size = geometry.addr, geometry.region_size
    else:
        config = config_peek.read_config_or_reason(dev.sysfs_path)
        if isinstance(config, str):
            return f"{dev.bdf}: region unknown: {config}"
        addr, size = config.addr, config.region_size
    return kexec_exposure.Span(addr, addr + size - 1)


def _uevents(survey: Survey) -> Finding:
    if survey.host.udev_loads():
        return ok("pyudev and libudev load")
    return missing("pyudev or libudev does not load")


CHECKS: tuple[Check, ...] = (
    Check(requirements.ROOT, _root),
    Check(requirements.LINUX, _linux),
    Check(requirements.PROBE, _probe_file),
    Check(requirements.BLOCK_SIZE, _block_size),
    Check(requirements.VFIO_PCI, _vfio_pci),
    Check(requirements.DMA_ISOLATION, _dma_isolation),
    Check(requirements.UIO_PCI_GENERIC, _uio),
    Check(requirements.INTERRUPT_REMAPPING, _interrupt_remapping),
    Check(requirements.SECRETMEM, _secretmem),
    Check(requirements.KERNEL_DRIVER, _kernel_driver),
    Check(requirements.SOFT_OFFLINE, _page_check("soft_offline_missing")),
    Check(requirements.KPAGEFLAGS, _page_check("kpageflags_unreadable")),
    Check(requirements.DEBUGFS, _debugfs),
    Check(requirements.HWPOISON_INJECT, _hwpoison),
    Check(requirements.LOCKDOWN, _page_check("locked_down")),
    Check(requirements.AUTO_ONLINE, _auto_online),
    Check(requirements.SLEEP_INHIBITOR, _sleep_inhibitor),
    Check(requirements.UEVENTS, _uevents),
    Check(requirements.KEXEC, _kexec),
)


def _device_row(dev: pci.VirtioMemPci) -> dict[str, object]:
    return {
        "bdf": dev.bdf,
        "driver": dev.driver,
        "virtio_driver": dev.virtio_driver(),
        "iommu_kind": dev.iommu_kind,
        "iommu_group": dev.iommu_group,
    }


def examine(host: Host | None = None, options: Options | None = None) -> Report:
    """Run every check against ``host`` (the real system by default)."""
    host = host or Host()
    options = options or Options()
    use_udev = None if host.sys == SYSFS_ROOT else False
    devices = tuple(pci.list_devices(host.sys, use_udev=use_udev))
    survey = Survey(host, options, devices)
    results = tuple(Result(check.requirement, check.probe(survey)) for check in CHECKS)
    return Report(host.release(), options, results, tuple(_device_row(d) for d in devices))


def report_text(report: Report) -> str:
    """The report for a terminal: one line per check, cost and fix under each missing
    one, the devices, and the verdict."""
    opts = report.options
    lines = [
        f"vmem-guest doctor: Linux {report.release or '?'};"
        f" as for run{' --noiommu' if opts.noiommu else ''}"
        f" --online-policy {opts.online_policy.value}",
        "",
    ]
    for result in report.results:
        req, found = result.requirement, result.finding
        lines.append(f"{found.status.value:<10} {req.name:<20} {found.detail}")
        if found.status is Status.MISSING:
            lines.append(f"{'':<10} {'':<20} {req.level.value}; costs: {req.cost}")
            lines.append(f"{'':<10} {'':<20} fix: {req.fix}")
    lines += ["", "virtio-mem devices:" if report.devices else "virtio-mem devices: none found"]
    for row in report.devices:
        lines.append(
            f"  {row['bdf']}  driver {row['driver'] or '-'}, virtio driver"
            f" {row['virtio_driver'] or '-'}, iommu {row['iommu_kind'] or '-'}"
        )
    lost = [r.requirement.name for r in report.results if r.finding.status is Status.MISSING]
    failed = [r.requirement.name for r in report.results if r.failed]
    lines.append("")
    if failed:
        lines.append(f"not ready: run would stop for {', '.join(failed)}")
    elif lost:
        lines.append(f"ready; optional items missing: {', '.join(lost)}")
    else:
        lines.append("ready: every requirement is met")
    return "\n".join(lines)
