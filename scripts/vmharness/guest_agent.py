"""Driving the vmem-guest agent inside a test VM, and checking it from both sides."""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .vm import TestVM

REPO = Path(__file__).resolve().parents[2]
#: The checkout's virtualenv is visible at the same path in the guest (9p root).
VMEM_GUEST = str(REPO / ".venv" / "bin" / "vmem-guest")
AGENT_LOG = "/run/vmem-agent.log"
AGENT_PID = "/run/vmem-agent.pid"
CONTROL_SOCKET = "/run/vmem-guest/control.sock"
MEMORY_BLOCK = 128 << 20


class StateMidWrite(AssertionError):
    """The status could not be read because an agent's state file stayed inside a write
    section (vmem_guest/tracker/reader.py: "no stable snapshot"): its owner was stopped
    there (SIGSTOP) or died there. A caller that stopped the agent itself may thaw it
    and read again."""


#: What the tracker's reader says when the generation stays odd (tracker/reader.py).
MID_WRITE = "no stable snapshot"
#: Prints the BDF of each virtio-mem PCI function in the guest (vendor 0x1af4, device 0x1058).
FIND_DEVICE = (
    "for d in /sys/bus/pci/devices/*; do "
    '[ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1058 ] && basename $d; '
    "done; true"
)


def bind_vfio(vm: TestVM, bdf: str) -> None:
    """Rebind a PCI device to vfio-pci with plain sysfs writes, the way the agent will."""
    dev = f"/sys/bus/pci/devices/{bdf}"
    vm.sh(
        f"echo vfio-pci > {dev}/driver_override && "
        f"if [ -e {dev}/driver ]; then echo {bdf} > {dev}/driver/unbind; fi && "
        f"echo {bdf} > /sys/bus/pci/drivers_probe"
    )
    assert vm.sh(f"basename $(readlink {dev}/driver)").strip() == "vfio-pci"


def cli(vm: TestVM, args: str, timeout: float = 120.0) -> str:
    """Run ``vmem-guest ARGS`` in the guest; raise with the console tail unless rc 0."""
    return vm.sh(f"{VMEM_GUEST} {args}", timeout=timeout)


def cli_result(
    vm: TestVM, args: str, *, as_user: int | None = None, timeout: float = 120.0
) -> tuple[int, str, str]:
    """Run ``vmem-guest ARGS`` in the guest (as uid/gid ``as_user`` through setpriv when
    given); (exit status, stdout, stderr), kept apart through files in /run."""
    prefix = ""
    if as_user is not None:
        prefix = f"setpriv --reuid={as_user} --regid={as_user} --clear-groups "
    rc, out = vm.guest(f"{prefix}{VMEM_GUEST} {args} >/run/cli.out 2>/run/cli.err", timeout=timeout)
    if rc == -9:
        raise AssertionError(f"vmem-guest {args} timed out: {out}")
    return rc, vm.read("/run/cli.out"), vm.read("/run/cli.err")


#: The guest side of :func:`cli_results`.
CLI_BATCH = Path(__file__).with_name("cli_batch.py")
#: The checkout's venv interpreter, seen at the same path in the guest.
GUEST_PYTHON = str(REPO / ".venv" / "bin" / "python")


def cli_results(
    vm: TestVM, command_lines: list[str], timeout: float = 600.0
) -> list[tuple[int, str, str]]:
    """``vmem-guest ARGS`` for each of ``command_lines``, one after the other in ONE guest
    process that calls the CLI's entry point for each (cli_batch.py): (exit status,
    stdout, stderr) of each, as :func:`cli_result` gives them. For a test of many
    invocations, where a process each would cost 5-10 s of Python start-up apiece under
    TCG; a test of the program as a process uses :func:`cli_result`."""
    argument = shlex.quote(json.dumps(command_lines))
    vm.sh(f"{GUEST_PYTHON} {CLI_BATCH} {argument} >/run/cli-batch.json", timeout=timeout)
    results = json.loads(vm.read("/run/cli-batch.json"))
    assert isinstance(results, list) and len(results) == len(command_lines), results
    return [(int(rc), str(out), str(err)) for rc, out, err in results]


def cli_json(vm: TestVM, args: str, timeout: float = 120.0) -> Any:
    return json.loads(cli(vm, f"{args} --json", timeout))


def start_agent(vm: TestVM, args: str = "--noiommu") -> None:
    """Start ``vmem-guest run`` detached, the way systemd would, and wait for its socket."""
    # A SIGKILLed agent leaves its socket behind; the new one binds it only once its
    # devices are attached and recovered, so waiting for it means something.
    vm.sh(
        f"rm -f {CONTROL_SOCKET}; "
        f"setsid {VMEM_GUEST} run --log-level debug {args} >{AGENT_LOG} 2>&1 </dev/null &"
        f" echo $! >{AGENT_PID}"
    )
    wait_for_control_socket(vm, lambda: agent_died(vm))
    assert not agent_died(vm), agent_log(vm)


