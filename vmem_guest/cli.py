"""The ``vmem-guest`` command line: parses arguments and prints results, nothing else.

Errors in what a user typed print one line and exit with status 2; other
failures print one line and exit with status 1. Never a traceback.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click

from vmem_guest import planner, render
from vmem_guest.errors import UsageError, VmemError
from vmem_guest.units import format_size, parse_address, parse_size, parse_size_list

DEFAULT_STATE_DIR = Path("/run/vmem-guest")
EXIT_FAILURE = 1
EXIT_USAGE = 2


class SizeType(click.ParamType[int, Any]):
    """A size such as 512M, 4GiB or 0x8000000."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except UsageError as exc:
            self.fail(exc.message, param, ctx)


class AddressType(SizeType):
    name = "address"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_address(str(value))
        except UsageError as exc:
            self.fail(exc.message, param, ctx)


class SizeListType(click.ParamType[list[int], Any]):
    """A comma-separated list of sizes: 1G,3G,512M,0."""

    name = "sizes"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> list[int]:
        if isinstance(value, list):
            return value
        try:
            return parse_size_list(str(value))
        except UsageError as exc:
            self.fail(exc.message, param, ctx)


SIZE = SizeType()
ADDRESS = AddressType()
SIZE_LIST = SizeListType()
RATE = click.FloatRange(0.0, 1.0)
STATE_DIR = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Directory of the tracker files (one per device).",
)
ONLINE_POLICY = click.option(
    "--online-policy",
    type=click.Choice([p.value for p in planner.OnlinePolicy]),
    default=planner.OnlinePolicy.MOVABLE.value,
    show_default=True,
    help="Zone for onlined memory: movable (unplug stays reliable), kernel, or auto "
    "(movable up to a ratio of kernel memory).",
)


def _fail(message: str, status: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"vmem-guest: error: {message}", err=True)
    sys.exit(status)


def _emit_json(obj: object) -> None:
    click.echo(json.dumps(obj, sort_keys=True))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the tracker file here (default: a temporary directory).",
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
    state_dir: Path | None,
    as_json: bool,
) -> None:
    """Run the driver against a simulated device and kernel.

    The real planner, driver core and tracker run against a QEMU-faithful
    device model and a fake kernel; time is virtual. Each --resize step
    prints requested, plugged, online, usable and remainder (bytes in --json).
    """
    from vmem_guest.sim.runner import SimOptions, Simulation

    options = SimOptions(
        region_size=region_size,
        block_size=block_size,
        memory_block_size=memory_block_size,
        addr=addr,
        busy_rate=busy_rate,
        offline_fail_rate=offline_fail_rate,
        seed=seed,
        policy=planner.Policy(online=planner.OnlinePolicy(online_policy)),
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
                _fail(f"device broken at step {index}")
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
@click.option("--json", "as_json", is_flag=True, help="A JSON list, one object per device.")
def status(state_dir: Path, as_json: bool) -> None:
    """Show each device's sizes and memory blocks, live from its tracker file.

    Works while the agent runs: the tracker is read without locks, as a
    consistent snapshot.
    """
    from vmem_guest.tracker import TrackerReader, list_trackers

    snapshots = []
    for path in list_trackers(state_dir):
        with TrackerReader.open(path) as reader:
            snapshots.append(reader.snapshot())
    if as_json:
        _emit_json([render.snapshot_dict(snap) for snap in snapshots])
        return
    if not snapshots:
        click.echo(f"no virtio-mem device tracked in {state_dir}")
        return
    click.echo("\n\n".join(render.snapshot_text(snap) for snap in snapshots))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: click in non-standalone mode so every error is one line."""
    try:
        cli.main(args=argv, prog_name="vmem-guest", standalone_mode=False)
    except click.exceptions.Abort:
        _fail("aborted", EXIT_FAILURE)
    except click.exceptions.ClickException as exc:
        _fail(exc.format_message(), EXIT_USAGE)
    except UsageError as exc:
        _fail(exc.message, EXIT_USAGE)
    except VmemError as exc:
        _fail(exc.message, EXIT_FAILURE)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
