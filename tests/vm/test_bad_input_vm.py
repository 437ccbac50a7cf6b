"""Bad input at every door, in a real guest (issue 5, item 5).

One VM (no-IOMMU, one 4 GiB device with 2 MiB blocks). Bad CLI arguments to a
manual agent, to no agent and to an automatic one, a second agent, the fuzzer on
an owned device, malformed control messages from root and any message from a
non-root user, and corrupt, foreign and world-writable tracker files. Every
refusal must be one line on stderr naming the problem with exit status 2 (1 for
``status`` on a tracker it cannot trust: the system's state, not what the user
typed), or a logged refusal in the agent; and nothing is lost: QEMU's plugged
size, the tracker's plugged and online sizes and MemTotal are unchanged, and the
agent is alive and still follows the host (or, in manual mode, still plugs).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig, userspace_driver_config
from vmharness.guest_agent import (
    AGENT_LOG,
    AGENT_PID,
    CONTROL_SOCKET,
    agent_died,
    agent_log,
    cli,
    cli_result,
    cli_results,
    start_agent,
    status,
    stop_agent,
)
from vmharness.guest_agent import (
    settled as agent_settled,
)

from vmem_guest import control
from vmem_guest.tracker import MAGIC, TrackerHeader

BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]
DEV = "vm0"
REGION = 4 * GiB
BASE = 256 * MiB  #: plugged and online while the bad input arrives
NOBODY = 65534
STATE_DIR = CONTROL_SOCKET.rsplit("/", 1)[0]
UNKNOWN_BDF = "0000:00:1f.7"
ERROR_LINE = re.compile(r"vmem-guest: error: \S.*\n\Z")


@pytest.fixture(scope="module")
def vm(boot_vm: BootVM) -> Iterator[TestVM]:
    cfg = userspace_driver_config("bad-input", MemDevice(DEV, size=REGION, block_size=2 * MiB))
    with boot_vm(cfg) as booted:
        yield booted
        # Leave nothing plugged (the VM goes anyway; this checks the agent can).
        if not agent_died(booted):
            stop_agent(booted)
        booted.resize(DEV, 0)
        start_agent(booted)
        booted.wait_until(lambda: booted.plugged(DEV) == 0, timeout=240, what="unplug")
        stop_agent(booted)


def region_addr(vm: TestVM) -> int:
    return int(vm.query()[DEV]["memaddr"])


def the_device(vm: TestVM) -> dict[str, Any]:
    (dev,) = status(vm).values()
    return dev


def sizes(vm: TestVM) -> dict[str, int]:
    """What must not change: QEMU's plugged size, the tracker's view, MemTotal."""
    dev = the_device(vm)
    return {
        "qemu_plugged": vm.plugged(DEV),
        "plugged": int(dev["plugged_size"]),
        "online": int(dev["online_size"]),
        "mem_total": vm.mem_total(),
    }


def agent_pid(vm: TestVM) -> str:
    return vm.read(AGENT_PID).strip()


def assert_refused(result: tuple[int, str, str], problem: str, status_code: int = 2) -> None:
    """Exit status, nothing on stdout, one ``vmem-guest: error:`` line naming ``problem``."""
    rc, out, err = result
    assert rc == status_code, (rc, out, err)
    assert out == "", out
    assert "Traceback" not in err, err
    assert ERROR_LINE.fullmatch(err), f"not one error line: {err!r}"
    assert problem in err, (problem, err)


def assert_nothing_lost(vm: TestVM, before: dict[str, int], pid: str | None = None) -> None:
    assert sizes(vm) == before
    if pid is not None:
        assert not agent_died(vm), agent_log(vm)
        assert agent_pid(vm) == pid


def converge(vm: TestVM, size: int) -> None:
    """Resize; wait until QEMU's size and MemTotal follow, then check the tracker once."""
    start_total = vm.mem_total() - vm.plugged(DEV)  # plugged == online between tests
    vm.resize(DEV, size)
    vm.wait_until(
        lambda: vm.plugged(DEV) == size and vm.mem_total() == start_total + size,
        timeout=240,
        what=f"QEMU size and MemTotal to follow {size}",
    )
    dev = vm.wait_until(
        lambda: agent_settled(d := the_device(vm)) and d,
        timeout=60,
        what="the tracker to settle",
    )
    assert (dev["plugged_size"], dev["online_size"]) == (size, size), dev


