"""Live migration of a running test VM to a second QEMU on the same host.

The destination runs the source's own command line plus ``-incoming unix:PATH`` and
``-S`` (as a management layer starts one: it stays paused after the migration until
``cont``), with sockets of its own and its console appending to the same log. QMP
``migrate`` on the source streams the guest over that unix socket; once
``query-migrate`` says ``completed``, both sides' virtio-mem devices are read while
neither runs, the destination is resumed, and the :class:`~vmharness.vm.TestVM`
switches its QMP connection, command channel and process to it; the source (paused in
``postmigrate``) is told to quit. Only a :attr:`VMConfig.migratable` guest can be
migrated: QEMU refuses while a 9p export is mounted (docs/test-vm.md section 13).

While the migration runs the source still answers QMP (``vm.qmp``, ``vm.resize``): a
resize then lands inside the migration. A virtio-mem device answers every PLUG, UNPLUG
and UNPLUG_ALL with BUSY until it is over (QEMU's ``virtio_mem_is_busy``). Nothing may
be asked of the guest's command runner meanwhile: the channel moves with the guest.

    migration = vm.begin_migration()   # or prepare_migration(), then .start()
    vm.resize("vm0", size)             # the source's device: migrated with the guest
    stats = migration.finish()         # vm now drives the destination
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import RunPaths, qemu_argv
from .errors import MigrationFailed

if TYPE_CHECKING:
    from .vm import TestVM

#: Bytes per second the migration may use. QEMU's default cap (MAX_THROTTLE in
#: migration/migration.c: 32 MiB/s, 128 MiB/s in later versions) would stretch a local
#: migration of a 1 GiB guest to seconds or tens of seconds; this one lifts it.
MAX_BANDWIDTH = 4 << 30
#: How often the source's ``query-migrate`` is polled.
POLL_SECONDS = 0.05
#: Seconds for the destination to create its sockets, and to run after completion.
DESTINATION_SECONDS = 30.0
#: The migration socket's name in the destination's socket directory.
MIGRATE_SOCKET = "migrate.sock"


@dataclasses.dataclass(frozen=True)
class MigrationStats:
    """One completed migration, as the source's ``query-migrate`` and the clock saw it."""

    generation: int  #: the destination's number (1 for a run's first migration)
    seconds: float  #: from the ``migrate`` command to the destination running
    total_ms: int  #: QEMU's total-time
    downtime_ms: int  #: QEMU's downtime: the guest was paused this long
    setup_ms: int  #: QEMU's setup-time
    transferred: int  #: bytes of RAM sent
    #: Each virtio-mem device's ``size`` and ``requested-size`` on the source and on the
    #: destination, read with both paused after the migration.
    source_devices: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    destination_devices: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_info(cls, generation: int, seconds: float, info: dict[str, Any]) -> MigrationStats:
        """The stats of a ``query-migrate`` answer that says completed."""
        ram = info.get("ram", {})
        return cls(
            generation=generation,
            seconds=seconds,
            total_ms=int(info.get("total-time", 0)),
            downtime_ms=int(info.get("downtime", 0)),
            setup_ms=int(info.get("setup-time", 0)),
            transferred=int(ram.get("transferred", 0)),
        )


