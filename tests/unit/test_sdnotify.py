"""sd_notify without libsystemd, against a real AF_UNIX datagram socket: what the
service manager would read, byte for byte."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmem_guest.sdnotify import NOTIFY_SOCKET, Notifier, one_line, socket_address


class Manager:
    """The service manager's end: a bound SOCK_DGRAM socket that collects messages."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def pending(self) -> list[str]:
        """Every message queued now, without waiting."""
        self.sock.setblocking(False)
        try:
            got = []
            while True:
                try:
                    got.append(self.sock.recv(4096).decode())
                except BlockingIOError:
                    return got
        finally:
            self.sock.settimeout(5)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[Manager, str]]:
    path = str(tmp_path / "notify")
    made = Manager(path)
    yield made, path
    made.close()


def test_ready_status_stopping_arrive_as_systemd_reads_them(
    manager: tuple[Manager, str],
) -> None:
    receiver, path = manager
    env = {NOTIFY_SOCKET: path, "OTHER": "kept"}
    with Notifier.from_environment(env) as notifier:
        assert env == {"OTHER": "kept"}  # taken out: children do not inherit it
        assert notifier.ready("waiting\nfor a device")
        assert notifier.status("requested/plugged: 0000:00:03.0 1GiB/0")
        assert notifier.stopping()
    assert receiver.receive() == "READY=1\nSTATUS=waiting for a device"
    assert receiver.receive() == "STATUS=requested/plugged: 0000:00:03.0 1GiB/0"
    assert receiver.receive() == "STOPPING=1\nSTATUS=stopping"


def test_an_abstract_socket_name_starts_with_at() -> None:
    name = f"vmem-guest-test-{uuid.uuid4().hex}"
    receiver = Manager(b"\0" + name.encode())
    try:
        with Notifier.from_environment({NOTIFY_SOCKET: "@" + name}) as notifier:
            assert notifier.ready("ready")
        assert receiver.receive() == "READY=1\nSTATUS=ready"
    finally:
        receiver.close()


@pytest.mark.parametrize("value", [None, "", "vsock:2:1234", "relative/path", "@"])
def test_without_a_usable_socket_nothing_is_sent(value: str | None) -> None:
    env = {} if value is None else {NOTIFY_SOCKET: value}
    with Notifier.from_environment(env) as notifier:
        assert not notifier.enabled
        assert not notifier.ready("x")
        assert not notifier.stopping()
    assert NOTIFY_SOCKET not in env


def test_a_socket_that_is_gone_is_a_warning_once_and_nothing_else(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(socket_address(str(tmp_path / "gone")))
    with caplog.at_level("DEBUG", logger="vmem_guest.sdnotify"), notifier:
        assert not notifier.ready("x")
        assert not notifier.status("y")
    levels = [r.levelname for r in caplog.records]
    assert levels == ["WARNING", "DEBUG"]
    assert "cannot notify the service manager" in caplog.records[0].getMessage()


def test_the_variable_is_not_inherited_by_children(
    manager: tuple[Manager, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, path = manager
    monkeypatch.setenv(NOTIFY_SOCKET, path)
    with Notifier.from_environment() as notifier:
        child = subprocess.run(
            [sys.executable, "-c", f"import os; print(os.environ.get({NOTIFY_SOCKET!r}))"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert child.stdout.strip() == "None"
        assert NOTIFY_SOCKET not in os.environ
        assert notifier.ready("still sends")
    assert receiver.receive() == "READY=1\nSTATUS=still sends"


def test_socket_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == b"/run/systemd/notify"
    assert socket_address("@abc") == b"\0abc"
    assert socket_address("vsock:2:5") is None
    assert one_line("a\nb\r\nc") == "a b c"
