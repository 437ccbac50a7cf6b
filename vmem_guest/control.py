"""The agent's control socket: JSON lines over a root-only Unix socket.

Protocol (one request per connection, UTF-8, each message one line)::

    client -> {"op": "plug", "device": "0000:00:03.0", "size": 268435456}
    agent  -> {"progress": {"done": 134217728, "total": 268435456}}   (zero or more)
    agent  -> {"ok": true, "result": {...}}
           or {"ok": false, "error": {"error": "UsageError", "message": "...", ...}}

The socket file is mode 0600 under ``/run/vmem-guest/``; on top of that each
peer's credentials (SO_PEERCRED) are checked: only uid 0 is served. A message
longer than :data:`MAX_MESSAGE_BYTES`, one that is not a JSON object with a
known ``op`` (:data:`OPS`), or one not finished within :data:`CLIENT_TIMEOUT`
seconds of the connection, is answered with an error and the connection closed;
every refusal is logged and the agent carries on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from vmem_guest.blocks import Zone
from vmem_guest.errors import UsageError, VmemError

SOCKET_NAME = "control.sock"
MAX_MESSAGE_BYTES = 64 * 1024
#: How long the agent waits for a connected client to finish its request line
#: (in all: a client trickling bytes cannot hold the agent's loop any longer).
CLIENT_TIMEOUT = 5.0
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

log = logging.getLogger("vmem_guest.control")

Emit = Callable[[dict[str, Any]], None]


# --- operations: every request, parsed once into one of these -------------------


@dataclasses.dataclass(frozen=True)
class Ping:
    """Is an agent there, which devices does it own, is it in manual mode."""

    op: ClassVar[str] = "ping"


@dataclasses.dataclass(frozen=True)
class QueryState:
    """STATE of ``blocks`` device blocks from ``addr`` (spec 5.15.6.6)."""

    op: ClassVar[str] = "state"
    device: str | None
    addr: int
    blocks: int


@dataclasses.dataclass(frozen=True)
class Extent:
    """What a plug or unplug covers: ``size`` bytes where the driver chooses, or
    exactly ``blocks`` device blocks from ``addr``."""

    size: int | None = None
    addr: int | None = None
    blocks: int | None = None


@dataclasses.dataclass(frozen=True)
class Plug:
    """Plug and online whole units (``zone``: where the new blocks go)."""

    op: ClassVar[str] = "plug"
    device: str | None
    extent: Extent
    zone: Zone = Zone.MOVABLE


@dataclasses.dataclass(frozen=True)
class Unplug:
    """Offline and unplug whole units."""

    op: ClassVar[str] = "unplug"
    device: str | None
    extent: Extent


@dataclasses.dataclass(frozen=True)
class UnplugAll:
    """UNPLUG_ALL, after offlining everything online (spec 5.15.6.5)."""

    op: ClassVar[str] = "unplug-all"
    device: str | None


@dataclasses.dataclass(frozen=True)
class Hibernate:
    """Give every device's memory back within ``seconds`` and hold the devices empty
    until the guest resumes (vmem_guest/hibernate.py)."""

    op: ClassVar[str] = "hibernate"
    seconds: float


#: What is asked of one device (the rest is asked of the agent).
DeviceOperation = QueryState | Plug | Unplug | UnplugAll
Operation = Ping | Hibernate | DeviceOperation
#: The operations the agent serves, by wire name.
OPS: dict[str, type[Operation]] = {
    cls.op: cls for cls in (Ping, Hibernate, QueryState, Plug, Unplug, UnplugAll)
}
#: Zones a plug request may name.
_ZONES = {"movable": Zone.MOVABLE, "kernel": Zone.KERNEL}

Handler = Callable[[Operation, Emit], dict[str, Any]]


def _count(message: dict[str, Any], key: str) -> int:
    value = message.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UsageError(f"control request needs a non-negative integer {key!r}", key=key)
    return value


def _device(message: dict[str, Any]) -> str | None:
    device = message.get("device")
    if device is not None and not isinstance(device, str):
        raise UsageError('control request: "device" must be a PCI address string')
    return device


def _extent(message: dict[str, Any]) -> Extent:
    if "addr" in message:
        return Extent(addr=_count(message, "addr"), blocks=_count(message, "blocks"))
    return Extent(size=_count(message, "size"))


def operation_of(message: dict[str, Any]) -> Operation:
    """A decoded request -> its typed operation; UsageError for anything else."""
    op = message.get("op")
    if not isinstance(op, str):
        raise UsageError('control request must be a JSON object with a string "op"')
    if op not in OPS:
        raise UsageError(
            f"unknown control operation {op[:40]!r} (known: {', '.join(sorted(OPS))})",
            op=op[:40],
        )
    if op == Ping.op:
        return Ping()
    if op == Hibernate.op:
        return Hibernate(float(_count(message, "seconds")))
    device = _device(message)
    if op == QueryState.op:
        return QueryState(device, _count(message, "addr"), _count(message, "blocks"))
    if op == UnplugAll.op:
        return UnplugAll(device)
    if op == Unplug.op:
        return Unplug(device, _extent(message))
    zone = message.get("zone", "movable")
    if zone not in _ZONES:
        raise UsageError(f"control request: zone must be one of {', '.join(_ZONES)}")
    return Plug(device, _extent(message), _ZONES[zone])


def message_of(operation: Operation) -> dict[str, Any]:
    """The wire form of ``operation`` (what :func:`operation_of` reads back)."""
    message: dict[str, Any] = {"op": operation.op}
    if isinstance(operation, Ping):
        return message
    if isinstance(operation, Hibernate):
        message["seconds"] = int(operation.seconds)
        return message
    message["device"] = operation.device
    if isinstance(operation, QueryState):
        message.update(addr=operation.addr, blocks=operation.blocks)
    elif isinstance(operation, Plug | Unplug):
        extent = dataclasses.asdict(operation.extent)
        message.update({key: value for key, value in extent.items() if value is not None})
        if isinstance(operation, Plug):
            message["zone"] = "kernel" if operation.zone is Zone.KERNEL else "movable"
    return message


def socket_path(state_dir: Path) -> Path:
    return state_dir / SOCKET_NAME


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end (SO_PEERCRED)."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(raw)
    return int(uid)


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message, sort_keys=True).encode() + b"\n")


def _error_reply(exc: VmemError) -> dict[str, Any]:
    return {"ok": False, "error": exc.as_dict()}


def parse_request(line: bytes) -> Operation:
    """A request line -> its typed operation; UsageError otherwise."""
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise UsageError("control request is not valid JSON") from None
    except RecursionError:
        # "[[[[..." nested deeper than the parser's recursion limit.
        raise UsageError("control request is nested too deeply") from None
    if not isinstance(message, dict):
        raise UsageError('control request must be a JSON object with a string "op"')
    return operation_of(message)


class ControlServer:
    """The listening socket; the agent's selector loop calls :meth:`serve_one`."""

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        allowed_uids: frozenset[int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (seconds, monotonic) times each client's request line."""
        self.path = path
        self.handler = handler
        self.allowed_uids = allowed_uids
        self.clock = clock
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window for others
        try:
            self.sock.bind(str(path))
        finally:
            os.umask(old_umask)
        self.sock.listen(8)
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def serve_one(self) -> None:
        """Accept one client and answer its request; never raises for a client's fault."""
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            # ENOMEM, ENFILE, EMFILE: the kernel could not make the new socket, before
            # taking the client off the queue (net/socket.c, do_accept); the next
            # wake-up tries again. A client is never the end of the agent.
            log.warning("control connection not accepted yet: %s", exc)
            return
        with conn:
            try:
                self._serve(conn)
            except OSError as exc:
                log.warning("control client dropped: %s", exc)

    def _serve(self, conn: socket.socket) -> None:
        uid = peer_uid(conn)
        try:
            # Read before judging: closing on unread data would reset the
            # connection and the peer would never see why it was refused.
            line = _read_line(conn, self.clock() + CLIENT_TIMEOUT, self.clock)
            if uid not in self.allowed_uids:
                log.warning("refused control connection from uid %d", uid)
                raise UsageError("permission denied: root only", uid=uid)
            request = parse_request(line)
        except UsageError as exc:
            log.warning("bad control request: %s", exc.message)
            _send(conn, _error_reply(exc))
            return
        conn.settimeout(CLIENT_TIMEOUT)  # for each reply: a client that stops reading
        try:
            result = self.handler(request, _ProgressSender(conn))
        except VmemError as exc:
            log.warning("control request %r refused: %s", request.op, exc.message)
            _send(conn, _error_reply(exc))
            return
        _send(conn, {"ok": True, "result": result})


class _ProgressSender:
    """Sends progress messages until the client stops taking them, then drops them.

    A client that stops reading (or goes away) must not cut a plug or unplug
    short half-way: the operation runs to its end either way.
    """

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.client_gone = False

    def __call__(self, progress: dict[str, Any]) -> None:
        if self.client_gone:
            return
        try:
            _send(self.conn, {"progress": progress})
        except OSError as exc:
            self.client_gone = True
            log.warning("control client stopped taking progress (%s); carrying on", exc)


def _read_line(conn: socket.socket, deadline: float, clock: Callable[[], float]) -> bytes:
    """The first line the client sends, read before ``deadline`` (on ``clock``): the
    deadline bounds the whole line, so a client trickling bytes cannot hold the agent."""
    buffer = b""
    while b"\n" not in buffer:
        left = deadline - clock()
        if left <= 0:
            raise UsageError(f"control request not received within {CLIENT_TIMEOUT:g} s")
        conn.settimeout(left)
        try:
            chunk = conn.recv(4096)
        except TimeoutError:
            raise UsageError(f"control request not received within {CLIENT_TIMEOUT:g} s") from None
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > MAX_MESSAGE_BYTES:
            raise UsageError(f"control request longer than {MAX_MESSAGE_BYTES} bytes")
    line = buffer.split(b"\n", 1)[0]
    if len(line) > MAX_MESSAGE_BYTES:
        raise UsageError(f"control request longer than {MAX_MESSAGE_BYTES} bytes")
    return line


class AgentError(VmemError):
    """An error the agent reported over the control socket (its fields are kept)."""


def call(
    path: Path,
    request: Operation,
    on_progress: Emit | None = None,
    timeout: float | None = None,
) -> dict[str, Any] | None:
    """Send one request to a running agent; None when no agent listens at ``path``.

    Raises AgentError (or UsageError for usage errors the agent reported), and
    TimeoutError when ``timeout`` seconds pass on one send or receive (the agent
    answers between steps, and a step may take long: an offline under pressure) or,
    with a ``timeout``, when its listen queue is full.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    with sock:
        try:
            sock.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                return None
            if exc.errno == errno.EAGAIN:
                # With a timeout the connect does not block: a full listen queue (the
                # agent inside a long step, clients queued behind it) answers EAGAIN
                # at once (net/unix/af_unix.c, unix_stream_connect). A busy agent.
                raise TimeoutError(f"the agent at {path} accepts no connection: busy") from None
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise UsageError(
                    f"permission denied: the agent's control socket {path} is for root only",
                    path=str(path),
                ) from None
            raise
        _send(sock, message_of(request))
        for message in _messages(sock):
            if "progress" in message:
                if on_progress is not None:
                    on_progress(message["progress"])
                continue
            if message.get("ok"):
                result: dict[str, Any] = message.get("result", {})
                return result
            error = message.get("error", {})
            cls = UsageError if error.get("error") == "UsageError" else AgentError
            fields = {k: v for k, v in error.items() if k not in ("error", "message")}
            raise cls(str(error.get("message", "agent error")), **fields)
    raise AgentError("the agent closed the connection without an answer")


def _messages(sock: socket.socket) -> Iterator[dict[str, Any]]:
    with sock.makefile("rb") as stream:
        for line in stream:
            message = json.loads(line)
            if isinstance(message, dict):
                yield message
