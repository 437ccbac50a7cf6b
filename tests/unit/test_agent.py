"""The agent's selector loop, control socket and manual operations, over the device model.

The agent runs in the main thread (it owns the signal handlers); a second
thread plays the host and the user, then stops the agent with SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from vmem_guest import control
from vmem_guest.agent import Agent, Arrivals
from vmem_guest.attach import Attached
from vmem_guest.blocks import Geometry, Zone
from vmem_guest.device import VirtioMemDevice
from vmem_guest.driver import DeviceDriver, Outcome, StepResult
from vmem_guest.errors import UsageError
from vmem_guest.hotplug import KernelBlockState
from vmem_guest.sim.channel import SimChannel
from vmem_guest.sim.device_model import DeviceModel
from vmem_guest.sim.kernel import FakeKernelMemory
from vmem_guest.tracker import Tracker, TrackerIdentity, TrackerReader

MIB = 1 << 20
GIB = 1 << 30
ADDR = 4 * GIB
BDF = "0000:00:03.0"


class Rig:
    """One simulated device attached the way ``attach()`` does it for a real one."""

    def __init__(
        self,
        state_dir: Path,
        region: int = 2 * GIB,
        block: int = 2 * MIB,
        *,
        bdf: str = BDF,
        addr: int = ADDR,
    ) -> None:
        self.model = DeviceModel(addr=addr, region_size=region, block_size=block)
        self.channel = SimChannel(self.model)
        self.kernel = FakeKernelMemory(128 * MIB)
        geometry = Geometry(addr, region, block, 128 * MIB)
        self.tracker = Tracker.open(state_dir, TrackerIdentity(bdf, geometry))
        device = VirtioMemDevice(self.channel, bdf)
        self.driver = DeviceDriver(device, self.tracker, self.kernel)
        self.driver.start()
        self.attached = Attached(bdf, self.channel, self.tracker, self.driver)
        self.socket = control.socket_path(state_dir)

    def online_bytes(self) -> int:
        with TrackerReader.open(self.tracker.path) as reader:
            return reader.snapshot().online_bytes

    def kernel_online(self) -> int:
        return sum(
            128 * MIB
            for block in self.kernel.blocks.values()
            if block.state is KernelBlockState.ONLINE
        )


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    made = Rig(tmp_path)
    yield made
    made.attached.close()


def run_agent(
    rig: Rig, script: Callable[[], None], *, manual: bool = False, arrivals: Arrivals | None = None
) -> Agent:
    """Run the agent until ``script`` (in a thread) is done, then SIGTERM it."""
    uid = os.getuid()

    def server(handler: Any) -> control.ControlServer:
        return control.ControlServer(rig.socket, handler, allowed_uids=frozenset({uid}))

    agent = Agent([rig.attached], server, manual_mode=manual, arrivals=arrivals)
    run_while(agent, script)
    return agent


def run_while(agent: Agent, script: Callable[[], None]) -> None:
    """Run ``agent`` in this thread while ``script`` runs in another, then SIGTERM it."""
    errors: list[BaseException] = []

    def play() -> None:
        try:
            script()
        except BaseException as exc:
            errors.append(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=play)
    thread.start()
    try:
        agent.run()
    finally:
        thread.join(30)
        agent.close()
    if errors:
        raise errors[0]


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_agent_follows_resizes_then_sleeps(rig: Rig) -> None:
    seen: dict[str, Any] = {}

    def host() -> None:
        rig.channel.host_resize(1 * GIB)
        wait_for(lambda: rig.online_bytes() == 1 * GIB)
        rig.channel.host_resize(384 * MIB)
        wait_for(lambda: rig.online_bytes() == 384 * MIB)
        seen["ping"] = control.call(rig.socket, control.Ping())
        seen["state"] = control.call(rig.socket, control.QueryState(None, ADDR, 192))

    agent = run_agent(rig, host)
    assert rig.model.plugged_size == 384 * MIB
    assert rig.kernel_online() == 384 * MIB
    assert seen["ping"]["devices"] == [BDF]
    # The fake kernel adds blocks offline: the agent probes, then onlines.
    assert seen["ping"]["online_paths"] == {
        BDF: "probe then online (online_movable): two writes per block"
    }
    assert seen["state"] == {"state": "PLUGGED"}
    # Converged: the loop would block in select() with no timeout at all.
    assert agent.idle


def test_automatic_agent_refuses_manual_plug(rig: Rig) -> None:
    def user() -> None:
        with pytest.raises(UsageError, match="--manual"):
            control.call(rig.socket, control.Plug(None, control.Extent(size=128 * MIB)))

    run_agent(rig, user)
    assert rig.model.plugged_size == 0


def test_manual_agent_plug_state_unplug(rig: Rig) -> None:
    progress: list[dict[str, Any]] = []
    results: dict[str, Any] = {}

    def user() -> None:
        rig.channel.host_resize(1 * GIB)  # the device NACKs plugs beyond requested_size
        results["plug"] = control.call(
            rig.socket, control.Plug(None, control.Extent(size=256 * MIB)), progress.append
        )
        results["state"] = control.call(rig.socket, control.QueryState(None, ADDR, 128))
        results["unplug"] = control.call(
            rig.socket, control.Unplug(None, control.Extent(size=128 * MIB))
        )
        results["all"] = control.call(rig.socket, control.UnplugAll(None))

    run_agent(rig, user, manual=True)
    assert results["plug"]["plugged_size"] == 256 * MIB
    assert results["plug"]["online_size"] == 256 * MIB
    assert progress[-1] == {"done": 256 * MIB, "total": 256 * MIB}
    assert results["state"] == {"state": "PLUGGED"}
    assert results["unplug"]["plugged_size"] == 128 * MIB
    assert results["all"]["plugged_size"] == 0
    assert rig.model.plugged_size == 0
    assert rig.kernel_online() == 0


def test_manual_unplug_reports_refused_offline_and_keeps_memory(rig: Rig) -> None:
    results: dict[str, Any] = {}

    def user() -> None:
        rig.channel.host_resize(1 * GIB)
        control.call(rig.socket, control.Plug(None, control.Extent(size=256 * MIB)))
        rig.kernel.refuse_offline.update({32, 33})
        with pytest.raises(control.AgentError, match=r"memory3[23]") as err:
            control.call(rig.socket, control.Unplug(None, control.Extent(addr=ADDR, blocks=128)))
        results["error"] = err.value

    run_agent(rig, user, manual=True)
    assert results["error"].fields["errno"] == 16  # EBUSY
    # Nothing lost: the range stays plugged and online.
    assert rig.model.plugged_size == 256 * MIB
    assert rig.kernel_online() == 256 * MIB


def _raw_exchange(path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return sock.makefile("rb").read()


def test_control_rejects_bad_messages_and_keeps_serving(rig: Rig) -> None:
    replies: dict[str, bytes] = {}

    def user() -> None:
        replies["garbage"] = _raw_exchange(rig.socket, b"not json\n")
        replies["no-op"] = _raw_exchange(rig.socket, b'{"size": 1}\n')
        replies["huge"] = _raw_exchange(rig.socket, b"x" * (control.MAX_MESSAGE_BYTES + 10))
        replies["ping"] = _raw_exchange(rig.socket, b'{"op": "ping"}\n')

    run_agent(rig, user)
    assert b"not valid JSON" in replies["garbage"]
    assert b'string \\"op\\"' in replies["no-op"]
    assert b"longer than" in replies["huge"]
    assert b'"ok": true' in replies["ping"]


def test_control_logs_every_refusal_and_survives_deep_nesting(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    replies: dict[str, bytes] = {}

    def user() -> None:
        # Deeper than json's recursion limit: RecursionError, not ValueError.
        replies["deep"] = _raw_exchange(rig.socket, b"[" * 60000 + b"\n")
        replies["array"] = _raw_exchange(rig.socket, b'[{"op": "ping"}]\n')
        replies["unknown"] = _raw_exchange(rig.socket, b'{"op": "frobnicate"}\n')
        replies["type"] = _raw_exchange(
            rig.socket, b'{"op": "state", "addr": "0x100000000", "blocks": 1}\n'
        )
        replies["ping"] = _raw_exchange(rig.socket, b'{"op": "ping"}\n')

    with caplog.at_level("WARNING", logger="vmem_guest.control"):
        run_agent(rig, user)
    assert b"nested too deeply" in replies["deep"]
    assert b'string \\"op\\"' in replies["array"]
    # Not "needs an agent started with --manual": the operation does not exist.
    assert b"unknown control operation 'frobnicate'" in replies["unknown"]
    assert b"non-negative integer 'addr'" in replies["type"]
    assert b'"ok": true' in replies["ping"]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for text in ("nested too deeply", 'string "op"', "frobnicate", "'addr'"):
        assert text in logged, (text, logged)


#: One valid request line per operation, and the typed operation it parses to.
REQUESTS = [
    (b'{"op": "ping"}', control.Ping()),
    (b'{"op": "state", "addr": 4096, "blocks": 2}', control.QueryState(None, 4096, 2)),
    (
        b'{"op": "plug", "device": "0000:00:03.0", "size": 1024, "zone": "kernel"}',
        control.Plug("0000:00:03.0", control.Extent(size=1024), Zone.KERNEL),
    ),
    (
        b'{"op": "unplug", "addr": 4096, "blocks": 3}',
        control.Unplug(None, control.Extent(addr=4096, blocks=3)),
    ),
    (b'{"op": "unplug-all", "device": "0000:00:04.0"}', control.UnplugAll("0000:00:04.0")),
    (b'{"op": "hibernate", "seconds": 60}', control.Hibernate(60.0)),
]


def test_parse_request_gives_each_known_operation_typed_and_back() -> None:
    assert {operation.op for _, operation in REQUESTS} == set(control.OPS)
    for line, operation in REQUESTS:
        assert control.parse_request(line) == operation
        assert control.operation_of(control.message_of(operation)) == operation
    with pytest.raises(UsageError, match=r"unknown control operation 'plugg'.*unplug-all"):
        control.parse_request(b'{"op": "plugg", "size": 1}')


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        (b'{"op": "state", "addr": 4096}', "non-negative integer 'blocks'"),
        (b'{"op": "plug", "size": -1}', "non-negative integer 'size'"),
        (b'{"op": "plug", "size": 1, "zone": "dma"}', "zone must be one of"),
        (b'{"op": "unplug-all", "device": 3}', "PCI address string"),
    ],
)
def test_parse_request_refuses_bad_fields_clearly(line: bytes, complaint: str) -> None:
    with pytest.raises(UsageError, match=complaint):
        control.parse_request(line)


def test_a_client_trickling_bytes_cannot_hold_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CLIENT_TIMEOUT bounds the whole request line, not each recv."""
    monkeypatch.setattr(control, "CLIENT_TIMEOUT", 0.5)
    path = tmp_path / "ctl.sock"
    server = control.ControlServer(
        path, lambda req, emit: {}, allowed_uids=frozenset({os.getuid()})
    )
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        give_up = time.monotonic() + 4.0  # so that a regression fails instead of hanging
        with contextlib.suppress(OSError):
            while not stop.wait(0.1) and time.monotonic() < give_up:
                sock.sendall(b" ")

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            thread = threading.Thread(target=trickle, args=(sock,))
            thread.start()
            started = time.monotonic()
            server.serve_one()
            elapsed = time.monotonic() - started
            stop.set()
            thread.join(5)
            reply = sock.makefile("rb").read()
    finally:
        server.close()
    assert elapsed < 2.0, elapsed
    assert b"not received within 0.5 s" in reply


