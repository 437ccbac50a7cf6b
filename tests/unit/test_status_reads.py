"""What ``status`` reads beside the trackers must not hang on a busy agent."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vmem_guest import control, status_reads


def test_a_busy_agent_does_not_hold_up_status(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent inside a long step accepts the connection (the kernel's backlog) but
    answers no ping: status goes on without the online paths."""
    monkeypatch.setattr(status_reads, "PING_SECONDS", 0.05)
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with busy:
        busy.bind(str(control.socket_path(tmp_path)))
        busy.listen(1)
        answers: list[dict[str, str]] = []
        reader = threading.Thread(
            target=lambda: answers.append(status_reads.agent_online_paths(tmp_path)),
            daemon=True,
        )
        reader.start()
        reader.join(timeout=30)
    assert not reader.is_alive(), "status waited on an agent that does not answer"
    assert answers == [{}]


def test_no_agent_no_online_paths(tmp_path: Path) -> None:
    assert status_reads.agent_online_paths(tmp_path) == {}


def test_json_status_is_what_status_json_prints(tmp_path: Path) -> None:
    """The harness reads ``json_status`` in the guest's runner process instead of
    starting ``status --json``: the same document and the same exit status, for a
    device the simulator left converged and for one whose tracker is missing."""
    command = [sys.executable, "-m", "vmem_guest.cli"]
    sim = subprocess.run(
        [*command, "sim", "--resize", "256M", "--state-dir", str(tmp_path)],
        capture_output=True,
        check=True,
        timeout=300,
    )
    assert sim.returncode == 0
    devices_seen = []
    for state_dir in (tmp_path, tmp_path / "none"):
        printed = subprocess.run(
            [*command, "status", "--json", "--state-dir", str(state_dir)],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        document, exit_status = status_reads.json_status(str(state_dir))
        assert exit_status == printed.returncode == 0, printed.stderr
        printed_document = json.loads(printed.stdout)
        for doc in (printed_document, document):  # MemTotal: read at two moments
            doc["guest"].pop("mem_total")  # type: ignore[attr-defined]
        assert json.loads(json.dumps(document)) == printed_document
        devices_seen.append(len(printed_document["devices"]))
    assert devices_seen == [1, 0]


def test_a_full_listen_queue_is_a_busy_agent_not_an_error(tmp_path: Path) -> None:
    """Status polled while the agent is inside a long step fills its listen queue; a
    connect with a timeout then fails at once with EAGAIN. Seen in the test VM:
    ``status`` failed with "Resource temporarily unavailable"."""
    path = control.socket_path(tmp_path)
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    queued = []
    with busy:
        busy.bind(str(path))
        busy.listen(0)
        for _ in range(4):  # fill the queue (its length is the backlog plus one)
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(str(path))
            except BlockingIOError:
                client.close()
                break
            queued.append(client)
        else:
            raise AssertionError("the listen queue never filled")
        with pytest.raises(TimeoutError, match="busy"):
            control.call(path, control.Ping(), timeout=0.05)
        assert status_reads.agent_online_paths(tmp_path) == {}
    for client in queued:
        client.close()
