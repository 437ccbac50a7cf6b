"""What ``status`` reads beside the trackers must not hang on a busy agent."""

from __future__ import annotations

import socket
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
