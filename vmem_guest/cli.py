"""The ``vmem-guest`` command line: parses arguments and prints results, nothing else.

Errors in what a user typed print one line and exit with status 2; other
failures print one line and exit with status 1. Never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NoReturn, TypeVar

import click

from vmem_guest import control, render
from vmem_guest.blocks import Zone
from vmem_guest.errors import UsageError, VmemError
from vmem_guest.pci_address import normalize_bdf
from vmem_guest.sim.faults import Fault
from vmem_guest.sim.profiles import PROFILES
from vmem_guest.units import format_size, parse_address, parse_size, parse_size_list

DEFAULT_STATE_DIR = Path("/run/vmem-guest")
EXIT_FAILURE = 1
EXIT_USAGE = 2

T = TypeVar("T")

# click is supported from Debian 12's 8.1.3 on (setup.cfg). ParamType became generic in
# click 8.4; before that, the type parameter comes from typing.Generic instead.
if TYPE_CHECKING or getattr(click.ParamType, "__parameters__", ()):
    _ParamTypeOf = click.ParamType
else:

    class _ParamTypeOf(click.ParamType, Generic[T]):
        """click < 8.4's plain ParamType, made subscriptable."""


class ParsedType(_ParamTypeOf[T]):
    """A click type over one parser of what a user types: the parser's UsageError
    becomes click's usage error (one line, exit status 2). A value that is already
    an instance of ``as_is`` (a default given parsed) passes unchanged."""

    def __init__(self, name: str, parse: Callable[[str], T], as_is: type[T] | None = None) -> None:
        self.name = name
        self._parse = parse
        self._as_is = as_is

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> T:
        if self._as_is is not None and isinstance(value, self._as_is):
            return value
        try:
            return self._parse(str(value))
        except UsageError as exc:
            self.fail(exc.message, param, ctx)


#: A size such as 512M, 4GiB or 0x8000000.
SIZE = ParsedType("size", parse_size, as_is=int)
ADDRESS = ParsedType("address", parse_address)
#: A PCI address, DDDD:BB:DD.F or BB:DD.F, normalized to the long lower-case form: the
#: agent knows its devices by the long form, so ``--device 00:03.0`` must name the same
#: device through its socket as it does without an agent.
BDF = ParsedType("bdf", normalize_bdf)
#: A comma-separated list of sizes: 1G,3G,512M,0.
SIZE_LIST = ParsedType("sizes", parse_size_list, as_is=list)
RATE = click.FloatRange(0.0, 1.0)
STATE_DIR = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Directory of the tracker files (one per device).",
)
#: planner.OnlinePolicy's values, spelled out so that a short command such as `status`
#: need not import the planner (tests/unit/test_cli_imports.py checks they agree).
ONLINE_POLICIES = ("movable", "kernel", "auto")
ONLINE_POLICY = click.option(
    "--online-policy",
    type=click.Choice(ONLINE_POLICIES),
    default=ONLINE_POLICIES[0],
    show_default=True,
    help="Zone for onlined memory: movable (unplug stays reliable), kernel, or auto "
    "(movable up to a ratio of kernel memory).",
)
SUBBLOCK_UNPLUG = click.option(
    "--subblock-unplug/--no-subblock-unplug",
    default=True,
    show_default=True,
    help="Shrink to any multiple of the device block by taking single subblocks of "
    "online memory blocks out of use (soft offline, then UNPLUG); without it, or where "
    "the kernel cannot (no MEMORY_FAILURE, no HWPOISON_INJECT, debugfs, lockdown: said "
    "at start), shrinking goes in whole memory blocks and may stop short.",
)


def _fail(message: str, status: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"vmem-guest: error: {message}", err=True)
    sys.exit(status)


def _emit_json(obj: object) -> None:
    click.echo(json.dumps(obj, sort_keys=True))


class NoCommandError(click.UsageError):
    """No command at all: the group's help goes to stderr and the status is 2."""

    def __init__(self, ctx: click.Context) -> None:
        super().__init__(ctx.get_help(), ctx=ctx)


