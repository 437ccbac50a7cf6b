"""TestVM: one QEMU guest with virtio-mem devices, QMP control and a command runner.

Typical use::

    cfg = VMConfig(devices=(MemDevice("vm0", size=4 * GiB),))
    with TestVM(cfg) as vm:
        vm.resize("vm0", 1 * GiB)
        vm.wait_until(lambda: vm.plugged("vm0") == 1 * GiB, timeout=30)
        rc, out = vm.guest("grep MemTotal /proc/meminfo")

Everything a run leaves behind (console.log, qemu.log, the writable ``share/``) is in
``results/vm/<time>-<name>-<pid>/`` of the checkout; sockets live in a temp dir that
is removed on close. QEMU is killed on close, at interpreter exit, and (PDEATHSIG)
when the Python process dies.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import dataclasses
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from . import host, paths, ramroot
from .channel import ChannelTimeout, GuestChannel
from .config import RunPaths, VMConfig, qemu_argv
from .errors import GuestCommandError, HarnessError, VMError, VMTimeout
from .migration import Migration, MigrationStats

T = TypeVar("T")

#: Every VM not yet closed (the pytest plugin prints their console tails on failure).
LIVE_VMS: set[TestVM] = set()
PANIC_MARK = b"Kernel panic - not syncing"
KEEP_RUNS = 100  #: run directories kept under results/vm/


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _prune_runs(root: Path, keep: int) -> None:
    """Delete all but the newest keep run dirs, never one whose process still runs
    (the name ends with the owner's pid)."""
    runs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name)
    for old in runs[:-keep]:
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        shutil.rmtree(old, ignore_errors=True)