def test_call_as_a_user_the_socket_refuses_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Refused(socket.socket):
        def connect(self, address: Any) -> None:
            raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(control.socket, "socket", Refused)
    with pytest.raises(UsageError, match=r"permission denied: .* is for root only") as info:
        control.call(tmp_path / "control.sock", control.Ping())
    assert "\n" not in str(info.value)


def test_control_refuses_other_uids(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    served: list[control.Operation] = []
    server = control.ControlServer(
        path, lambda req, emit: served.append(req) or {}, allowed_uids=frozenset({12345})
    )
    try:
        assert (path.stat().st_mode & 0o777) == 0o600
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(b'{"op": "ping"}\n')
            server.serve_one()
            reply = sock.makefile("rb").read()
    finally:
        server.close()
    assert b"permission denied" in reply
    assert served == []


def test_a_client_that_goes_away_does_not_cut_an_operation_short(tmp_path: Path) -> None:
    """Progress to a client that left is dropped; the handler runs to its end."""
    path = tmp_path / "ctl.sock"
    steps_done: list[int] = []

    def handler(request: dict[str, Any], emit: control.Emit) -> dict[str, Any]:
        for step in range(200):
            emit({"done": step, "total": 200, "padding": "x" * 4096})
            steps_done.append(step)
        return {}

    server = control.ControlServer(path, handler, allowed_uids=frozenset({os.getuid()}))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.sendall(b'{"op": "ping"}\n')
        server.serve_one()  # the client is gone: every send fails (EPIPE)
    finally:
        server.close()
    assert len(steps_done) == 200


class ScriptedDriver:
    """A driver stub: ``steps`` PROGRESS results, then DONE; logs each step taken."""

    #: Never broken: the agent reads the driver's verdict, it has none of its own.
    broken_reason: str | None = None

    def __init__(self, name: str, steps: int, log: list[str]) -> None:
        self.name, self.left, self.log = name, steps, log

    def step(self) -> StepResult:
        self.log.append(self.name)
        if self.left == 0:
            return StepResult(Outcome.DONE)
        self.left -= 1
        return StepResult(Outcome.PROGRESS)


def test_devices_are_stepped_side_by_side_not_one_after_the_other() -> None:
    log: list[str] = []
    devices = [
        types.SimpleNamespace(bdf=name, driver=ScriptedDriver(name, steps, log))
        for name, steps in (("a", 5), ("b", 2))
    ]
    agent = Agent(devices)  # type: ignore[arg-type]  # stubs: only bdf and driver are used
    try:
        agent._drive_devices()
    finally:
        agent.close()
    # One step each per pass: b's plug is not held up behind a's five steps.
    assert log == ["a", "b", "a", "b", "a", "b", "a", "a", "a"]
    assert all(slot.wake_at is None for slot in agent.slots.values())
