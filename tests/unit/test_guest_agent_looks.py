"""How the harness looks at the agent in a guest without starting a process: whether it
died, whether its control socket is bound, whether it has settled (a fake runner)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from vmharness import guest_agent  # noqa: E402
from vmharness.vm import TestVM  # noqa: E402

NET_UNIX = (
    "Num       RefCount Protocol Flags    Type St Inode Path\n"
    "0000000071fe6a6d: 00000003 00000000 00000000 0001 03 295236\n"
)


class FakeRunner:
    """Answers the runner's ``read`` from a dict of guest files; no other op."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def runner_request(self, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        assert request["op"] == "read", request
        if request["path"] in self.files:
            return {"rc": 0, "out": self.files[request["path"]]}
        return {"rc": 1, "out": "FileNotFoundError"}


def vm_with(files: dict[str, str]) -> TestVM:
    return cast(TestVM, FakeRunner(files))


def test_an_agent_is_alive_while_its_process_runs() -> None:
    running = "282 (vmem-guest) S 1 282 282 0 -1 4194560"
    files = {guest_agent.AGENT_PID: "282\n", "/proc/282/stat": running}
    assert guest_agent.agent_died(vm_with(files)) is False
    zombie = {**files, "/proc/282/stat": running.replace(") S ", ") Z ")}
    assert guest_agent.agent_died(vm_with(zombie)) is True
    gone = {guest_agent.AGENT_PID: "282\n"}
    assert guest_agent.agent_died(vm_with(gone)) is True
    assert guest_agent.agent_died(vm_with({})) is True  # never started


def test_a_process_name_with_parentheses_is_read_right() -> None:
    stat = "282 (a) S (b) R 1 282"
    files = {guest_agent.AGENT_PID: "282", "/proc/282/stat": stat}
    assert guest_agent.agent_died(vm_with(files)) is False


def test_the_control_socket_counts_only_when_bound() -> None:
    bound = (
        NET_UNIX
        + f"00000000e3: 00000002 00000000 00010000 0001 01 31 {guest_agent.CONTROL_SOCKET}\n"
    )
    assert guest_agent.control_socket_bound(vm_with({"/proc/net/unix": bound})) is True
    assert guest_agent.control_socket_bound(vm_with({"/proc/net/unix": NET_UNIX})) is False
    other = (
        NET_UNIX
        + f"00000000e3: 00000002 00000000 00010000 0001 01 31 {guest_agent.CONTROL_SOCKET}.old\n"
    )
    assert guest_agent.control_socket_bound(vm_with({"/proc/net/unix": other})) is False


def test_settled_needs_the_done_steps_remainder() -> None:
    done = {"intent": None, "requested_size": 4160, "plugged_size": 4096, "remainder": 64}
    assert guest_agent.settled(done) is True
    # The sizes reached, the previous step's remainder still published.
    assert guest_agent.settled({**done, "requested_size": 40960, "plugged_size": 40960}) is False
    assert guest_agent.settled({**done, "intent": {"op": "PLUG"}}) is False