def _prune_stale_sockets() -> None:
    """Remove /tmp/vmh-* socket dirs whose owning process is gone (killed with SIGKILL,
    where no cleanup can run; QEMU itself died with it through PDEATHSIG)."""
    for owner in Path("/tmp").glob("vmh-*/owner"):
        try:
            pid = int(owner.read_text())
        except (OSError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(owner.parent, ignore_errors=True)


#: Boot time added for a VM whose guest first copies its RAM root (VMConfig.ram_root).
RAM_ROOT_COPY_SECONDS = 180.0


#: Boots of a new VM tried when QEMU itself dies of a signal before the guest answers
#: (a QEMU crash, not the guest's or the project's: ``TestVM._note_qemu_crash``).
BOOT_ATTEMPTS = 2


class TestVM:
    """A running test VM; use as a context manager (or call start() and close())."""

    __test__ = False  # not a pytest test class

    def __init__(
        self,
        config: VMConfig | None = None,
        *,
        boot_timeout: float = 120.0,
        accel: str | None = None,
        pair: host.Pair | None = None,
    ) -> None:
        """``pair``: the QEMU and guest Linux series (default: the environment's)."""
        self.config = config or VMConfig()
        self.pair = pair or host.Pair.from_env()
        #: QEMU's version as it reports it (``7.2.x``, ``10.0.2``), set by start().
        self.qemu_version = ""
        #: The qemu-system-x86_64 the VM runs (a migration's destination runs it too).
        self.qemu_path = ""
        # A RAM root is copied from the 9p root before the runner starts: 437 paths,
        # 115 MiB, which took a Linux 6.1 TCG guest past the plain 120 s (runner up
        # after about 120 s, measured 2026-12-07; docs/test-vm.md section 3).
        self.boot_timeout = boot_timeout + (RAM_ROOT_COPY_SECONDS if self.config.ram_root else 0)
        self._accel = accel
        self.accel = ""
        self.boot_id = ""
        self.boot_seconds = 0.0
        self.paths: RunPaths | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._chan: GuestChannel | None = None
        self._qmp: Any = None
        #: One QMP command at a time: a benchmark polls QEMU from a thread of its own.
        self._qmp_lock = threading.Lock()
        self._console_seen = 0
        #: A migration begun and not yet finished (its destination is killed on close).
        self._migration: Migration | None = None
        self._argv: list[str] = []

    # ----- lifecycle -----------------------------------------------------------------
    def __enter__(self) -> TestVM:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Start QEMU and wait for the guest runner. Raises HostUnavailable when QEMU or
        the kernel cannot be had, VMTimeout when the guest does not come up."""
        qemu = host.find_qemu(pair=self.pair)
        kernel = host.find_kernel(pair=self.pair)
        self.qemu_version = host.qemu_version(qemu)
        self.qemu_path = qemu
        self.accel = self._accel or host.choose_accel(qemu, kernel)
        if self.accel == "tcg" and self.config.migratable:
            thread = host.migration_tcg_thread(self.pair.linux, self.config.tcg_thread)
            self.config = dataclasses.replace(self.config, tcg_thread=thread)
        paths.compile_checkout()
        root = paths.results_dir() / "vm"
        root.mkdir(parents=True, exist_ok=True)
        _prune_runs(root, KEEP_RUNS)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = root / f"{stamp}-{self.config.name}-{os.getpid()}"
        share = run_dir / "share"
        share.mkdir(parents=True)
        _prune_stale_sockets()
        sock_dir = self.new_sock_dir()
        self.paths = RunPaths(
            kernel=kernel,
            run_dir=run_dir,
            share=share,
            sock_dir=sock_dir,
            # In a RAM root the runner uses the one interpreter copied: the venv's.
            python=str(paths.VENV_PYTHON) if self.config.ram_root else RunPaths.python,
        )
        if self.config.ram_root:
            ramroot.write_ram_root_list(share, paths.VENV_PYTHON, paths.REPO_ROOT)
        self._make_disks()
        self._argv = qemu_argv(self.config, self.paths, qemu, self.accel)
        (run_dir / "qemu-cmdline.txt").write_text(" ".join(self._argv) + "\n")
        LIVE_VMS.add(self)
        t0 = time.monotonic()
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            self._launch()
            try:
                self._connect()
                self.boot_id = self.wait_ready(self.boot_timeout)
                break
            except BaseException:
                signal_number = self._qemu_killed_by()
                if attempt == BOOT_ATTEMPTS or signal_number is None:
                    self.close()
                    raise
                self._note_qemu_crash(signal_number, attempt)
        self.boot_seconds = time.monotonic() - t0

    def _qemu_killed_by(self) -> int | None:
        """The signal QEMU died of, if it did (None: it runs, or exited by itself)."""
        if self._proc is None:
            return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5.0)  # a reset connection may come just before the exit
        code = self._proc.returncode
        return -code if code is not None and code < 0 else None

    def _note_qemu_crash(self, signal_number: int, attempt: int) -> None:
        """Before the guest ever answered, QEMU itself died of a signal: say so in
        qemu.log and get ready to start it again. Seen in make test: Debian's QEMU 7.2
        segfaulted twice at the same instruction while the guest kernel was still
        enumerating PCI, 1 s into a boot, no project code running yet."""
        assert self.paths is not None
        with self.paths.qemu_log.open("a") as log:
            log.write(
                f"vmharness: QEMU died of signal {signal_number} before the guest runner"
                f" answered (boot attempt {attempt}); starting it again\n"
            )
        self._drop_connections()

    @staticmethod
    def new_sock_dir() -> Path:
        """A short temp dir for one QEMU's sockets, marked with our pid (removed on close,
        or by a later run once we are gone)."""
        sock_dir = Path(tempfile.mkdtemp(prefix="vmh-", dir="/tmp"))
        (sock_dir / "owner").write_text(str(os.getpid()))
        return sock_dir

    @staticmethod
    def spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        """Start a QEMU with its output appended to ``log``; it dies with this process."""
        with open(log, "ab") as qlog:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=qlog,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def _make_disks(self) -> None:
        """The persistent root's copy of the image and the swap disk, when configured
        (sparse files in the run directory; :meth:`close` removes them)."""
        assert self.paths is not None
        if self.config.persistent_root and self.config.root_image is not None:
            cp = ["cp", "--sparse=always", "--reflink=auto"]
            subprocess.run(
                [*cp, str(self.config.root_image), str(self.paths.root_copy)], check=True
            )
        if self.config.swap_disk:
            with open(self.paths.swap_img, "wb") as disk:
                disk.truncate(self.config.swap_disk)

    def _launch(self) -> None:
        """Start QEMU with the run's command line (its output appended to qemu.log)."""
        assert self.paths is not None
        self._proc = self.spawn(self._argv, self.paths.qemu_log)

    def restart(self, exit_timeout: float = 300.0) -> None:
        """Wait for the guest to power itself off (a hibernation, say), then start QEMU
        again with the same command line and disks (``persistent_root``) and wait for the
        runner, whichever boot it answers from (a resumed guest keeps its boot id)."""
        assert self._proc is not None and self.paths is not None
        if not self._wait_exit(exit_timeout):
            raise VMTimeout(
                f"the guest did not power off within {exit_timeout:.0f} s", self.log_tail()
            )
        self._check_panic()
        self._drop_connections()
        self._launch()
        self._connect()
        self.boot_id = self.wait_ready(self.boot_timeout)

    def _drop_connections(self) -> None:
        """Close QMP and the channel of a QEMU that has gone; remove its sockets so
        :meth:`_connect` waits for the next QEMU's."""
        assert self.paths is not None
        for conn in (self._qmp, self._chan):
            with contextlib.suppress(Exception):
                conn.close()
        self._qmp = self._chan = None
        for sock in (self.paths.qmp_sock, self.paths.cmd_sock):
            sock.unlink(missing_ok=True)

    def _connect(self) -> None:
        from qemu.qmp.legacy import QEMUMonitorProtocol

        assert self.paths is not None
        deadline = time.monotonic() + 15
        while not (self.paths.qmp_sock.exists() and self.paths.cmd_sock.exists()):
            self._check_alive()
            if time.monotonic() > deadline:
                raise VMTimeout("QEMU did not create its sockets", self.log_tail())
            time.sleep(0.02)
        self._qmp = QEMUMonitorProtocol(str(self.paths.qmp_sock))
        self._qmp.connect()
        self._qmp.settimeout(30)
        self._chan = GuestChannel(self.paths.cmd_sock)

    def _check_alive(self) -> None:
        """Raise VMError if QEMU has exited or the guest kernel panicked."""
        self._check_panic()
        if self._proc is None or self._proc.poll() is not None:
            rc = None if self._proc is None else self._proc.returncode
            qlog = ""
            if self.paths and self.paths.qemu_log.exists():
                qlog = self.paths.qemu_log.read_text(errors="replace")[-2000:]
            raise VMError(
                f"QEMU is not running (exit status {rc}); qemu.log:\n{qlog}", self.log_tail()
            )

    def _check_panic(self) -> None:
        if self.paths is None:
            return
        try:
            size = self.paths.console_log.stat().st_size
        except FileNotFoundError:
            return
        if size == self._console_seen:
            return
        with open(self.paths.console_log, "rb") as f:
            f.seek(max(0, self._console_seen - len(PANIC_MARK)))
            chunk = f.read(size - f.tell())
        self._console_seen = size
        if PANIC_MARK in chunk:
            raise VMError("the guest kernel panicked", self.log_tail(80))

    @property
    def alive(self) -> bool:
        """True while the QEMU process runs."""
        return self._proc is not None and self._proc.poll() is None

    def wait_ready(self, timeout: float, not_boot: str = "") -> str:
        """Wait until the guest runner answers (from a boot other than not_boot); return
        the boot id."""
        assert self._chan is not None
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            left = deadline - time.monotonic()
            if left <= 0:
                raise VMTimeout(f"guest runner not ready after {timeout:.0f} s", self.log_tail())
            try:
                r = self._chan.request({"op": "ping"}, timeout=min(left, 3.0))
            except ChannelTimeout:
                continue
            bid = str(r.get("boot_id", ""))
            if bid and bid != not_boot:
                return bid
            time.sleep(0.1)

    def shutdown(self, timeout: float = 15.0) -> None:
        """Power the guest off cleanly (sysrq o); QMP quit, then kill, if it lingers."""
        if not self.alive:
            return
        if self._chan is not None:
            with contextlib.suppress(HarnessError, OSError):
                self._chan.request({"op": "poweroff"}, timeout=1.0)
        if self._wait_exit(timeout):
            return
        with contextlib.suppress(Exception):
            self._qmp.cmd("quit")
        self._wait_exit(5.0)

    def _wait_exit(self, timeout: float) -> bool:
        assert self._proc is not None
        try:
            self._proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def close(self) -> None:
        """Shut down (killing QEMU if it must), close sockets, remove the socket dir.
        Safe to call twice, and on a VM that failed to start."""
        if self._migration is not None:
            self._migration.abort()
            self._migration = None
        try:
            if self.alive:
                self.shutdown()
        except Exception:
            pass
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                self._qmp.close()
            self._qmp = None
        if self._chan is not None:
            self._chan.close()
            self._chan = None
        if self.paths is not None:
            shutil.rmtree(self.paths.sock_dir, ignore_errors=True)
            for disk in (self.paths.root_copy, self.paths.swap_img):
                disk.unlink(missing_ok=True)  # hundreds of MB each, of no use afterwards
        LIVE_VMS.discard(self)

    # ----- guest commands ------------------------------------------------------------
    def guest(self, cmd: str, timeout: float = 60.0, check: bool = False) -> tuple[int, str]:
        """Run ``/bin/sh -c cmd`` as root in the guest; return (rc, stdout+stderr).

        rc is -9 when the command timed out (its session is killed). With check=True a
        non-zero rc raises GuestCommandError, whose message ends with the console tail.
        For a background daemon redirect its output and detach it, e.g.
        ``setsid prog >/run/prog.log 2>&1 < /dev/null &``.
        """
        assert self._chan is not None, "VM not started"
        self._check_alive()
        started = time.monotonic()
        try:
            r = self._chan.request({"op": "sh", "cmd": cmd, "timeout": timeout}, timeout + 15)
        except ChannelTimeout as e:
            raise self._runner_silent(e, f"command: {cmd}") from e
        self._log_command(started, f"sh {cmd}")
        rc = int(r["rc"])
        out = str(r["out"])
        if r.get("timed_out"):
            rc = -9
            out += f"\n[harness: killed after {timeout} s]"
        if check and rc != 0:
            raise GuestCommandError(cmd, rc, out, self.log_tail())
        return rc, out

    def sh(self, cmd: str, timeout: float = 60.0) -> str:
        """Run cmd in the guest, raise GuestCommandError (with console tail) unless rc is 0;
        return its output."""
        return self.guest(cmd, timeout, check=True)[1]

    def runner_request(self, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        """One request of the guest runner's own ops (``unix``, ``call``: see
        guest_runner.py), answered in the runner's process; its reply as it came."""
        assert self._chan is not None, "VM not started"
        self._check_alive()
        started = time.monotonic()
        try:
            reply: dict[str, Any] = self._chan.request(request, timeout + 15)
        except ChannelTimeout as e:
            raise self._runner_silent(e, f"request: {request.get('op')}") from e
        what = request.get("function") or request.get("line") or ""
        self._log_command(started, f"{request.get('op')} {what}")
        return reply

    def _log_command(self, started: float, what: str) -> None:
        """One line per guest command in the run's commands.log: seconds it took, what
        it was. Where a VM test's time goes (docs/test-vm.md)."""
        if self.paths is not None:
            with (self.paths.run_dir / "commands.log").open("a") as log:
                log.write(f"{time.monotonic() - started:8.2f} {what[:160]!r}\n")

    def read(self, path: str) -> str:
        """A guest file's text, read by the runner itself (no process is started)."""
        return self.read_from(path, 0)[0]

    def read_from(self, path: str, offset: int) -> tuple[str, int]:
        """A guest file's text from byte ``offset`` on, and how many bytes that was (to
        follow a file that grows), read by the runner itself (no process is started)."""
        assert self._chan is not None, "VM not started"
        self._check_alive()
        r = self._chan.request({"op": "read", "path": path, "offset": offset}, timeout=30)
        if r["rc"] != 0:
            raise GuestCommandError(f"read {path}", int(r["rc"]), str(r["out"]), self.log_tail())
        return str(r["out"]), int(r["bytes"])

    def read_bytes(self, path: str) -> bytes:
        """A guest file's bytes, read by the runner itself (no process is started)."""
        assert self._chan is not None, "VM not started"
        self._check_alive()
        r = self._chan.request({"op": "read_base64", "path": path}, timeout=30)
        if r["rc"] != 0:
            raise GuestCommandError(f"read {path}", int(r["rc"]), str(r["out"]), self.log_tail())
        return base64.b64decode(str(r["out"]))

    def meminfo(self) -> dict[str, int]:
        """The guest's /proc/meminfo in bytes (kB fields converted)."""
        info: dict[str, int] = {}
        for line in self.read("/proc/meminfo").splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                info[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
        return info

    def mem_total(self) -> int:
        """The guest's MemTotal in bytes."""
        return self.meminfo()["MemTotal"]

    # ----- host control --------------------------------------------------------------
    def qmp(self, command: str, **args: Any) -> Any:
        """Run a QMP command; return its result (raises qemu.qmp.ExecuteError on error).
        Safe to call from several threads (one command at a time)."""
        self._check_alive()
        with self._qmp_lock:
            result = self._qmp.cmd(command, **args)
            self._qmp.clear_events()
        return result

    def query(self) -> dict[str, dict[str, Any]]:
        """QEMU's query-memory-devices, by device id: each dict has QEMU's keys (size,
        requested-size, max-size, block-size, memaddr, node, memdev) plus "type"."""
        out: dict[str, dict[str, Any]] = {}
        for dev in self.qmp("query-memory-devices"):
            data = dict(dev["data"])
            data["type"] = dev["type"]
            out[str(data.get("id"))] = data
        return out

    def plugged(self, device_id: str) -> int:
        """QEMU's plugged size of a virtio-mem device (qom-get size)."""
        return int(self.qmp("qom-get", path=f"/machine/peripheral/{device_id}", property="size"))

    def resize(self, device_id: str, size: int) -> None:
        """Set a virtio-mem device's requested-size (qom-set)."""
        self.qmp(
            "qom-set",
            path=f"/machine/peripheral/{device_id}",
            property="requested-size",
            value=int(size),
        )

    def wait_until(
        self,
        predicate: Callable[[], T],
        timeout: float = 30.0,
        interval: float = 0.05,
        what: str = "",
    ) -> T:
        """Call predicate until it returns something truthy and return that; raise
        VMTimeout (with the console tail) after timeout seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                name = what or getattr(predicate, "__name__", "condition")
                raise VMTimeout(f"timed out after {timeout} s waiting for {name}", self.log_tail())
            self._check_alive()
            time.sleep(interval)

    def reset(self, timeout: float | None = None) -> None:
        """QMP system_reset, then wait for the guest runner of the new boot."""
        old = self.boot_id
        self.qmp("system_reset")
        self.boot_id = self.wait_ready(timeout or self.boot_timeout, not_boot=old)

    # ----- live migration (migration.py) --------------------------------------------
    def prepare_migration(self) -> Migration:
        """Start a destination QEMU, waiting for the guest; ``.start()`` migrates."""
        migration = Migration(self)
        self._migration = migration
        migration.prepare()
        return migration

    def begin_migration(self) -> Migration:
        """Start a destination QEMU and ``migrate`` to it; returns while the migration
        runs (QMP still reaches the source). Finish it with ``.finish()``."""
        migration = self.prepare_migration()
        migration.start()
        return migration

    def migrate(self, timeout: float = 600.0) -> MigrationStats:
        """Migrate the running guest to a new QEMU on this host and drive that one."""
        return self.begin_migration().finish(timeout)

    def adopt(self, proc: subprocess.Popen[bytes], qmp: Any, run_paths: RunPaths) -> None:
        """Drive a migration's destination from now on (it runs the guest); the source
        is told to quit, and must answer with the same boot: VMError otherwise."""
        old_proc, old_qmp, old_chan, old_paths = self._proc, self._qmp, self._chan, self.paths
        with self._qmp_lock:
            self._proc, self._qmp, self.paths = proc, qmp, run_paths
        self._migration = None
        self._chan = GuestChannel(run_paths.cmd_sock)
        with contextlib.suppress(Exception):
            old_qmp.cmd("quit")
        if old_proc is not None:
            try:
                old_proc.wait(15)
            except subprocess.TimeoutExpired:
                old_proc.kill()
                old_proc.wait()
        with contextlib.suppress(Exception):
            old_qmp.close()
        if old_chan is not None:
            old_chan.close()
        if old_paths is not None:
            shutil.rmtree(old_paths.sock_dir, ignore_errors=True)
        boot = self.wait_ready(60)
        if boot != self.boot_id:
            raise VMError(f"the guest answered as boot {boot}, not {self.boot_id}", self.log_tail())

    # ----- logs ----------------------------------------------------------------------
    def _runner_silent(self, timeout: ChannelTimeout, what: str) -> VMTimeout:
        """The error for a guest runner that did not answer ``what`` in time: QEMU
        still runs (else :meth:`_check_alive` raises), the guest kernel's task dump is
        in the console, and its tail in the error."""
        self._check_alive()
        self.ask_kernel_for_stuck_tasks()
        return VMTimeout(f"{timeout} ({what})", self.log_tail())

    def ask_kernel_for_stuck_tasks(self, settle: float = 5.0) -> None:
        """When the guest runner stops answering, have the guest kernel print where
        its tasks are to the console (console.log): Magic SysRq typed on QEMU's
        keyboard, so nothing in the guest has to run. ``7`` raises the console
        level first (a test may have lowered it), ``t`` lists every task with its
        state and stack (the runner waiting in a read shows there, not in the
        blocked tasks of ``w``; about 900 lines, 2 s under TCG), ``l`` backtraces
        the CPUs. Best effort: a guest that lost its keyboard prints nothing."""
        with contextlib.suppress(Exception):
            for key in ("7", "t", "l"):
                self.qmp("human-monitor-command", **{"command-line": f"sendkey alt-sysrq-{key}"})
            time.sleep(settle)

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the guest's serial console."""
        if self.paths is None or not self.paths.console_log.exists():
            return ""
        text = self.paths.console_log.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        where = self.paths.run_dir if self.paths else "not started"
        return f"TestVM({self.config.name!r}, {self.accel or '?'}, {where})"


@atexit.register
def _close_all() -> None:
    for vm in list(LIVE_VMS):
        vm.close()
