"""The conformance image (docs/image.md): the guest kernel and an initramfs that runs
vmem_guest's fuzzer, or its agent, on any VMM's virtio-mem devices.

The initramfs holds the Python that runs this module (its interpreter, shared
libraries and standard library, at the same paths as on the host, where the
interpreter finds its prefix), vmem_guest from the checkout and its runtime
distributions with hypothesis (in ``SITE``), a shell and the few commands
scripts/image/init.sh runs, and that script as ``/init``. What the guest needs is
found the way scripts/vmharness/ramroot.py finds a RAM root's contents (ldd, link
chains), without 9p or a copy at boot: the kernel unpacks it.

Each ``.py`` goes in with its ``.pyc`` (the host's when it is current, else compiled
now) and its mtime, which the kernel keeps (CONFIG_INITRAMFS_PRESERVE_MTIME,
init/initramfs.c ``do_utime``): the guest imports without compiling, which under TCG
would take longer than the fuzzing.

Built images are cached in ``$VMEM_GUEST_CACHE/image/<key>/`` (bzImage, initrd.img,
cmdline.txt, manifest.txt); the key hashes the kernel, every file's content and
image path, and this builder's own sources.
"""

from __future__ import annotations

import configparser
import hashlib
import importlib.metadata as md
import importlib.util
import io
import os
import py_compile
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .newc import NewcWriter
from .paths import REPO_ROOT, cache_dir
from .ramroot import MERGED_USR_LINKS, STDLIB_SKIPPED, _libraries, _link_chain, _under_real_parent

#: Where vmem_guest and its distributions live in the image (init.sh's PYTHONPATH).
SITE = "/usr/lib/vmem-guest/site"
#: scripts/image/init.sh becomes the image's /init.
INIT_SCRIPT = REPO_ROOT / "scripts" / "image" / "init.sh"
#: The commands init.sh and a person in agent mode's shell run.
COMMANDS = (
    "sh", "dash", "mount", "mkdir", "cat", "ls", "sleep", "grep", "ldconfig", "dmesg",
    "free", "ps", "kill", "uname",
)  # fmt: skip
#: The extra of setup.cfg the image installs besides install_requires: the fuzzer's.
EXTRA = "fuzz"
#: Shared libraries loaded with dlopen, which ldd does not list (pyudev: libudev).
DLOPENED = ("libudev.so.1",)
#: Standard-library directories left out: the RAM root's, but unittest, which
#: hypothesis imports (hypothesis/core.py).
STDLIB_LEFT_OUT = tuple(name for name in STDLIB_SKIPPED if name != "unittest")
#: Directories of the standard library's own tests, at any depth.
TEST_DIRS = ("test", "tests", "idle_test")
#: What a VMM's kernel command line needs besides the console (docs/image.md):
#: the in-kernel virtio-mem driver kept off the devices, VFIO's no-IOMMU mode,
#: and memfd_secret for the DMA pages (vmem_guest/transport/dma.py).
CMDLINE = (
    "initcall_blacklist=virtio_mem_driver_init",
    "vfio.enable_unsafe_noiommu_mode=1",
    "secretmem.enable=1",
)
#: Images kept per kernel series in the cache; older ones are removed after a build.
KEEP_IMAGES = 3
#: The builder's own sources: a change to one is a new image.
BUILDER_SOURCES = (Path(__file__), Path(__file__).with_name("newc.py"), INIT_SCRIPT)


@dataclass(frozen=True)
class Entry:
    """One path of the image: a file from the host (``source``), bytes made here
    (``data``), or a symlink (``link``)."""

    path: str
    source: Path | None = None
    data: bytes | None = None
    link: str | None = None
    mode: int = 0o644
    mtime: int = 0


@dataclass(frozen=True)
class Image:
    """A built image: the kernel and initramfs a VMM boots."""

    directory: Path
    kernel: Path
    initrd: Path
    cmdline: str  #: what the command line needs besides the console and the mode


def _host_file(path: str) -> Entry:
    """A host file or link as it is, at the same path."""
    if os.path.islink(path):
        return Entry(path, link=os.readlink(path))
    st = os.stat(path)
    return Entry(path, source=Path(path), mode=st.st_mode & 0o7777, mtime=int(st.st_mtime))