def assert_follows_host(vm: TestVM) -> None:
    """The agent converges on a later host resize (and back)."""
    converge(vm, BASE + 128 * MiB)
    converge(vm, BASE)


def log_since(vm: TestVM, offset: int) -> str:
    return vm.read(AGENT_LOG)[offset:]


def log_size(vm: TestVM) -> int:
    return len(vm.read(AGENT_LOG))


# --- the CLI, served by an agent in manual mode ------------------------------------------


def manual_cases(base: int) -> list[tuple[str, str]]:
    """(arguments, what the error line must name) for a 4 GiB region at ``base``."""
    return [
        ("plug -1", "No such option '-1'"),
        ("plug -- -1", "invalid size '-1'"),
        ("plug 12Q", "invalid size '12Q'"),
        ("plug 3M", "size 3MiB is not a positive multiple of 128MiB"),
        ("plug 8G", "can be plugged in the usable region"),
        ("unplug 3M", "size 3MiB is not a positive multiple of 128MiB"),
        ("unplug 1G", "only 256MiB is plugged"),
        (f"plug --addr {base + 2 * MiB:#x} --blocks 64", "is not whole units of 128MiB"),
        ("plug --addr 0x0 --blocks 64", "is outside the device region"),
        (f"unplug --addr {base + REGION:#x} --blocks 64", "is outside the device region"),
        (f"plug --addr {base:#x} --blocks 0", "0 is not in the range 1<=x<=65535"),
        (
            "plug --addr 0x10000000000000000 --blocks 1",
            "address '0x10000000000000000' does not fit in 64 bits",
        ),
        (f"plug --addr {base:#x} --blocks 64", "is already plugged"),
        (f"state --addr {base + 1 * MiB:#x} --blocks 1", "STATE needs a block-aligned address"),
        (f"state --addr {base + REGION:#x} --blocks 1", "is outside the usable region"),
        (f"plug 128M --device {UNKNOWN_BDF}", f"the agent does not own device '{UNKNOWN_BDF}'"),
        ("plug 128M --device zz:zz.z", "not a PCI address: 'zz:zz.z'"),
    ]


@pytest.fixture(scope="class")
def manual(vm: TestVM) -> Iterator[dict[str, int]]:
    """An agent in manual mode with 256 MiB plugged and online."""
    vm.resize(DEV, 1 * GiB)  # the device NACKs plugs beyond requested-size
    start_agent(vm, "--noiommu --manual")
    cli(vm, "plug 256M")
    yield sizes(vm)
    cli(vm, "unplug-all")
    stop_agent(vm)
    vm.resize(DEV, 0)


class TestManualAgent:
    def test_bad_sizes_addresses_and_devices_are_one_line_each(
        self, vm: TestVM, manual: dict[str, int]
    ) -> None:
        pid = agent_pid(vm)
        (first, first_problem), *rest = manual_cases(region_addr(vm))
        # One as the program it is; the others through its entry point in one process.
        assert_refused(cli_result(vm, first), first_problem)
        for result, (_, problem) in zip(
            cli_results(vm, [args for args, _ in rest]), rest, strict=True
        ):
            assert_refused(result, problem)
        assert_nothing_lost(vm, manual, pid)
        # Every refusal the agent itself made is in its log.
        log = vm.read(AGENT_LOG)
        assert log.count("control request 'plug' refused") >= 6, log
        assert "control request 'state' refused" in log, log

    def test_the_manual_agent_still_plugs_and_unplugs(
        self, vm: TestVM, manual: dict[str, int]
    ) -> None:
        pid = agent_pid(vm)
        cli(vm, "plug 128M")
        assert vm.plugged(DEV) == BASE + 128 * MiB
        assert the_device(vm)["online_size"] == BASE + 128 * MiB
        cli(vm, "unplug 128M")
        assert_nothing_lost(vm, manual, pid)


# --- the CLI with no agent: the command takes the device itself --------------------------


