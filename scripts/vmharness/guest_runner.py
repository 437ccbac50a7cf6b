"""Guest side of the harness's command channel (runs inside the VM, stdlib only).

Started by ``scripts/guest-init.sh`` as ``python3 -S guest_runner.py``. It opens the
virtio-serial port named :data:`PORT_NAME` and serves JSON-lines requests from the host
one at a time::

    {"id": 7, "op": "sh", "cmd": "cat /proc/meminfo", "timeout": 60}
    -> {"id": 7, "rc": 0, "out": "...", "timed_out": false, "elapsed": 0.01}

Ops: ``sh`` runs ``/bin/sh -c cmd`` as root in its own session (stdout and stderr
together, captured through a file so background children that keep the descriptors
open cannot hang the reply); ``read`` returns a file's text without starting a
process (from byte ``offset`` when given; ``bytes`` says how many it read, so a host
can follow a growing file), ``read_base64`` its bytes in base64 (binary files such as
a tracker: a shell and a ``base64`` process per read cost seconds under TCG on a busy
host); ``ping`` answers
with the boot id (the host uses it to notice a reboot); ``poweroff`` syncs and powers
the guest off.

Two ops save a Python start-up, which costs the guest 5-10 s under TCG on a busy host
(docs/startup.md): ``unix`` sends one line to a Unix socket and returns every line the
server answered (the agent's control protocol: a STATE through the running agent needs
no ``vmem-guest state`` process); ``call`` imports a ``vmem_guest`` module into this
process (once: from ``sys_path``) and returns a function's JSON result (the object
``vmem-guest status --json`` prints, read by the same code). Neither replaces the CLI
where a test is about the CLI: they are how the harness looks at the guest.
"""

from __future__ import annotations

import base64
import contextlib
import glob
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PORT_NAME = "vmharness.cmd"
MAX_OUT = 4 * 1024 * 1024


def find_port() -> str:
    """Return the /dev node of the virtio-serial port named PORT_NAME (waits for it)."""
    deadline = time.monotonic() + 30
    while True:
        for name_file in glob.glob("/sys/class/virtio-ports/*/name"):
            if Path(name_file).read_text().strip() == PORT_NAME:
                return "/dev/" + Path(name_file).parent.name
        if time.monotonic() > deadline:
            raise SystemExit(f"guest_runner: no virtio-serial port named {PORT_NAME}")
        time.sleep(0.1)


def boot_id() -> str:
    """The kernel's random boot id: changes at every boot."""
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def run_shell(cmd: str, timeout: float) -> dict[str, Any]:
    """Run cmd with /bin/sh -c; kill its whole session on timeout."""
    start = time.monotonic()
    with tempfile.TemporaryFile(dir=os.environ.get("TMPDIR", "/run")) as out:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", cmd],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",
        )
        timed_out = False
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
        out.seek(0, os.SEEK_END)
        size = out.tell()
        out.seek(max(0, size - MAX_OUT))
        text = out.read().decode("utf-8", "replace")
    return {"rc": rc, "out": text, "timed_out": timed_out, "elapsed": time.monotonic() - start}


def unix_request(path: str, line: str, timeout: float) -> dict[str, Any]:
    """Send ``line`` to the Unix stream socket at ``path``, close our side, return what
    the server wrote until it closed its side."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(line.encode() + b"\n")
            sock.shutdown(socket.SHUT_WR)
            with sock.makefile("rb") as stream:
                reply = stream.read()
        except OSError as e:
            return {"rc": 1, "out": f"{type(e).__name__}: {e}"}
    return {"rc": 0, "out": reply.decode("utf-8", "replace")}


#: Exit code of ``call`` when the module cannot be imported here (the host falls back
#: to starting the command instead).
CALL_IMPORT_FAILED = 125


def call_function(req: dict[str, Any]) -> dict[str, Any]:
    """``call``: run ``module.function(*args)`` of vmem_guest in this process."""
    module_name, function_name = str(req["module"]), str(req["function"])
    if module_name.split(".")[0] != "vmem_guest":
        return {"rc": 127, "out": f"call: not a vmem_guest module: {module_name!r}"}
    for entry in reversed(req.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, str(entry))
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        return {"rc": CALL_IMPORT_FAILED, "out": f"{type(e).__name__}: {e}"}
    try:
        result = function(*req.get("args", []))
    except Exception as e:  # the function's own error, for the host to report
        return {"rc": 1, "out": f"{type(e).__name__}: {e}"}
    return {"rc": 0, "out": json.dumps(result)}


def handle(req: dict[str, Any]) -> dict[str, Any]:
    """Serve one request."""
    op = req.get("op", "sh")
    if op == "ping":
        return {"rc": 0, "out": "pong", "boot_id": boot_id()}
    if op == "read":
        try:
            with open(req["path"], "rb") as f:
                offset = int(req.get("offset", 0))
                if offset:  # not for offset 0: a FIFO (chaos's kill trigger) cannot seek
                    f.seek(offset)
                data = f.read()
        except OSError as e:
            return {"rc": 1, "out": f"{type(e).__name__}: {e}"}
        return {"rc": 0, "out": data.decode("utf-8", "replace"), "bytes": len(data)}
    if op == "read_base64":
        try:
            data = Path(req["path"]).read_bytes()
        except OSError as e:
            return {"rc": 1, "out": f"{type(e).__name__}: {e}"}
        return {"rc": 0, "out": base64.b64encode(data).decode("ascii")}
    if op == "poweroff":
        os.sync()
        Path("/proc/sysrq-trigger").write_text("o")
        return {"rc": 0, "out": ""}
    if op == "sh":
        return run_shell(str(req["cmd"]), float(req.get("timeout", 60.0)))
    if op == "unix":
        return unix_request(str(req["path"]), str(req["line"]), float(req.get("timeout", 60.0)))
    if op == "call":
        return call_function(req)
    return {"rc": 127, "out": f"unknown op {op!r}"}


def write_all(fd: int, data: bytes) -> None:
    """Write every byte (the port may take less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def serve(path: str) -> None:
    """Read requests line by line and answer each one, forever."""
    fd = os.open(path, os.O_RDWR)
    buf = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:  # host side not connected: wait for it
            time.sleep(0.05)
            continue
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                req = json.loads(line)
                reply = handle(req)
                reply["id"] = req.get("id")
            except Exception as e:  # report, never die on a bad request
                reply = {"id": None, "rc": 126, "out": f"runner error: {type(e).__name__}: {e}"}
            write_all(fd, json.dumps(reply).encode() + b"\n")


def main() -> None:
    """Entry point inside the guest."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    port = find_port()
    print(f"guest_runner: serving on {port} (boot {boot_id()})", file=sys.stderr, flush=True)
    serve(port)


if __name__ == "__main__":
    main()
