"""The demo's live view without a VM: the runner's ``read`` from an offset, the host
following ``status --follow --json`` through it, and both shapes of ``status --json``;
the runner's ``unix`` and ``call`` ops the harness looks at the agent with."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from vmharness import guest_runner  # noqa: E402
from vmharness.errors import GuestCommandError, HarnessError  # noqa: E402
from vmharness.status_stream import (  # noqa: E402
    STREAM_ERR,
    STREAM_FILE,
    STREAM_PID,
    StatusStream,
    parse_status,
)

DEVICE = {"device": "0000:00:03.0", "plugged_size": 0}


def test_status_documents_of_both_shapes() -> None:
    """The bare list (guest figures in each device) and the schema-1 object (under
    "guest") read the same."""
    bare = [{**DEVICE, "guest_mem_total": 3 << 30, "guest_hardware_corrupted": 2 << 20}]
    versioned = {
        "schema": 1,
        "devices": [DEVICE],
        "guest": {"mem_total": 3 << 30, "hardware_corrupted": 2 << 20},
    }
    for document in (bare, versioned):
        status = parse_status(document)
        assert list(status.devices) == ["0000:00:03.0"]
        assert (status.mem_total, status.hardware_corrupted) == (3 << 30, 2 << 20)
    unreadable = parse_status({"schema": 1, "devices": [], "guest": {"hardware_corrupted": None}})
    assert (unreadable.devices, unreadable.hardware_corrupted) == ({}, 0)
    for bad in ({"schema": 1}, "text", None):
        with pytest.raises(ValueError, match="not a vmem-guest status document"):
            parse_status(bad)


def test_runner_reads_from_an_offset(tmp_path: Path) -> None:
    path = tmp_path / "stream"
    path.write_bytes(b"first\nsec")
    whole = guest_runner.handle({"op": "read", "path": str(path)})
    assert (whole["rc"], whole["out"], whole["bytes"]) == (0, "first\nsec", 9)
    with path.open("ab") as f:
        f.write(b"ond\n")
    rest = guest_runner.handle({"op": "read", "path": str(path), "offset": 9})
    assert (rest["out"], rest["bytes"]) == ("ond\n", 4)
    missing = guest_runner.handle({"op": "read", "path": str(tmp_path / "none")})
    assert missing["rc"] == 1


def test_runner_reads_a_fifo_without_an_offset(tmp_path: Path) -> None:
    """A FIFO cannot seek: chaos releases its killer by reading one through the runner."""
    fifo = tmp_path / "kill.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=fifo.write_bytes, args=(b"go\n",))
    writer.start()
    answer = guest_runner.handle({"op": "read", "path": str(fifo)})
    writer.join(timeout=10)
    assert (answer["rc"], answer["out"]) == (0, "go\n")


class GuestFiles:
    """The guest as the stream sees it: files the runner reads, processes in /proc."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {STREAM_FILE: b"", STREAM_PID: b"42\n", STREAM_ERR: b""}
        self.reads: list[tuple[str, int]] = []

    def read_from(self, path: str, offset: int) -> tuple[str, int]:
        self.reads.append((path, offset))
        if path not in self.files:
            raise GuestCommandError(f"read {path}", 1, "FileNotFoundError", "")
        data = self.files[path][offset:]
        return data.decode(), len(data)

    def read(self, path: str) -> str:
        return self.read_from(path, 0)[0]

    def append(self, text: str) -> None:
        self.files[STREAM_FILE] += text.encode()


def line(plugged: int, shape: str = "list") -> str:
    devices = [{**DEVICE, "plugged_size": plugged}]
    return json.dumps(devices if shape == "list" else {"schema": 1, "devices": devices})


def test_the_stream_keeps_the_latest_whole_line() -> None:
    guest = GuestFiles()
    stream = StatusStream(guest)  # type: ignore[arg-type]
    assert stream.poll() is None
    guest.append(line(0) + "\n" + line(1, "object") + "\n" + line(2)[:10])
    latest = stream.poll()
    assert latest is not None and latest.devices["0000:00:03.0"]["plugged_size"] == 1
    guest.append(line(2)[10:] + "\n")
    latest = stream.poll()
    assert latest is not None and latest.devices["0000:00:03.0"]["plugged_size"] == 2
    assert stream.lines == 3
    # Each poll reads only what was added since the one before.
    offsets = [offset for path, offset in guest.reads if path == STREAM_FILE]
    assert offsets == sorted(offsets) and offsets[-1] > 0


def test_a_silent_stream_is_checked_for_its_process(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("vmharness.status_stream.time.perf_counter", lambda: clock[0])
    guest = GuestFiles()
    stream = StatusStream(guest)  # type: ignore[arg-type]
    guest.append(line(0) + "\n")
    stream.poll()
    guest.files["/proc/42/stat"] = b"42 (vmem-guest) S 1 42 42 0"
    clock[0] += 5
    stream.poll()  # silent, alive: no error
    guest.files["/proc/42/stat"] = b"42 (vmem-guest) Z 1 42 42 0"
    guest.files[STREAM_ERR] = b"vmem-guest: error: bad.state: not a tracker\n"
    clock[0] += 1
    stream.poll()  # checked a second ago: not yet again
    clock[0] += 5
    with pytest.raises(HarnessError, match="not a tracker"):
        stream.poll()
    del guest.files["/proc/42/stat"]
    clock[0] += 5
    with pytest.raises(HarnessError, match="status --follow ended"):
        stream.poll()


def test_runner_sends_a_line_to_a_unix_socket_and_returns_the_answer(tmp_path: Path) -> None:
    """``unix``: the agent's control protocol without a ``vmem-guest`` process."""
    path = str(tmp_path / "control.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as stream:
            line = stream.readline()
            conn.sendall(b'{"progress": {}}\n' + line.upper())

    thread = threading.Thread(target=answer)
    thread.start()
    with server:
        reply = guest_runner.handle({"op": "unix", "path": path, "line": '{"op": "state"}'})
    thread.join(timeout=10)
    assert reply == {"rc": 0, "out": '{"progress": {}}\n{"OP": "STATE"}\n'}
    missing = guest_runner.handle({"op": "unix", "path": str(tmp_path / "none"), "line": "x"})
    assert missing["rc"] == 1
    assert "FileNotFoundError" in missing["out"]


def test_runner_calls_a_vmem_guest_function_in_its_own_process() -> None:
    """``call``: a function's JSON result; its error; a module it cannot import (the
    harness then starts the command); nothing outside vmem_guest."""
    repo = str(Path(__file__).resolve().parents[2])
    request = {"op": "call", "sys_path": [repo], "module": "vmem_guest.units"}
    done = guest_runner.handle({**request, "function": "format_size", "args": [3 << 20]})
    assert (done["rc"], json.loads(done["out"])) == (0, "3MiB")
    failed = guest_runner.handle({**request, "function": "parse_size", "args": ["12Q"]})
    assert failed["rc"] == 1 and "12Q" in failed["out"], failed
    absent = guest_runner.handle({**request, "function": "no_such_function"})
    assert absent["rc"] == guest_runner.CALL_IMPORT_FAILED
    gone = guest_runner.handle({**request, "module": "vmem_guest.no_such_module", "function": "f"})
    assert gone["rc"] == guest_runner.CALL_IMPORT_FAILED
    foreign = guest_runner.handle({**request, "module": "os", "function": "getpid"})
    assert foreign["rc"] == 127