def wait_for_control_socket(vm: TestVM, died: Callable[[], bool]) -> None:
    """Wait (2 minutes at most) until an agent just started binds CONTROL_SOCKET, or
    ``died()`` says it is gone: the caller tells which of the two it was."""
    vm.wait_until(
        lambda: control_socket_bound(vm) or died(),
        timeout=120,
        what="the agent's control socket",
    )


def _guest_text(vm: TestVM, path: str) -> str | None:
    """A guest file's text read by the runner (no process started: these are polled,
    and every process started slows the agent being waited for); None if unreadable."""
    reply = vm.runner_request({"op": "read", "path": path}, timeout=30)
    return str(reply["out"]) if reply["rc"] == 0 else None


def control_socket_bound(vm: TestVM) -> bool:
    """A process has bound CONTROL_SOCKET (it is listed in /proc/net/unix; a file left
    by an agent that was killed is not)."""
    sockets = _guest_text(vm, "/proc/net/unix") or ""
    return any(line.endswith(" " + CONTROL_SOCKET) for line in sockets.splitlines())


def agent_died(vm: TestVM) -> bool:
    """The agent of AGENT_PID has exited (gone, or a zombie not yet reaped)."""
    pid = (_guest_text(vm, AGENT_PID) or "").strip()
    stat = _guest_text(vm, f"/proc/{pid}/stat") if pid.isdigit() else None
    return stat is None or stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def agent_log(vm: TestVM) -> str:
    return vm.guest(f"tail -n 60 {AGENT_LOG}")[1]


@contextlib.contextmanager
def agent_running(vm: TestVM, args: str = "--noiommu") -> Iterator[None]:
    """:func:`start_agent`, then the body; on a failure the agent log's tail is printed
    (pytest shows it with the failure); the agent is stopped on the way out."""
    start_agent(vm, args)
    try:
        yield
    except Exception:
        print(agent_log(vm))
        raise
    finally:
        stop_agent(vm)


def stop_agent(vm: TestVM, sig: str = "TERM") -> None:
    """Signal the agent and wait until it has exited."""
    vm.guest(f"kill -{sig} $(cat {AGENT_PID})")
    vm.wait_until(lambda: agent_died(vm), timeout=60, what="the agent to exit")


#: Exit statuses of ``vmem-guest status`` that come with a status: 0 every device
#: converged, 3 a device broken, 4 a device not converged (docs/operations.md).
STATUS_PRINTED = (0, 3, 4)


#: Exit code of the runner's ``call`` when it cannot import vmem_guest (a guest whose
#: root holds no checkout): the harness starts the command instead.
CALL_IMPORT_FAILED = 125


def status_document(vm: TestVM) -> dict[str, Any]:
    """``vmem-guest status --json``, the whole object (docs/status-json.md), whatever
    the devices' verdict; an error (exit 1 or 2) raises.

    Read by the status command's own code (``status_reads.json_status``) in the guest
    runner's process: a ``vmem-guest`` start-up costs the guest 5-10 s under TCG, and
    the tests look at the agent hundreds of times. Tests of the command itself run it
    with :func:`cli_result`."""
    reply = vm.runner_request(
        {
            "op": "call",
            "sys_path": [str(REPO)],
            "module": "vmem_guest.status_reads",
            "function": "json_status",
            "args": [CONTROL_SOCKET.rsplit("/", 1)[0]],
        }
    )
    if reply["rc"] == 0:
        document, rc = json.loads(reply["out"])
    elif reply["rc"] == CALL_IMPORT_FAILED:
        rc, out, err = cli_result(vm, "status --json")
        if rc not in STATUS_PRINTED:
            raise AssertionError(f"vmem-guest status --json: exit status {rc}: {err.strip()}")
        document = json.loads(out)
    elif MID_WRITE in reply["out"]:
        raise StateMidWrite(f"vmem-guest status --json: {reply['out']}")
    else:
        raise AssertionError(f"vmem-guest status --json: {reply['out']}")
    assert rc in STATUS_PRINTED, (rc, document)
    assert document["schema"] == 1, document
    return dict(document)


def status_devices(vm: TestVM) -> list[dict[str, Any]]:
    """The devices of ``vmem-guest status --json``."""
    devices: list[dict[str, Any]] = status_document(vm)["devices"]
    return devices


def status(vm: TestVM) -> dict[str, dict[str, Any]]:
    """``vmem-guest status --json`` by device (PCI address)."""
    return {dev["device"]: dev for dev in status_devices(vm)}


