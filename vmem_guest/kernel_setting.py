"""A kernel setting changed while vmem_guest serves, given back even after a SIGKILL.

Some writable kernel files (``/proc/sys/vm/compact_unevictable_allowed``,
``/sys/devices/system/memory/auto_online_blocks``) must hold another value while
the agent serves, and their own value again once it is gone. Restoring in a
``finally`` is not enough: a SIGKILL skips it, and the next start would then read
the agent's value as "the original" and keep it for good. So :func:`changed_setting`
writes the original down first, durably, in the state directory:

* ``<state_dir>/<escaped path>.setting``: JSON ``{"path", "original", "wanted",
  "boot_id"}``, written to a temporary file, fsynced, renamed into place and the
  directory fsynced, before the setting is touched. ``<escaped path>`` is the
  setting's path in ``systemd-escape --path`` style
  (``proc-sys-vm-compact_unevictable_allowed``).
* On exit the original is written back and the record removed. If the write-back
  fails the record stays, so the next start still knows the original.
* A start that finds a record of the same boot (``/proc/sys/kernel/random/boot_id``)
  and no live holder (below), the setting still at the recorded wanted value,
  takes the recorded value as the original: the process that wrote it was killed
  before it could restore. If the setting holds another value, someone set it
  since: that value is the original. A record of an
  earlier boot is stale (the reboot reset the setting): the current value is the
  original. A corrupt record is reported and the current value is taken as the
  original: only values read from the kernel are ever written back, never a
  guess. The warning names the value, since a killed agent may have left its own
  value in place; an operator then sets it by hand.
* Every process that holds the setting changed keeps a shared ``flock`` on
  ``<escaped path>.setting.lock``; the kernel drops it when the process dies,
  however it dies. The one that finds no other holder (an exclusive lock taken
  without waiting) owns the record; the last one out restores. So the agent and
  ``vmem-guest fuzz`` on another device can both hold the setting, and the first
  to leave does not restore it under the other.

A setting file that is absent (a kernel without that feature) or cannot be
written is reported, not fatal: the context manager yields False and the caller
decides whether it can work without it. Paths are arguments, so tests run
against a tree under a temporary directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from vmem_guest._linux.procfs import PROC_ROOT
from vmem_guest._linux.sysfs import read_value, read_value_or_none, write_word
from vmem_guest.tracker.files import make_state_dir

#: The kernel's id of this boot: tells a record of this boot from an earlier one's.
BOOT_ID = PROC_ROOT / "sys/kernel/random/boot_id"
RECORD_SUFFIX = ".setting"
LOCK_SUFFIX = ".setting.lock"
RECORD_MODE = 0o644


@dataclasses.dataclass(frozen=True)
class SettingRecord:
    """What the state directory holds for one setting while it is changed."""

    path: str
    original: str
    wanted: str
    boot_id: str | None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SettingRecord:
        """ValueError if ``text`` is not a record (bad JSON, missing or mistyped field)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        for key in ("path", "original", "wanted"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"field {key!r} missing or not a string")
        boot_id = data.get("boot_id")
        if boot_id is not None and not isinstance(boot_id, str):
            raise ValueError("field 'boot_id' is not a string")
        return cls(data["path"], data["original"], data["wanted"], boot_id)


def escaped_name(path: Path) -> str:
    """``path`` as one file name, the way ``systemd-escape --path`` does it: slashes
    at the ends dropped, inner ones become ``-``, any other byte outside
    ``[A-Za-z0-9_.]`` (and a leading ``.``) becomes ``\\xNN``. Distinct paths give
    distinct names."""
    out = []
    for index, byte in enumerate(str(path).strip("/").encode()):
        char = chr(byte)
        if char == "/":
            out.append("-")
        elif (char.isascii() and char.isalnum()) or char == "_" or (char == "." and index):
            out.append(char)
        else:
            out.append(f"\\x{byte:02x}")
    return "".join(out) or "-"


def record_path(state_dir: Path, setting: Path) -> Path:
    """Where the original value of ``setting`` is recorded."""
    return state_dir / (escaped_name(setting) + RECORD_SUFFIX)


@contextlib.contextmanager
def changed_setting(
    setting: Path,
    wanted: str,
    state_dir: Path,
    log: logging.Logger,
    *,
    boot_id_path: Path = BOOT_ID,
) -> Iterator[bool]:
    """Hold ``setting`` (a ``/proc/sys`` or ``/sys`` file) at ``wanted`` while the block runs.

    Yields True when ``wanted`` is in place, False when the file is absent or
    cannot be read or written, or the state directory cannot take the record
    (reported through ``log``; the caller decides whether it can work without
    it). On exit the original value is written back unless another live process
    still holds the setting. See the module docstring for the record that
    survives a SIGKILL.
    """
    if _read_setting(setting, log) is None:
        yield False
        return
    make_state_dir(state_dir)
    record = record_path(state_dir, setting)
    fd, sole = _hold(record.with_name(escaped_name(setting) + LOCK_SUFFIX), record)
    try:
        # Read again under the lock: a holder may have restored it while we waited.
        current = _read_setting(setting, log)
        applied = current is not None and _apply(
            setting, current, wanted, record, log, boot_id_path if sole else None
        )
        if applied and sole:
            fcntl.flock(fd, fcntl.LOCK_SH)  # others may join now: the record is written
    except BaseException:
        os.close(fd)
        raise
    if not applied:
        os.close(fd)  # a holder is one that changed the setting: see _hold
        yield False
        return
    try:
        yield True
    finally:
        try:
            if _last_holder(fd):
                _restore(setting, record, log)
        finally:
            os.close(fd)