class Migration:
    """One migration of ``vm``: the destination QEMU, from its start to its adoption."""

    def __init__(self, vm: TestVM) -> None:
        assert vm.paths is not None, "VM not started"
        if not vm.config.migratable:
            raise MigrationFailed(
                f"{vm.config.name}: not a migratable VM (VMConfig.migratable): the guest"
                " keeps 9p mounted, which QEMU refuses to migrate"
            )
        self.vm = vm
        self.paths: RunPaths = vm.paths
        self.uri = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: Any = None
        self.started = 0.0

    def prepare(self) -> None:
        """Start the destination; it waits for the migration (seconds under TCG on a
        busy host: started first, the migration itself begins exactly when wanted)."""
        self._start_destination()

    def start(self) -> None:
        """``migrate`` on the source (returns at once; the migration runs)."""
        vm = self.vm
        try:
            vm.qmp("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
            self.started = time.monotonic()
            vm.qmp("migrate", uri=self.uri)
        except Exception as exc:
            self.abort()
            raise MigrationFailed(f"migrate refused: {exc}", vm.log_tail()) from exc

    def _start_destination(self) -> None:
        vm = self.vm
        source = vm.paths
        assert source is not None
        sock_dir = vm.new_sock_dir()
        self.paths = dataclasses.replace(
            source, sock_dir=sock_dir, generation=source.generation + 1
        )
        self.uri = f"unix:{sock_dir / MIGRATE_SOCKET}"
        argv = qemu_argv(vm.config, self.paths, vm.qemu_path, vm.accel, incoming=self.uri)
        argv.append("-S")
        cmdline = source.run_dir / f"qemu-cmdline-{self.paths.generation}.txt"
        cmdline.write_text(" ".join(argv) + "\n")
        self.proc = vm.spawn(argv, self.paths.qemu_log)
        wanted = (self.paths.qmp_sock, self.paths.cmd_sock, sock_dir / MIGRATE_SOCKET)
        deadline = time.monotonic() + DESTINATION_SECONDS
        while not all(path.exists() for path in wanted):
            self._check_destination()
            if time.monotonic() > deadline:
                self.abort()
                raise MigrationFailed("the destination QEMU did not create its sockets")
            time.sleep(0.02)
        from qemu.qmp.legacy import QEMUMonitorProtocol

        self.qmp = QEMUMonitorProtocol(str(self.paths.qmp_sock))
        self.qmp.connect()
        self.qmp.settimeout(30)

    def status(self) -> str:
        """The source's migration status (``setup``, ``active``, ``device``, ...)."""
        return str(self.vm.qmp("query-migrate").get("status", "none"))

    def finish(self, timeout: float = 600.0) -> MigrationStats:
        """Wait for ``completed``, read both sides' devices, resume the destination;
        switch ``vm`` to it and quit the source. MigrationFailed (the source carries
        on) otherwise."""
        vm = self.vm
        deadline = time.monotonic() + timeout
        while True:
            info = vm.qmp("query-migrate")
            status = str(info.get("status", "none"))
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                self.abort()
                raise MigrationFailed(
                    f"migration {status}: {info.get('error-desc', '')}", vm.log_tail()
                )
            self._check_destination()
            if time.monotonic() > deadline:
                with contextlib.suppress(Exception):
                    vm.qmp("migrate_cancel")
                self.abort()
                raise MigrationFailed(f"migration not completed after {timeout:.0f} s ({status})")
            time.sleep(POLL_SECONDS)
        self._wait_status("paused")
        stats = dataclasses.replace(
            MigrationStats.from_info(self.paths.generation, 0.0, info),
            source_devices=_virtio_mem(vm.qmp("query-memory-devices")),
            destination_devices=_virtio_mem(self.qmp.cmd("query-memory-devices")),
        )
        self.qmp.cmd("cont")
        self._wait_status("running")
        stats = dataclasses.replace(stats, seconds=time.monotonic() - self.started)
        assert self.proc is not None
        vm.adopt(self.proc, self.qmp, self.paths)
        self.proc = self.qmp = None
        return stats

    def _wait_status(self, wanted: str) -> None:
        """Until the destination's run state is ``wanted`` (``paused``: the incoming
        state is loaded; ``running``: resumed)."""
        deadline = time.monotonic() + DESTINATION_SECONDS
        while (status := self.qmp.cmd("query-status")["status"]) != wanted:
            self._check_destination()
            if time.monotonic() > deadline:
                self.abort()
                raise MigrationFailed(f"the destination is {status}, not {wanted}")
            time.sleep(POLL_SECONDS)

    def _check_destination(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            log = _tail(self.paths.qemu_log)
            self.abort()
            raise MigrationFailed(
                f"the destination QEMU exited ({self.proc.returncode}); its log:\n{log}",
                self.vm.log_tail(),
            )

    def abort(self) -> None:
        """Kill the destination and remove its sockets (the source carries on)."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None
        if self.paths is not self.vm.paths:
            shutil.rmtree(self.paths.sock_dir, ignore_errors=True)


def _virtio_mem(devices: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """``size`` and ``requested-size`` of each virtio-mem device of a
    ``query-memory-devices`` answer, by id."""
    return {
        str(dev["data"]["id"]): {
            "size": int(dev["data"]["size"]),
            "requested-size": int(dev["data"]["requested-size"]),
        }
        for dev in devices
        if dev.get("type") == "virtio-mem"
    }


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""
