"""The tracker's files: where they live, the lock, mapping, setting aside, creating.

The owner holds an exclusive ``flock`` on ``<name>.lock`` beside the state
file for as long as it owns the device. :func:`lock_device` is the one public
way to take that lock: the owner, the conformance fuzzer and the chaos
harness use it, so "who owns this device" has one answer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import mmap
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from vmem_guest.errors import TrackerError, TrackerLocked
from vmem_guest.tracker.layout import (
    DEFAULT_RECORD,
    DEFAULT_STATE_DIR,
    HEADER_SIZE,
    KEEP_SET_ASIDE,
    LOCK_SUFFIX,
    MAGIC,
    NAME_UNSAFE,
    NO_INTENT,
    RECORD_SIZE,
    STATE_DIR_MODE,
    STATE_FILE_MODE,
    STATE_SUFFIX,
    VERSION,
    FileLayout,
    TrackerHeader,
)
from vmem_guest.tracker.snapshot import (
    TrackerIdentity,
    TrackerSnapshot,
    check_header,
    consistency_problem,
    decode,
)


def tracker_path(state_dir: Path, name: str) -> Path:
    """``<state_dir>/<name>.state`` with ``name`` made safe for a file name.

    Letters, digits, ``.``, ``_``, ``:`` and ``-`` are kept; anything else
    (``/`` above all) becomes ``_``; a leading dot is replaced too.
    """
    safe = NAME_UNSAFE.sub("_", name)
    if not safe or safe.startswith("."):
        safe = "_" + safe[1:] if safe else "_"
    return Path(state_dir) / f"{safe}{STATE_SUFFIX}"


def list_trackers(state_dir: Path = DEFAULT_STATE_DIR) -> list[Path]:
    """The state files in ``state_dir``, sorted; empty if it does not exist."""
    directory = Path(state_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"*{STATE_SUFFIX}") if p.is_file())


def lock_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name[: -len(STATE_SUFFIX)] + LOCK_SUFFIX)


def untrusted_reason(st: os.stat_result) -> str | None:
    """Why a file with ``st`` must not be trusted, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if os.geteuid() == 0:
        if st.st_uid != 0:
            return f"owned by uid {st.st_uid}, not root"
        if st.st_mode & stat.S_IWOTH:
            return "world-writable"
    return None


def read_all(fd: int, size: int) -> bytes:
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def make_state_dir(state_dir: Path) -> None:
    """Create ``state_dir`` (mode STATE_DIR_MODE) unless it exists."""
    try:
        state_dir.mkdir(parents=True)
    except FileExistsError:
        if not state_dir.is_dir():
            raise TrackerError(f"{state_dir} exists and is not a directory") from None
        return
    os.chmod(state_dir, STATE_DIR_MODE)