def settled(dev: dict[str, Any]) -> bool:
    """The agent is between steps and has finished planning for the sizes shown: no
    intent, and the remainder it published is what the request leaves over what is
    plugged. The remainder is written by the planner's Done step, a moment after the
    last request or online: a look in between sees the sizes reached with the old
    remainder."""
    remainder = int(dev["requested_size"]) - int(dev["plugged_size"])
    return dev["intent"] is None and dev["remainder"] == remainder


def device_bdfs(vm: TestVM) -> dict[str, str]:
    """QEMU device id -> guest PCI address, matched by region address."""
    regions = {int(info["memaddr"]): dev_id for dev_id, info in vm.query().items()}
    return {regions[dev["addr"]]: bdf for bdf, dev in status(vm).items()}


def target(requested: int, block_size: int, *, shrinking: bool = False) -> int:
    """What the agent plugs for ``requested`` from a state with no holes: growing,
    whole units of max(block, memory block); shrinking in Sub Block Mode, exactly
    ``requested`` (single subblocks of online blocks are taken out of use)."""
    if shrinking and block_size < MEMORY_BLOCK:
        return requested // block_size * block_size
    unit = max(block_size, MEMORY_BLOCK)
    return requested // unit * unit


def online_size_for(plugged: int, block_size: int, previous_plugged: int = 0) -> int:
    """Memory online when ``plugged`` bytes are, after a step from ``previous_plugged``
    (both from a state with no holes before that): a block with holes stays online
    whole, and so does a block that held holes before a shrink, even when all of it
    went, since a block holding poisoned pages is never offlined."""
    if block_size >= MEMORY_BLOCK:
        return plugged
    online = -(-plugged // MEMORY_BLOCK) * MEMORY_BLOCK
    held_holes = plugged < previous_plugged and previous_plugged % MEMORY_BLOCK != 0
    if held_holes and previous_plugged // MEMORY_BLOCK * MEMORY_BLOCK >= online:
        online += MEMORY_BLOCK
    return online


def state_mismatches(vm: TestVM, bdf: str, dev: dict[str, Any]) -> list[str]:
    """STATE over every online block: PLUGGED where the tracker says in use, UNPLUGGED
    over holes. One STATE request per run of whole blocks, per subblock run in a block
    with holes. The mismatches, as text (empty: all agree)."""
    block = int(dev["block_size"])
    holed = {int(entry["index"]): str(entry["subblocks"]) for entry in dev["holed_blocks"]}
    wrong = []
    for first, count in online_runs(dev):
        whole = [mb for mb in range(first, first + count) if mb not in holed]
        for run_first, run_count in _runs(whole):
            blocks = run_count * MEMORY_BLOCK // block
            answer = state(vm, bdf, run_first * MEMORY_BLOCK, blocks)
            if answer != "PLUGGED":
                wrong.append(f"memory{run_first}+{run_count}: {answer}")
    for mb, glyphs in holed.items():
        for offset, length, glyph in _glyph_runs(glyphs):
            expected = {"#": "PLUGGED", ".": "UNPLUGGED"}.get(glyph)
            answer = state(vm, bdf, mb * MEMORY_BLOCK + offset * block, length)
            if expected is not None and answer != expected:
                wrong.append(f"memory{mb} subblocks {offset}+{length} ({glyph}): {answer}")
    return wrong


def _glyph_runs(glyphs: str) -> list[tuple[int, int, str]]:
    """(offset, length, glyph) of each run of equal glyphs: one STATE request per run."""
    runs: list[tuple[int, int, str]] = []
    for offset, glyph in enumerate(glyphs):
        if runs and runs[-1][2] == glyph:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, glyph)
        else:
            runs.append((offset, 1, glyph))
    return runs


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


def online_runs(dev: dict[str, Any]) -> list[tuple[int, int]]:
    """Contiguous runs (first block index, count) of the device's online memory blocks."""
    return _runs(sorted(block["index"] for block in dev["online_blocks"]))


def state(vm: TestVM, bdf: str, addr: int, blocks: int) -> str:
    """STATE of a range: through the running agent's control socket, the request
    ``vmem-guest state`` sends, from the guest runner's process (no Python start-up);
    through the CLI when no agent listens (the command then takes the device)."""
    request = {"op": "state", "device": bdf, "addr": addr, "blocks": blocks}
    reply = vm.runner_request(
        {"op": "unix", "path": CONTROL_SOCKET, "line": json.dumps(request), "timeout": 120},
        timeout=120,
    )
    if reply["rc"] != 0:  # no agent (or none yet): the command takes the device itself
        args = f"state --device {shlex.quote(bdf)} --addr {addr:#x} --blocks {blocks}"
        return cli(vm, args).strip()
    # The agent may send progress lines first; its answer is the last line.
    answer = json.loads(reply["out"].splitlines()[-1])
    assert answer.get("ok") is True, f"STATE {addr:#x}+{blocks}: {answer}"
    return str(answer["result"]["state"])