@pytest.fixture(scope="class")
def direct(vm: TestVM) -> Iterator[dict[str, int]]:
    """No agent; 256 MiB plugged and online by a direct command."""
    vm.resize(DEV, 1 * GiB)
    cli(vm, "plug 256M --noiommu")
    yield sizes(vm)
    cli(vm, "unplug-all --noiommu")
    vm.resize(DEV, 0)


class TestNoAgent:
    def test_bad_input_without_an_agent_is_one_line_each(
        self, vm: TestVM, direct: dict[str, int]
    ) -> None:
        base = region_addr(vm)
        assert_refused(
            cli_result(vm, "plug 3M --noiommu"), "size 3MiB is not a positive multiple of 128MiB"
        )
        cases = [
            ("plug 8G --noiommu", "can be plugged in the usable region"),
            (f"unplug --addr {base + 2 * MiB:#x} --blocks 64 --noiommu", "not whole units"),
            (f"plug 128M --device {UNKNOWN_BDF} --noiommu", f"no PCI device {UNKNOWN_BDF}"),
            ("unplug-all --device 00:1f --noiommu", "not a PCI address: '00:1f'"),
        ]
        results = cli_results(vm, [args for args, _ in cases])
        for result, (_, problem) in zip(results, cases, strict=True):
            assert_refused(result, problem)
        assert_nothing_lost(vm, direct)
        assert json.loads(cli(vm, "plug 128M --noiommu --json"))["online_size"] == 384 * MiB
        cli(vm, "unplug 128M --noiommu")
        assert_nothing_lost(vm, direct)


# --- an agent in automatic mode owns the device ------------------------------------------


#: A raw control-socket client for the guest: sends one named payload (or nothing),
#: then prints what came back (or how the connection ended) as one JSON line.
CLIENT = """
import json, socket, sys, time
kind, path = sys.argv[1], sys.argv[2]
big = {big}
payloads = {{
    "oversized": b'{{"op": "ping", "pad": "' + b"x" * (big + 100) + b'"}}\\n',
    "invalid": b'{{"op": ping\\n',
    "array": b'[{{"op": "ping"}}]\\n',
    "unknown": b'{{"op": "frobnicate"}}\\n',
    "wrong-type": b'{{"op": "state", "addr": "0x100000000", "blocks": 1}}\\n',
    "deep": b"[" * 60000 + b"\\n",
    "ping": b'{{"op": "ping"}}\\n',
    "silent": b"",
}}
start = time.monotonic()
result = {{"reply": "", "error": None}}
with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
    sock.settimeout(60)
    try:
        sock.connect(path)
        if payloads[kind]:
            sock.sendall(payloads[kind])
            sock.shutdown(socket.SHUT_WR)
        result["reply"] = sock.makefile("rb").read().decode()
    except OSError as exc:
        result["error"] = f"{{type(exc).__name__}}: {{exc}}"
result["elapsed"] = time.monotonic() - start
print(json.dumps(result))
"""
CLIENT_PATH = "/run/bad-input-client.py"


def raw_client(vm: TestVM, kind: str, as_user: int | None = None) -> dict[str, Any]:
    prefix = f"setpriv --reuid={as_user} --regid={as_user} --clear-groups " if as_user else ""
    out = vm.sh(f"{prefix}/usr/bin/python3 {CLIENT_PATH} {kind} {CONTROL_SOCKET}", timeout=90)
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def reply_error(result: dict[str, Any]) -> str:
    """The agent's error message in a raw reply (one JSON line)."""
    assert result["error"] is None, result
    lines = result["reply"].splitlines()
    assert len(lines) == 1, result
    message = json.loads(lines[0])
    assert message["ok"] is False, message
    return str(message["error"]["message"])


@pytest.fixture(scope="class")
def auto(vm: TestVM) -> Iterator[dict[str, int]]:
    """An agent in automatic mode, converged on BASE."""
    start_agent(vm)
    converge(vm, BASE)
    vm.sh(f"cat > {CLIENT_PATH} <<'EOF'\n{CLIENT.format(big=control.MAX_MESSAGE_BYTES)}EOF")
    yield sizes(vm)
    stop_agent(vm)


