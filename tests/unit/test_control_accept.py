"""The control socket when the kernel cannot make the accepted socket (ENOMEM under
fault injection, ENFILE, EMFILE): the agent logs it and serves the client later."""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from vmem_guest import control


class FailingOnce:
    """The listening socket, whose first accept fails as the kernel's would."""

    def __init__(self, sock: socket.socket, err: int) -> None:
        self.sock, self.err = sock, err

    def accept(self) -> tuple[socket.socket, Any]:
        if self.err:
            err, self.err = self.err, 0
            raise OSError(err, os.strerror(err))
        return self.sock.accept()


@pytest.mark.parametrize("err", [errno.ENOMEM, errno.ENFILE, errno.EMFILE])
def test_a_failed_accept_is_logged_and_the_client_served_next_time(
    tmp_path: Path, err: int, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "ctl.sock"
    server = control.ControlServer(
        path, lambda req, emit: {"pong": True}, allowed_uids=frozenset({os.getuid()})
    )
    real = server.sock
    server.sock = FailingOnce(real, err)  # type: ignore[assignment]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
            client.sendall(json.dumps({"op": "ping"}).encode() + b"\n")
            server.serve_one()  # fails inside accept: no exception, the client waits
            assert "control connection not accepted yet" in caplog.text
            server.serve_one()
            reply = client.makefile("rb").readline()
    finally:
        server.sock = real
        server.close()
    assert json.loads(reply) == {"ok": True, "result": {"pong": True}}