class _Group(click.Group):
    """click's group, with no command at all handled alike on every supported click
    (click >= 8.2 raises NoArgsIsHelpError; 8.1 printed the help on stdout, status 0)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args and not ctx.resilient_parsing:
            raise NoCommandError(ctx)
        return super().parse_args(ctx, args)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vmem-guest")
def cli() -> None:
    """vmem-guest: a userspace guest driver for virtio-mem devices.

    It plugs and unplugs the device's memory blocks over the device's request
    queue and adds, onlines and offlines the memory in Linux through
    /sys/devices/system/memory, following the host's requested size.
    """


@cli.command()
@click.option(
    "--region",
    "region_size",
    type=SIZE,
    default="4G",
    show_default=True,
    help="Size of the simulated device region.",
)
@click.option(
    "--addr",
    type=ADDRESS,
    default="0x100000000",
    show_default=True,
    help="Physical start address of the region.",
)
@click.option(
    "--block-size",
    type=SIZE,
    default="2M",
    show_default=True,
    help="Device block size (the unit of plug/unplug).",
)
@click.option(
    "--memory-block-size",
    type=SIZE,
    default="128M",
    show_default=True,
    help="Linux memory block size (the unit of online/offline).",
)
@click.option(
    "--resize",
    "targets",
    type=SIZE_LIST,
    required=True,
    help="Host requested sizes, in order: each waits for convergence. Ex: 1G,3G,512M,0",
)
@click.option(
    "--busy-rate",
    type=RATE,
    default=0.0,
    show_default=True,
    help="Probability that the device answers a plug/unplug with BUSY.",
)
@click.option(
    "--offline-fail-rate",
    type=RATE,
    default=0.0,
    show_default=True,
    help="Probability that the kernel refuses an offline with EBUSY.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the fault dice.")
@ONLINE_POLICY
@SUBBLOCK_UNPLUG
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the tracker file here (default: a temporary directory).",
)
@click.option(
    "--misbehave",
    type=click.Choice([fault.value for fault in Fault]),
    default=None,
    help="Make the device lie in its config, its responses or its used ring"
    " (after --honest-requests answers); the driver must refuse it or stop.",
)
@click.option(
    "--honest-requests",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Requests a --misbehave device answers honestly first.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per resize step.")
def sim(
    region_size: int,
    addr: int,
    block_size: int,
    memory_block_size: int,
    targets: list[int],
    busy_rate: float,
    offline_fail_rate: float,
    seed: int,
    online_policy: str,
    subblock_unplug: bool,
    state_dir: Path | None,
    misbehave: str | None,
    honest_requests: int,
    as_json: bool,
) -> None:
    """Run the driver against a simulated device and kernel.

    The real attach path, planner, driver core and tracker run against a
    QEMU-faithful device model and a fake kernel (1 GiB of boot memory at 0);
    time is virtual. Each --resize step prints requested, plugged, online,
    usable and remainder (bytes in --json). With --misbehave the device turns
    hostile: a device refused at attach, or one the driver stops touching at
    a step, ends the run with status 1 and one line that says why.
    """
    from vmem_guest import planner
    from vmem_guest.sim.runner import SimOptions, Simulation

    options = SimOptions(
        region_size=region_size,
        block_size=block_size,
        memory_block_size=memory_block_size,
        addr=addr,
        busy_rate=busy_rate,
        offline_fail_rate=offline_fail_rate,
        seed=seed,
        policy=planner.Policy(
            online=planner.OnlinePolicy(online_policy), subblock_unplug=subblock_unplug
        ),
        fault=Fault(misbehave) if misbehave else None,
        honest_requests=honest_requests,
    )
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="vmem-guest-sim-") as scratch,
        Simulation(options, state_dir or Path(scratch)) as simulation,
    ):
        for index, target in enumerate(targets, 1):
            report = simulation.resize(target)
            if as_json:
                _emit_json({"step": index, **report.as_dict()})
            rows.append((index, report))
            if report.broken:
                _fail(f"device broken at step {index}: {report.error}")
    if not as_json:
        click.echo(_sim_table(rows))


def _sim_table(rows: Sequence[tuple[int, Any]]) -> str:
    headers = (
        "step",
        "requested",
        "plugged",
        "online",
        "usable",
        "remainder",
        "holes",
        "steps",
        "requests",
        "retries",
        "converged",
    )
    body = [
        (
            index,
            format_size(r.requested),
            format_size(r.plugged),
            format_size(r.online),
            format_size(r.usable),
            format_size(r.remainder),
            format_size(r.holes),
            r.steps,
            r.requests,
            r.retries,
            "yes" if r.converged else "no",
        )
        for index, r in rows
    ]
    return render.table(headers, body)


@cli.command()
@STATE_DIR
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object, schema 1 (docs/status-json.md)."
)
@click.option(
    "--prometheus",
    is_flag=True,
    help="Metrics in the Prometheus text exposition format (docs/operations.md).",
)
@click.option(
    "--follow",
    is_flag=True,
    help="Keep running: print the status again each time it changes (with --json, "
    "one line each time), until interrupted.",
)
@click.option(
    "--interval",
    type=click.FloatRange(0.05, 60.0),
    default=0.25,
    show_default=True,
    help="With --follow: seconds between two looks at the trackers.",
)
def status(state_dir: Path, as_json: bool, prometheus: bool, follow: bool, interval: float) -> None:
    """Show each device's sizes and memory blocks, live from its tracker file.

    Works while the agent runs: the tracker is read without locks, as a
    consistent snapshot.

    \b
    Exit status, whatever the output form:
      0  every device converged (or no device is tracked)
      1  status failed: a tracker unreadable, corrupt or untrusted
      2  usage error
      3  a device is broken: the agent no longer touches it
      4  a device has not converged: plugged differs from requested (still
         resizing, or a remainder the guest cannot use), a request is in
         flight, or plugged memory is not all online
    A broken device (3) outranks one that has not converged (4).
    """
    from vmem_guest import health, metrics
    from vmem_guest.status_reads import (
        agent_online_paths,
        guest_memory,
        json_status,
        tracker_snapshots,
    )

    if as_json and prometheus:
        raise UsageError("--json and --prometheus exclude each other")
    if follow and prometheus:
        raise UsageError("--follow and --prometheus exclude each other")
    if follow:
        _follow_status(state_dir, as_json, interval, guest_memory)
        return
    if as_json:
        document, exit_status = json_status(state_dir)
        _emit_json(document)
        if exit_status:
            sys.exit(exit_status)
        return
    snapshots = tracker_snapshots(state_dir)
    paths = agent_online_paths(state_dir) if snapshots and not prometheus else {}
    if prometheus:
        click.echo(metrics.exposition(snapshots), nl=False)
    elif not snapshots:
        click.echo(f"no virtio-mem device tracked in {state_dir}")
    else:
        guest = guest_memory()
        click.echo(
            "\n\n".join(
                render.snapshot_text(snap, guest, paths.get(snap.identity.name))
                for snap in snapshots
            )
        )
    verdict = health.exit_status(snapshots)
    if verdict is not health.StatusExit.OK:
        sys.exit(verdict)


def _follow_status(
    state_dir: Path, as_json: bool, interval: float, read_guest: Callable[[], render.GuestMemory]
) -> None:
    """``status --follow``: each change as ``status`` prints it (text: under a time line;
    JSON: the ``status --json`` object, one line each). No exit status verdict: it runs
    until interrupted."""
    from vmem_guest.status_follow import follow

    try:
        for view in follow(state_dir, read_guest, interval):
            if as_json:
                _emit_json(render.status_document(view.snapshots, view.guest))
            else:
                text = [render.snapshot_text(snap, view.guest) for snap in view.snapshots]
                stamp = time.strftime("%H:%M:%S")
                click.echo(f"== {stamp}\n" + ("\n\n".join(text) or f"no device in {state_dir}"))
            sys.stdout.flush()
    except KeyboardInterrupt:
        return  # the way a follow ends: not an error


# --- the real device ---------------------------------------------------------

DEVICE = click.option(
    "--device",
    "bdf",
    type=BDF,
    default=None,
    metavar="BDF",
    help="PCI address of the device (default: the only one).",
)
NOIOMMU = click.option(
    "--noiommu",
    is_flag=True,
    help="Allow VFIO's unsafe no-IOMMU mode when the device has no IOMMU "
    "(taints the kernel; the agent then keeps its DMA pages outside every device region).",
)
JSON = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


def _setup_logging(level: str) -> None:
    from vmem_guest.logsetup import setup_logging

    setup_logging(level)  # the journal's priorities under systemd, else timestamps


@cli.command()
@JSON
def devices(as_json: bool) -> None:
    """List virtio-mem PCI devices (1af4:1058) and the driver each is bound to."""
    from vmem_guest import pci

    found = pci.list_devices()
    if as_json:
        _emit_json([dev.as_dict() for dev in found])
        return
    if not found:
        click.echo("no virtio-mem device found")
        return
    rows = [
        (
            d.bdf,
            d.driver or "-",
            d.iommu_kind or "-",
            d.iommu_group if d.iommu_group is not None else "-",
            d.numa_node,
        )
        for d in found
    ]
    click.echo(render.table(("device", "driver", "iommu", "group", "numa_node"), rows))


@cli.command()
@click.option(
    "--noiommu",
    is_flag=True,
    help="Check as for run --noiommu (devices without an IOMMU are then usable).",
)
@ONLINE_POLICY
@STATE_DIR
@JSON
def doctor(noiommu: bool, online_policy: str, state_dir: Path, as_json: bool) -> None:
    """Check that this guest has what the agent needs, and say what is missing.

    Each requirement is listed as ok, missing, not needed or unknown, with what a
    missing one costs and how to get it (docs/requirements.md). Exit status 0 when
    every required item is present (optional ones may be missing), 1 when one is
    missing: run with the same options would stop.
    """
    from vmem_guest import doctor as doctor_mod
    from vmem_guest import planner

    report = doctor_mod.examine(
        doctor_mod.Host(state_dir=state_dir),
        doctor_mod.Options(noiommu=noiommu, online_policy=planner.OnlinePolicy(online_policy)),
    )
    if as_json:
        _emit_json(report.as_dict())
    else:
        click.echo(doctor_mod.report_text(report))
    if not report.ready:
        sys.exit(EXIT_FAILURE)


@cli.command()
@click.argument("bdf")
@NOIOMMU
@click.option(
    "--uio",
    is_flag=True,
    help="Bind to uio_pci_generic instead, where VFIO is not available (no IOMMU "
    "protection, INTx only; docs/uio.md). run then drives the device through UIO.",
)
def bind(bdf: str, noiommu: bool, uio: bool) -> None:
    """Bind device BDF to vfio-pci (or uio_pci_generic) so that vmem-guest can drive it."""
    from vmem_guest import binding, pci_address

    if uio and noiommu:
        raise UsageError("--uio and --noiommu exclude each other")
    if uio:
        node = binding.bind_uio(bdf)
        click.echo(f"{pci_address.normalize_bdf(bdf)} bound to uio_pci_generic ({node})")
        return
    node = binding.bind(bdf, allow_noiommu=noiommu)
    click.echo(f"{pci_address.normalize_bdf(bdf)} bound to vfio-pci ({node})")


@cli.command()
@click.argument("bdf")
def unbind(bdf: str) -> None:
    """Give device BDF back to the kernel (virtio-pci, and so the in-kernel driver)."""
    from vmem_guest import binding, pci_address

    driver = binding.unbind(bdf)
    click.echo(f"{pci_address.normalize_bdf(bdf)} now bound to {driver or 'no driver'}")


@cli.command()
@ONLINE_POLICY
@SUBBLOCK_UNPLUG
@click.option(
    "--manual",
    is_flag=True,
    help="Do not follow the host's requested size; serve plug/unplug commands only.",
)
@NOIOMMU
@click.option(
    "--device",
    "bdfs",
    type=BDF,
    multiple=True,
    metavar="BDF",
    help="Drive only this device (repeatable; default: every virtio-mem device).",
)
@STATE_DIR
@click.option(
    "--offline-timeout",
    type=click.FloatRange(0.1, 3600),
    default=10.0,
    show_default=True,
    help="Seconds an offline may take (Linux retries page migration forever) before "
    "the block counts as refused and is retried later.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Least severe log messages to print (to stderr).",
)
@click.option(
    "--metrics-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Keep Prometheus metrics in this file (rewritten on every change, removed at"
    " exit), e.g. in node_exporter's textfile directory as vmem-guest.prom.",
)
def run(
    online_policy: str,
    subblock_unplug: bool,
    manual: bool,
    noiommu: bool,
    bdfs: tuple[str, ...],
    state_dir: Path,
    offline_timeout: float,
    log_level: str,
    metrics_file: Path | None,
) -> None:
    """Run the agent: bind every virtio-mem device to vfio-pci and follow the host.

    Plugs and onlines memory blocks when the host raises requested-size,
    offlines and unplugs them when it lowers it; sleeps on interrupts when
    there is nothing to do. Stop it with SIGTERM: the request in flight
    finishes and the memory stays as it is. A control socket in --state-dir
    serves `vmem-guest plug/unplug/state/unplug-all` (root only).
    """
    from vmem_guest import planner, service

    _setup_logging(log_level)
    options = service.RunOptions(
        state_dir=state_dir,
        policy=planner.Policy(
            online=planner.OnlinePolicy(online_policy), subblock_unplug=subblock_unplug
        ),
        manual=manual,
        allow_noiommu=noiommu,
        devices=bdfs,
        offline_timeout=offline_timeout,
        metrics_file=metrics_file,
    )
    service.run_agent(options)


def _manual(
    request: control.DeviceOperation, state_dir: Path, noiommu: bool, as_json: bool
) -> None:
    from vmem_guest import service

    def progress(update: dict[str, Any]) -> None:
        if not as_json:
            done, total = update.get("done", 0), update.get("total", 0)
            click.echo(f"  {request.op}: {format_size(done)} / {format_size(total)}", err=True)

    result = service.manual_command(
        request, state_dir=state_dir, allow_noiommu=noiommu, on_progress=progress
    )
    if as_json:
        _emit_json(result)
    elif "state" in result:
        click.echo(result["state"])
    else:
        click.echo(
            f"{result['op']}: done; device plugged {format_size(result['plugged_size'])},"
            f" online {format_size(result['online_size'])}"
        )


def _extent(op: str, size: int | None, addr: int | None, blocks: int | None) -> control.Extent:
    if (size is None) == (addr is None):
        raise UsageError(f"{op}: give either SIZE or --addr with --blocks")
    if addr is not None and blocks is None:
        raise UsageError(f"{op}: --addr needs --blocks")
    if addr is not None:
        return control.Extent(addr=addr, blocks=blocks)
    return control.Extent(size=size)


ADDR = click.option(
    "--addr", type=ADDRESS, default=None, help="Start address (device block aligned)."
)
BLOCKS = click.option(
    "--blocks", type=click.IntRange(1, 65535), default=None, help="Number of device blocks."
)


@cli.command()
@click.argument("size", type=SIZE, required=False)
@ADDR
@BLOCKS
@click.option(
    "--zone",
    type=click.Choice(["movable", "kernel"]),
    default="movable",
    show_default=True,
    help="Zone to online the memory to.",
)
@DEVICE
@NOIOMMU
@STATE_DIR
@JSON
def plug(
    size: int | None,
    addr: int | None,
    blocks: int | None,
    zone: str,
    bdf: str | None,
    noiommu: bool,
    state_dir: Path,
    as_json: bool,
) -> None:
    """Plug and online SIZE bytes (lowest free memory blocks), or an exact range.

    Only whole memory blocks are plugged, and every plugged block is onlined.
    The host must request at least as much (the device NACKs beyond it).
    """
    zone_of = Zone.KERNEL if zone == "kernel" else Zone.MOVABLE
    request = control.Plug(bdf, _extent("plug", size, addr, blocks), zone_of)
    _manual(request, state_dir, noiommu, as_json)


@cli.command()
@click.argument("size", type=SIZE, required=False)
@ADDR
@BLOCKS
@DEVICE
@NOIOMMU
@STATE_DIR
@JSON
def unplug(
    size: int | None,
    addr: int | None,
    blocks: int | None,
    bdf: str | None,
    noiommu: bool,
    state_dir: Path,
    as_json: bool,
) -> None:
    """Offline and unplug SIZE bytes (highest blocks first), or an exact range.

    A block the kernel refuses to offline is skipped (SIZE) or reported with its
    errno (range); blocks offlined on the way are onlined again.
    """
    request = control.Unplug(bdf, _extent("unplug", size, addr, blocks))
    _manual(request, state_dir, noiommu, as_json)


@cli.command()
@click.option("--addr", type=ADDRESS, required=True, help="Start address (device block aligned).")
@click.option(
    "--blocks", type=click.IntRange(1, 65535), required=True, help="Number of device blocks."
)
@DEVICE
@NOIOMMU
@STATE_DIR
@JSON
def state(
    addr: int, blocks: int, bdf: str | None, noiommu: bool, state_dir: Path, as_json: bool
) -> None:
    """Ask the device whether a range is PLUGGED, UNPLUGGED or MIXED (STATE request)."""
    _manual(control.QueryState(bdf, addr, blocks), state_dir, noiommu, as_json)


@cli.command("unplug-all")
@DEVICE
@NOIOMMU
@STATE_DIR
@JSON
def unplug_all(bdf: str | None, noiommu: bool, state_dir: Path, as_json: bool) -> None:
    """Offline every memory block of the device, then UNPLUG_ALL (all or nothing)."""
    _manual(control.UnplugAll(bdf), state_dir, noiommu, as_json)


@cli.command("hibernate-prepare")
@click.option(
    "--timeout",
    "seconds",
    type=click.IntRange(1, 3600),
    default=60,
    show_default=True,
    help="Seconds the agent may take; past them the hibernation is refused.",
)
@click.option(
    "--sleep",
    "verb",
    type=click.Choice(["hibernate", "hybrid-sleep", "suspend-then-hibernate"]),
    default="hibernate",
    show_default=True,
    help="The sleep systemd is about to start (suspend-then-hibernate is refused).",
)
@STATE_DIR
@JSON
def hibernate_prepare(seconds: int, verb: str, state_dir: Path, as_json: bool) -> None:
    """Before a hibernation: the agent gives every device's memory back and holds
    the devices empty until the resume. Fails (so vmem-guest-hibernate@.service stops
    the hibernation) when that cannot be done in time."""
    from vmem_guest import hibernate

    result = hibernate.prepare(verb, state_dir, float(seconds))
    if as_json:
        _emit_json(result)
        return
    given = ", ".join(f"{bdf} {format_size(size)}" for bdf, size in result["given_back"].items())
    click.echo(f"memory given back for hibernation: {given or 'no device'}")


@cli.command()
@DEVICE
@click.option(
    "--examples",
    type=click.IntRange(1),
    default=100,
    show_default=True,
    help="Hypothesis examples (request sequences) to run.",
)
@click.option(
    "--max-steps",
    type=click.IntRange(1, 1000),
    default=40,
    show_default=True,
    help="Longest request sequence.",
)
@click.option("--seed", type=int, default=None, help="Hypothesis seed (default: random, printed).")
@NOIOMMU
@STATE_DIR
@click.option(
    "--results",
    "results_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where a mismatch is saved as JSON, with hypothesis's example database "
    "(default: STATE_DIR/conformance).",
)
@click.option(
    "--host-resize",
    "host_resize",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="A directory shared with a host-side harness that carries out resize "
    "requests (resize-N.json -> resize-N.done): fuzz interleaved host resizes too.",
)
@click.option(
    "--profile",
    type=click.Choice(["auto", *PROFILES]),
    default="auto",
    show_default=True,
    help="Whose rules the model follows: a device profile (docs/device-profiles.md), or auto: "
    "chosen from the features the device offers (PERSISTENT_SUSPEND: qemu-10.0). "
    "Offered features the profile does not expect count as a mismatch.",
)
@click.option(
    "--device-model",
    "device_model",
    type=click.Choice([*PROFILES, "all"]),
    default=None,
    help="No device: fuzz the --profile model (auto: qemu-10.0) against a simulated "
    "device of this profile (all: of every other profile) and list each difference, "
    "shrunk, with its source line (docs/device-profiles.md).",
)
@JSON
def fuzz(
    bdf: str | None,
    examples: int,
    max_steps: int,
    seed: int | None,
    noiommu: bool,
    state_dir: Path,
    results_dir: Path | None,
    host_resize: Path | None,
    profile: str,
    device_model: str | None,
    as_json: bool,
) -> None:
    """Conformance fuzzer: the device against vmem_guest's QEMU-faithful model.

    Sends hypothesis-generated sequences of raw PLUG, UNPLUG, UNPLUG_ALL and STATE
    requests (valid, misaligned, empty, overflowing, outside the usable region,
    beyond requested_size) to the device and to the model, and compares every
    answer and the config after each request. Requests that would break the
    device (short, unknown type) go to the model only. A guest cannot resize the
    host: the fuzzer works within the current requested_size, unless a host-side
    harness serves --host-resize.

    Refuses a device owned by the agent, with memory online or anything plugged;
    nothing is probed or onlined; UNPLUG_ALL after every example. Exit status 1
    on a mismatch, printed shrunk and saved.
    """
    try:
        from vmem_guest import conformance
    except ModuleNotFoundError as exc:
        _fail(f"vmem-guest fuzz needs {exc.name} (pip install 'vmem-guest[fuzz]')")

    if device_model is not None:
        _fuzz_models(profile, device_model, examples, seed, max_steps, as_json)
        return
    result = conformance.fuzz_pci_device(
        bdf,
        allow_noiommu=noiommu,
        state_dir=state_dir,
        examples=examples,
        seed=seed,
        max_steps=max_steps,
        results_dir=results_dir,
        resize=conformance.HostResizeFiles(host_resize) if host_resize else None,
        profile=None if profile == "auto" else PROFILES[profile],
    )
    report = result.as_dict()
    if as_json:
        _emit_json(report)
    else:
        from vmem_guest.conformance.report_text import fuzz_report_text

        click.echo(fuzz_report_text(report))
    if result.mismatches:
        sys.exit(EXIT_FAILURE)


def _fuzz_models(
    profile: str, device_model: str, examples: int, seed: int | None, steps: int, as_json: bool
) -> None:
    """``fuzz --device-model``: model against model, no device; exit 1 unless every
    expected difference was found and nothing else."""
    from vmem_guest.conformance import crossmodel

    model = PROFILES["qemu-10.0" if profile == "auto" else profile]
    devices = list(PROFILES.values()) if device_model == "all" else [PROFILES[device_model]]
    reports = crossmodel.cross_fuzz_all(
        model, devices, examples=examples, seed=seed or 0, max_steps=steps
    )
    if as_json:
        _emit_json([r.as_dict() for r in reports])
    else:
        click.echo("\n\n".join(crossmodel.report_text(r) for r in reports))
    if not all(r.ok for r in reports):
        sys.exit(EXIT_FAILURE)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: click in non-standalone mode so every error is one line."""
    try:
        # Not standalone, click returns ctx.exit()'s code instead of raising it.
        returned = cli.main(args=argv, prog_name="vmem-guest", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", EXIT_FAILURE)
    except NoCommandError as exc:
        # No command at all: the help, as click prints it, not an "error:" line.
        click.echo(exc.format_message(), err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.ClickException as exc:
        _fail(exc.format_message(), EXIT_USAGE)
    except UsageError as exc:
        _fail(exc.message, EXIT_USAGE)
    except VmemError as exc:
        _fail(exc.message, EXIT_FAILURE)
    except OSError as exc:
        # A state directory that cannot be created or read, and the like: one line
        # (the whole traceback with VMEM_GUEST_TRACEBACK=1, for bug reports).
        if os.environ.get("VMEM_GUEST_TRACEBACK"):
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}", EXIT_FAILURE)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    if isinstance(returned, int) and returned != 0:
        sys.exit(returned)


if __name__ == "__main__":
    main()