class TestAutomaticAgent:
    def test_manual_commands_are_refused_by_the_agent(
        self, vm: TestVM, auto: dict[str, int]
    ) -> None:
        pid = agent_pid(vm)
        commands = ["plug 128M", "unplug 128M", "unplug-all"]
        for result, args in zip(cli_results(vm, commands), commands, strict=True):
            op = args.split()[0]
            assert_refused(result, f"the agent follows the host's requested size; '{op}'")
        assert_nothing_lost(vm, auto, pid)
        assert "control request 'unplug-all' refused" in vm.read(AGENT_LOG)
        assert_follows_host(vm)

    def test_a_second_agent_is_refused_and_the_first_carries_on(
        self, vm: TestVM, auto: dict[str, int]
    ) -> None:
        pid = agent_pid(vm)
        socket_inode = vm.sh(f"stat -c %i {CONTROL_SOCKET}")
        assert_refused(cli_result(vm, "run --noiommu"), f"an agent is already running (pid {pid}")
        assert vm.sh(f"stat -c %i {CONTROL_SOCKET}") == socket_inode  # not replaced
        assert_nothing_lost(vm, auto, pid)
        assert_follows_host(vm)

    def test_the_fuzzer_is_refused_on_the_agents_device(
        self, vm: TestVM, auto: dict[str, int]
    ) -> None:
        pid = agent_pid(vm)
        result = cli_result(vm, "fuzz --noiommu --examples 1", timeout=180)
        assert_refused(result, f"is owned by another vmem-guest process (pid {pid})")
        assert_nothing_lost(vm, auto, pid)
        assert_follows_host(vm)

    def test_malformed_control_messages_are_refused_and_logged(
        self, vm: TestVM, auto: dict[str, int]
    ) -> None:
        pid = agent_pid(vm)
        for kind, problem in [
            ("oversized", f"control request longer than {control.MAX_MESSAGE_BYTES} bytes"),
            ("invalid", "control request is not valid JSON"),
            ("array", 'must be a JSON object with a string "op"'),
            ("unknown", "unknown control operation 'frobnicate'"),
            ("wrong-type", "needs a non-negative integer 'addr'"),
            ("deep", "control request is nested too deeply"),
        ]:
            offset = log_size(vm)
            assert problem in reply_error(raw_client(vm, kind)), kind
            assert problem in log_since(vm, offset), (kind, agent_log(vm))
            assert json.loads(raw_client(vm, "ping")["reply"])["result"]["pid"] == int(pid)
        assert_nothing_lost(vm, auto, pid)
        assert_follows_host(vm)

    def test_a_silent_client_is_dropped_after_the_timeout(
        self, vm: TestVM, auto: dict[str, int]
    ) -> None:
        pid = agent_pid(vm)
        offset = log_size(vm)
        result = raw_client(vm, "silent")
        assert "not received within" in reply_error(result)
        assert control.CLIENT_TIMEOUT <= result["elapsed"] < control.CLIENT_TIMEOUT + 15
        assert "not received within" in log_since(vm, offset)
        assert_nothing_lost(vm, auto, pid)
        assert_follows_host(vm)

    def test_a_non_root_user_cannot_use_the_control_socket(
        self, vm: TestVM, auto: dict[str, int]
    ) -> None:
        pid = agent_pid(vm)
        vm.sh("command -v setpriv")
        args = f"state --addr {region_addr(vm):#x} --blocks 1"
        modes = vm.sh(f"stat -c %a {STATE_DIR} {CONTROL_SOCKET}").split()
        assert modes[1] == "600", modes
        try:
            if int(modes[0], 8) & 0o005 != 0o005:
                # The state directory is closed to others: click refuses it.
                assert_refused(
                    cli_result(vm, args, as_user=NOBODY),
                    f"Directory '{STATE_DIR}' is not readable",
                )
                vm.sh(f"chmod 755 {STATE_DIR}")
            # The socket's mode refuses: connect() fails with EACCES.
            assert_refused(
                cli_result(vm, args, as_user=NOBODY),
                f"permission denied: the agent's control socket {CONTROL_SOCKET} is for root only",
            )
            # With the socket opened to everyone, the peer's credentials refuse.
            vm.sh(f"chmod 666 {CONTROL_SOCKET}")
            offset = log_size(vm)
            assert "permission denied: root only" in reply_error(raw_client(vm, "ping", NOBODY))
            assert f"refused control connection from uid {NOBODY}" in log_since(vm, offset)
            assert_refused(cli_result(vm, args, as_user=NOBODY), "permission denied: root only")
        finally:
            vm.sh(f"chmod {modes[0]} {STATE_DIR} && chmod 600 {CONTROL_SOCKET}")
        assert vm.sh(f"stat -c %a {STATE_DIR} {CONTROL_SOCKET}").split() == modes
        assert json.loads(raw_client(vm, "ping")["reply"])["result"]["pid"] == int(pid)
        assert_nothing_lost(vm, auto, pid)
        assert_follows_host(vm)