def _hold(lock: Path, record: Path) -> tuple[int, bool]:
    """An fd of ``lock`` with its flock, and whether we are the sole holder.

    Sole: an exclusive lock, taken without waiting; any record is then a dead
    process's. Otherwise a shared lock beside the live holders (waiting only while
    one of them applies or restores, under its exclusive lock); if that holder gave
    up meanwhile (no record left), one more try for the exclusive lock.
    """
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, RECORD_MODE)
    try:
        if _try_exclusive(fd):
            return fd, True
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not record.exists() and _try_exclusive(fd):
            return fd, True
    except BaseException:
        os.close(fd)
        raise
    return fd, False


def _try_exclusive(fd: int) -> bool:
    """Take (or convert to) an exclusive flock on ``fd`` without waiting; False if held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _last_holder(fd: int) -> bool:
    """On exit: True if no other live process holds the setting (then we restore).

    flock(2): converting a lock is not atomic, so two holders leaving at once may
    both let go of their shared lock before either asks for the exclusive one; one
    of them then gets it, and a restore happens once.
    """
    return _try_exclusive(fd)


def _apply(
    setting: Path,
    current: str,
    wanted: str,
    record: Path,
    log: logging.Logger,
    boot_id_path: Path | None,
) -> bool:
    """Write ``wanted`` to ``setting`` (now ``current``); True if it is in place.

    ``boot_id_path`` None: a live holder has recorded the original already; else
    record it first (False, setting untouched, if that cannot be done).
    """
    original = current
    if boot_id_path is not None:
        boot_id = read_value_or_none(boot_id_path)
        original = _original(setting, current, record, log, boot_id)
        entry = SettingRecord(str(setting), original, wanted, boot_id)
        if not _write_record(record, entry, log):
            return False
    if current == wanted:
        return True
    try:
        write_word(setting, wanted, truncate=True)
    except OSError as exc:
        log.warning("cannot write %s to %s (%s): serving without it", wanted, setting, exc.strerror)
        if boot_id_path is not None and original == current:
            _remove(record)  # else the value in place is not the system's: keep its original
        return False
    log.info("%s: %s -> %s while serving", setting, current, wanted)
    return True


def _read_setting(setting: Path, log: logging.Logger) -> str | None:
    """The value of ``setting``; None (and a warning) when it cannot be read."""
    try:
        return read_value(setting)
    except FileNotFoundError:
        log.warning("%s does not exist (not in this kernel): serving without it", setting)
    except OSError as exc:
        log.warning("cannot read %s (%s): serving without it", setting, exc.strerror)
    return None


def _original(
    setting: Path, current: str, record: Path, log: logging.Logger, boot_id: str | None
) -> str:
    """The value to restore: the one a dead process recorded in ``record`` this
    boot, else ``current``."""
    try:
        old = SettingRecord.from_json(record.read_text())
        if old.path != str(setting):
            raise ValueError(f"it names {old.path}")
    except FileNotFoundError:
        return current
    except (OSError, ValueError) as exc:
        log.warning(
            "%s is unusable (%s): taking the current value %s of %s as its original;"
            " if a vmem-guest process was killed while holding it, that may be its own"
            " value: set the original by hand",
            record,
            exc,
            current,
            setting,
        )
        return current
    if old.boot_id is not None and boot_id is not None and old.boot_id != boot_id:
        log.info("%s is from an earlier boot: %s holds its own value %s", record, setting, current)
        return current
    if current != old.wanted:
        # Someone set it since the holder died: that value is the system's now.
        log.info(
            "%s holds %s, not the %s a dead vmem-guest process set: keeping it as the original",
            setting,
            current,
            old.wanted,
        )
        return current
    if old.original != current:
        log.warning(
            "%s was left at %s by a vmem-guest process that did not exit cleanly:"
            " its original %s (recorded in %s) is restored on exit",
            setting,
            current,
            old.original,
            record,
        )
    return old.original


def _write_record(record: Path, entry: SettingRecord, log: logging.Logger) -> bool:
    """Write ``entry`` to ``record`` atomically and durably; False (and a warning) if not."""
    temp = record.with_name(f".{record.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, RECORD_MODE
        )
        try:
            os.write(fd, entry.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, record)
        _fsync_dir(record.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        log.warning(
            "cannot record the original %s of %s in %s (%s): leaving it unchanged",
            entry.original,
            entry.path,
            record,
            exc.strerror,
        )
        return False
    return True


def _fsync_dir(directory: Path) -> None:
    """fsync ``directory``: the rename into it survives a crash (fsync(2), NOTES)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore(setting: Path, record: Path, log: logging.Logger) -> None:
    """Write the recorded original back to ``setting`` and remove ``record``; on
    failure the record stays, so the next start still knows the original."""
    try:
        entry = SettingRecord.from_json(record.read_text())
    except FileNotFoundError:
        log.warning("%s is gone: %s left as it is", record, setting)
        return
    except (OSError, ValueError) as exc:
        log.error("%s is unusable (%s): %s left as it is", record, exc, setting)
        return
    try:
        write_word(setting, entry.original, truncate=True)
    except OSError as exc:
        log.error(
            "cannot restore %s to %s (%s): %s stays for the next start",
            setting,
            entry.original,
            exc.strerror,
            record,
        )
        return
    _remove(record)
    log.info("%s restored to %s", setting, entry.original)


def _remove(record: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        record.unlink()