def _pyc(source: Path) -> tuple[str, bytes]:
    """The image path and bytes of ``source``'s .pyc: the host's when it matches
    the source (timestamp pyc: magic, flags 0, mtime, size: PEP 552), else compiled."""
    cached = Path(importlib.util.cache_from_source(str(source)))
    st = source.stat()
    header = importlib.util.MAGIC_NUMBER + b"\0\0\0\0"
    header += (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
    header += (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    if cached.is_file() and cached.read_bytes()[:16] == header:
        return str(cached), cached.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "x.pyc"
        py_compile.compile(str(source), cfile=str(out), doraise=True)
        return str(cached), out.read_bytes()


def _python_tree(root: Path, image_root: str) -> Iterator[Entry]:
    """Every file under ``root`` at ``image_root``, each .py with its .pyc; no
    __pycache__ of the host's, no test directories."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", *TEST_DIRS))
        for name in sorted(filenames):
            host = Path(dirpath) / name
            image = image_root + str(host)[len(str(root)) :]
            yield _moved(host, image)
            if name.endswith(".py"):
                pyc_host, data = _pyc(host)
                yield Entry(image_root + pyc_host[len(str(root)) :], data=data, mtime=0)


def _moved(host: Path, image: str) -> Entry:
    entry = _host_file(str(host))
    return Entry(image, entry.source, entry.data, entry.link, entry.mode, entry.mtime)


def _distributions() -> list[md.Distribution]:
    """vmem_guest's runtime distributions and the fuzzer's (setup.cfg), with theirs (no extras;
    a requirement not installed, such as one for an older Python, is left out)."""
    options = configparser.ConfigParser()
    options.read(REPO_ROOT / "setup.cfg")
    wanted = options["options"]["install_requires"] + options["options.extras_require"][EXTRA]
    names = [line.strip() for line in wanted.splitlines() if line.strip()]
    found: dict[str, md.Distribution] = {}
    while names:
        name = re.split(r"[ <>=!~\[(]", names.pop().strip(), maxsplit=1)[0]
        if name.lower() in found:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        found[name.lower()] = dist
        names += [r for r in dist.requires or () if "extra ==" not in r]
    return [d for n, d in sorted(found.items()) if n != "vmem-guest"]


def _site_entries() -> Iterator[Entry]:
    """vmem_guest from the checkout, and each distribution's files under SITE."""
    yield from _python_tree(REPO_ROOT / "vmem_guest", f"{SITE}/vmem_guest")
    for dist in _distributions():
        base = Path(str(dist.locate_file("")))
        for file in dist.files or ():
            host = Path(str(dist.locate_file(file)))
            rel = str(file)
            if rel.startswith("..") or "__pycache__" in rel or not host.is_file():
                continue  # its commands (bin/) and the host's bytecode
            yield _moved(host, f"{SITE}/{rel}")
            if rel.endswith(".py"):
                pyc_host, data = _pyc(host)
                yield Entry(f"{SITE}/{Path(pyc_host).relative_to(base)}", data=data)


def _stdlib_entries() -> Iterator[Entry]:
    stdlib = Path(sysconfig.get_path("stdlib"))
    for top in sorted(stdlib.iterdir()):
        if top.name in STDLIB_LEFT_OUT or top.name.startswith("config-"):
            continue
        if top.name == "__pycache__":
            continue
        if top.is_dir():
            yield from _python_tree(top, str(top))
        else:
            yield _host_file(str(top))
            if top.suffix == ".py":
                pyc_path, data = _pyc(top)
                yield Entry(pyc_path, data=data)


def _binary_entries(python: str, extensions: list[Path]) -> Iterator[Entry]:
    """The interpreter, the commands, their shared libraries and those of the Python
    ``extensions`` (lib-dynload's, a distribution's native modules), every link on
    the way."""
    binaries = [python] + [p for c in COMMANDS if (p := shutil.which(c))]
    wanted = {*MERGED_USR_LINKS, "/etc/ld.so.cache"}
    wanted |= {str(Path(b).resolve()) for b in binaries} | set(binaries)
    for binary in [*binaries, *map(str, extensions)]:
        wanted |= _libraries(binary)
    wanted |= {lib for name in DLOPENED if (lib := _ldconfig_path(name))}
    wanted |= {hop for p in list(wanted) if Path(p).is_file() for hop in _link_chain(p)}
    for path in sorted({_under_real_parent(p) for p in wanted}):
        if os.path.lexists(path):
            yield _host_file(path)


def _ldconfig_path(soname: str) -> str | None:
    out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    match = re.search(rf"\s{re.escape(soname)} \(.*x86-64.*\) => (\S+)", out)
    return match.group(1) if match else None


def image_entries() -> list[Entry]:
    """Everything the initramfs holds, in a stable order (its key depends on it)."""
    python = os.path.realpath(sys.executable)
    python_files = [*_stdlib_entries(), *_site_entries()]
    extensions = [e.source for e in python_files if e.source and e.source.suffix == ".so"]
    entries = list(_binary_entries(python, extensions))
    entries += python_files
    entries += [
        Entry("/init", data=INIT_SCRIPT.read_bytes(), mode=0o755),
        Entry("/usr/bin/python3", link=python),
        Entry("/usr/bin/vmem-guest", data=_wrapper(python), mode=0o755),
    ]
    return entries


def _wrapper(python: str) -> bytes:
    return f'#!/bin/sh\nexec {python} -m vmem_guest.cli "$@"\n'.encode()


def _digest(entries: list[Entry], kernel: Path) -> str:
    """The cache key: the kernel, each entry's path, mode and content, the builder."""
    h = hashlib.sha256(kernel.read_bytes())
    for source in BUILDER_SOURCES:
        h.update(source.read_bytes())
    for e in entries:
        h.update(f"\0{e.path}\0{e.mode:o}\0{e.link}\0{e.mtime}\0".encode())
        h.update(e.data if e.data is not None else e.source.read_bytes() if e.source else b"")
    return h.hexdigest()[:16]


def write_cpio(entries: list[Entry], out: io.BufferedIOBase) -> None:
    """The newc archive of ``entries``, with the directories and /dev/console init needs."""
    writer = NewcWriter(out)
    for directory in ("/dev", "/proc", "/sys", "/run", "/root", "/tmp"):
        writer.directory(directory, 0o1777 if directory == "/tmp" else 0o755)
    writer.char_device("/dev/console", 5, 1)
    seen: set[str] = set()
    for e in entries:
        if e.path in seen:
            continue
        seen.add(e.path)
        if e.link is not None:
            writer.symlink(e.path, e.link)
        elif os.path.isdir(e.source or "") and e.data is None:
            writer.directory(e.path)
        else:
            data = e.data if e.data is not None else e.source.read_bytes() if e.source else b""
            writer.file(e.path, data, e.mode, e.mtime)
    writer.close()


def _compressor(kernel_config: Path) -> list[str]:
    """zstd when the kernel unpacks it (CONFIG_RD_ZSTD) and the host has it, else gzip."""
    config = kernel_config.read_text() if kernel_config.is_file() else ""
    if "CONFIG_RD_ZSTD=y" in config and shutil.which("zstd"):
        return ["zstd", "-q", "-T0", "-10", "-c"]
    return ["gzip", "-6", "-c"]


def build_image(kernel: Path, cache: Path | None = None) -> Image:
    """The image for ``kernel`` (its bzImage; its ``config`` beside it), built once per key."""
    cache = cache or cache_dir()
    entries = image_entries()
    directory = cache / "image" / f"{kernel.parent.name.split('_')[0]}-{_digest(entries, kernel)}"
    image = Image(directory, directory / "bzImage", directory / "initrd.img", " ".join(CMDLINE))
    if image.initrd.is_file():
        return image
    partial = directory.with_name(directory.name + ".part")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.copyfile(kernel, partial / "bzImage")
    raw = io.BytesIO()
    write_cpio(entries, raw)
    with open(partial / "initrd.img", "wb") as out:
        subprocess.run(_compressor(kernel.parent / "config"), input=raw.getvalue(), stdout=out,
                       check=True)  # fmt: skip
    (partial / "cmdline.txt").write_text(image.cmdline + "\n")
    (partial / "manifest.txt").write_text("".join(f"{e.path}\n" for e in entries))
    shutil.rmtree(directory, ignore_errors=True)
    partial.rename(directory)
    _prune(directory)
    return image


def _prune(built: Path, keep: int = KEEP_IMAGES) -> None:
    """Remove all but the ``keep`` newest images of ``built``'s series (each ~40 MB)."""
    series = built.name.split("-")[0]
    images = sorted(built.parent.glob(f"{series}-*"), key=lambda p: p.stat().st_mtime)
    for old in images[:-keep]:
        if old.is_dir() and not old.name.endswith(".part"):
            shutil.rmtree(old, ignore_errors=True)