# --- tracker files the agent must not trust ----------------------------------------------


def tracker_file(bdf: str) -> str:
    return f"{STATE_DIR}/{bdf}.state"


NAME_OFFSET = TrackerHeader.name.offset  # type: ignore[attr-defined]


def truncate(vm: TestVM, path: str) -> None:
    vm.sh(f"truncate -s 100 {path}")


def overwrite_magic(vm: TestVM, path: str) -> None:
    assert len(MAGIC) == 8
    vm.sh(f"printf BADMAGIC | dd of={path} bs=1 count=8 conv=notrunc 2>/dev/null")


def make_world_writable(vm: TestVM, path: str) -> None:
    vm.sh(f"chmod 666 {path}")


def rename_the_device_inside(vm: TestVM, path: str) -> None:
    """Another device's identity: the name field says 0000:00:1f.7."""
    vm.sh(f"printf '{UNKNOWN_BDF}' | dd of={path} bs=1 seek={NAME_OFFSET} conv=notrunc 2>/dev/null")


@pytest.fixture(scope="class")
def stopped(vm: TestVM) -> Iterator[tuple[dict[str, int], str]]:
    """BASE plugged and online, the agent stopped; (sizes, the device's PCI address)."""
    start_agent(vm)
    converge(vm, BASE)
    before, bdf = sizes(vm), the_device(vm)["device"]
    stop_agent(vm)
    yield before, bdf
    if not agent_died(vm):
        stop_agent(vm)


class TestTrackerFiles:
    @pytest.mark.parametrize(
        ("corrupt", "problem"),
        [
            (truncate, "truncated"),
            (overwrite_magic, "bad magic"),
            (make_world_writable, "world-writable"),
            (rename_the_device_inside, "identity mismatch"),
        ],
        ids=lambda value: getattr(value, "__name__", str(value)),
    )
    def test_a_bad_tracker_is_set_aside_and_rebuilt(
        self,
        vm: TestVM,
        stopped: tuple[dict[str, int], str],
        corrupt: Callable[[TestVM, str], None],
        problem: str,
    ) -> None:
        before, bdf = stopped
        path = tracker_file(bdf)
        vm.sh(f"rm -f {path}.bad-*")
        corrupt(vm, path)
        # status cannot trust the file either: one line, exit 1 (the file is bad,
        # not what the user typed), and it names the file.
        result = cli_result(vm, "status --json")
        assert_refused(result, path, status_code=1)
        start_agent(vm)
        log = vm.read(AGENT_LOG)
        assert re.search(rf"set aside as {re.escape(bdf)}\.state\.bad-\S+: .*{problem}", log), log
        assert vm.sh(f"ls {path}.bad-* | wc -l").strip() == "1"
        assert vm.sh(f"stat -c %a {path}").strip() == "644"
        assert_nothing_lost(vm, before, agent_pid(vm))
        assert_follows_host(vm)
        stop_agent(vm)
        assert_nothing_lost(vm, before)

    def test_a_tracker_copied_under_another_name_is_not_shown(
        self, vm: TestVM, stopped: tuple[dict[str, int], str]
    ) -> None:
        before, bdf = stopped
        copy = tracker_file(UNKNOWN_BDF)
        vm.sh(f"cp {tracker_file(bdf)} {copy}")
        try:
            result = cli_result(vm, "status --json")
            assert_refused(result, f"holds the tracker of another device, '{bdf}'", 1)
            assert copy in result[2]
        finally:
            vm.sh(f"rm -f {copy}")
        assert_nothing_lost(vm, before)