def take_lock(lock_path: Path) -> int:
    """An fd holding the exclusive flock of ``lock_path``; TrackerLocked if held."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(lock_path, flags, STATE_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_pid(fd)
        os.close(fd)
        who = f" by pid {holder}" if holder else ""
        raise TrackerLocked(
            f"tracker {lock_path.with_suffix(STATE_SUFFIX)} is locked{who}",
            path=str(lock_path),
            holder_pid=holder,
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_device(state_dir: Path, name: str) -> tuple[Path, int]:
    """Take device ``name``'s lock in ``state_dir``: (its state file's path, the lock fd).

    Creates ``state_dir`` (mode STATE_DIR_MODE) if needed. The fd holds an
    exclusive ``flock`` on ``<name>.lock`` with our pid written inside, until
    it is closed. TrackerLocked (with the holder's pid) when another process,
    or another open tracker of this one, owns the device.
    """
    state_dir = Path(state_dir)
    make_state_dir(state_dir)
    path = tracker_path(state_dir, name)
    return path, take_lock(lock_path(path))


@contextlib.contextmanager
def device_locked(state_dir: Path, name: str) -> Iterator[Path]:
    """:func:`lock_device` for a ``with`` block; yields the state file's path."""
    path, fd = lock_device(state_dir, name)
    try:
        yield path
    finally:
        os.close(fd)


def read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def map_existing(
    path: Path, identity: TrackerIdentity
) -> tuple[mmap.mmap | None, str | None, TrackerSnapshot | None]:
    """The mapping of a valid existing file and the snapshot it was validated by
    (the owner builds its state from it: one decode at open, not two), or
    (None, why it was rejected, None).

    (None, None, None) when there is no file at all.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None, None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "is a symbolic link", None
        return None, f"cannot open: {exc.strerror}", None
    try:
        st = os.fstat(fd)
        untrusted = untrusted_reason(st)
        if untrusted is not None:
            return None, untrusted, None
        snap, reason = validated(read_all(fd, st.st_size), st.st_size, identity)
        if snap is None:
            return None, reason, None
        flags = mmap.PROT_READ | mmap.PROT_WRITE
        return mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, flags), None, snap
    finally:
        os.close(fd)


def validated(
    buf: bytes, file_size: int, identity: TrackerIdentity
) -> tuple[TrackerSnapshot | None, str | None]:
    """(the snapshot of ``buf``, None) if it can be reused for ``identity``, else
    (None, why not)."""
    try:
        check_header(buf, file_size)
        snap = decode(buf)
    except TrackerError as exc:
        return None, exc.message
    if snap.identity != identity:
        return None, f"identity mismatch: file is for {snap.identity}, wanted {identity}"
    if snap.generation & 1:
        return None, f"interrupted write (generation {snap.generation} is odd)"
    problem = consistency_problem(snap)
    return (None, problem) if problem is not None else (snap, None)


def set_aside(path: Path) -> Path:
    """Rename ``path`` to a fresh ``<name>.bad-<UTC timestamp>[-n]`` beside it.

    Only the newest :data:`KEEP_SET_ASIDE` of a device's set-aside files are
    kept (enough to look into a problem; a crash loop must not fill /run).
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.bad-{stamp}")
    attempt = 1
    while aside.exists() or aside.is_symlink():
        attempt += 1
        aside = path.with_name(f"{path.name}.bad-{stamp}-{attempt}")
    os.rename(path, aside)
    prune_set_aside(path, keep=aside)
    return aside


def prune_set_aside(path: Path, keep: Path) -> None:
    """Remove all but the newest KEEP_SET_ASIDE ``<name>.bad-*`` files (``keep`` stays)."""
    older = [p for p in path.parent.glob(f"{glob.escape(path.name)}.bad-*") if p != keep]
    older.sort(key=lambda p: (p.lstat().st_mtime_ns, p.name))
    for stale in older[: max(0, len(older) - (KEEP_SET_ASIDE - 1))]:
        with contextlib.suppress(OSError):  # gone already, or not a file: leave it
            stale.unlink()


def create_fresh(path: Path, identity: TrackerIdentity) -> mmap.mmap:
    """Write a fresh tracker under a temporary name, map it, then rename it into place.

    Readers therefore never see a half-initialised file.
    """
    image = fresh_image(identity)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, STATE_FILE_MODE)
    try:
        os.fchmod(fd, STATE_FILE_MODE)
        os.ftruncate(fd, len(image))
        os.pwrite(fd, image, 0)
        mapping = mmap.mmap(fd, len(image), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    finally:
        os.close(fd)
    return mapping


def check_name(path: Path, header: TrackerHeader) -> None:
    """TrackerError unless ``path`` is where the device named in ``header`` keeps its file."""
    name = bytes(header.name).split(b"\0", 1)[0].decode(errors="replace")
    if tracker_path(path.parent, name).name != path.name:
        raise TrackerError(f"holds the tracker of another device, {name!r} (copied or renamed)")


def fresh_image(identity: TrackerIdentity) -> bytes:
    """The bytes of a new tracker: every block UNPLUGGED, nothing pending."""
    geometry = identity.geometry
    layout = FileLayout.of(geometry)
    header = TrackerHeader(
        version=VERSION,
        header_size=HEADER_SIZE,
        total_size=layout.total_size,
        name=identity.name.encode(),
        addr=geometry.addr,
        region_size=geometry.region_size,
        block_size=geometry.block_size,
        memory_block_size=geometry.memory_block_size,
        first_memory_block=geometry.first_memory_block,
        nr_memory_blocks=geometry.nr_memory_blocks,
        nr_subblocks=geometry.nr_subblocks,
        intent_op=NO_INTENT,
    )
    header.magic[:] = MAGIC
    image = bytearray(layout.total_size)
    image[:HEADER_SIZE] = bytes(header)
    start = layout.records_offset
    image[start : start + layout.nr_memory_blocks * RECORD_SIZE] = (
        DEFAULT_RECORD * layout.nr_memory_blocks
    )
    return bytes(image)
