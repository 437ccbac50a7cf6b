"""What a guest needs in RAM to survive an S3 wake-up: the list guest-init copies.

The test VM's root is the host's ``/`` over 9p. Linux's 9p virtio transport
(net/9p/trans_virtio.c) has no freeze/restore, and QEMU resets every device at an S3
wake-up (``pc_machine_wakeup``), so after a wake-up every read of that root hangs for
good, while virtio-serial (which has freeze/restore) keeps working. A VM with
``VMConfig.ram_root`` therefore copies, at boot, what its runner, its shell commands
and the agent run from into a tmpfs and chroots into it (scripts/guest-init.sh); this
module says what that is, computed on the host, where the same files live.

The list holds absolute paths (files, directories copied whole, or symlinks copied as
links; none under a symlinked directory), one per line: the venv's interpreter and its
standard library, the project's runtime distributions (``vmem_guest``'s
``Requires-Dist`` without extras), the project itself, a shell and the commands the
tests run, and every shared library those load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

#: The list's name in the VM's share (guest-init reads it from there).
RAM_ROOT_LIST = "ram-root.list"
#: The commands the tests and the agent run in the guest (through /bin/sh).
COMMANDS = (
    "sh", "dash", "cat", "rm", "setsid", "kill", "ls", "wc", "basename", "readlink",
    "sleep", "tail", "head", "grep", "sed", "mkdir", "test", "true", "env", "uname",
    "pgrep", "ps", "ldconfig", "chmod", "date", "umount",
)  # fmt: skip
#: Links of Debian's merged /usr, copied as links so /bin/sh and /lib64's loader resolve.
MERGED_USR_LINKS = ("/bin", "/sbin", "/lib", "/lib64")
#: Standard-library directories nothing in the guest imports (tests, GUIs, build files).
STDLIB_SKIPPED = ("test", "site-packages", "idlelib", "tkinter", "turtledemo", "ensurepip",
                  "lib2to3", "dist-packages", "unittest", "pydoc_data")  # fmt: skip
#: The venv's commands the guest runs besides its python* links (its bin/ also holds
#: ruff, mypy, pytest, ...).
VENV_COMMANDS = ("vmem-guest",)
#: Lets ctypes.util.find_library (pyudev's libudev lookup) work without a 9p read.
EXTRA_FILES = ("/etc/ld.so.cache",)

# Run by the venv's interpreter: where it, its standard library, vmem_guest and the
# files of vmem_guest's runtime distributions are.
_PROBE = r"""
import importlib.metadata as md, json, os, re, sys, sysconfig
import vmem_guest
names, files = ["vmem_guest"], []
seen = set()
while names:
    name = names.pop()
    if name.lower() in seen:
        continue
    seen.add(name.lower())
    dist = md.distribution(name)
    for f in dist.files or ():
        files.append(os.path.realpath(f.locate()))
    for req in dist.requires or ():
        if "extra ==" not in req:
            names.append(re.split(r"[ ;<>=!~\[]", req, maxsplit=1)[0])
print(json.dumps({
    "executable": os.path.realpath(sys.executable),
    "venv": sys.prefix,
    "stdlib": sysconfig.get_path("stdlib"),
    "package": os.path.dirname(os.path.realpath(vmem_guest.__file__)),
    "files": files,
}))
"""


def _libraries(binary: str) -> set[str]:
    """The shared libraries ``binary`` loads, from ldd (none for a script or static)."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    libs = set()
    for line in out.splitlines():
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            libs.add(match.group(1))
    return libs


def _stdlib_entries(stdlib: Path) -> list[str]:
    """The standard library's top-level entries, without the ones never imported."""
    return sorted(
        str(p)
        for p in stdlib.iterdir()
        if p.name not in STDLIB_SKIPPED and not p.name.startswith("config-")
    )


def ram_root_paths(venv_python: Path, repo: Path) -> list[str]:
    """Every path the guest must copy into RAM to run the runner, the tests' shell
    commands and the agent from ``repo`` with ``venv_python``, without the 9p root."""
    probe = subprocess.run(
        # From /: a vmem_guest/ in the caller's directory would shadow the installed one.
        [str(venv_python), "-c", _PROBE],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    )
    found = json.loads(probe.stdout)
    wanted: set[str] = {*MERGED_USR_LINKS, *EXTRA_FILES}
    wanted |= {found["executable"], found["package"], str(repo / "scripts")}
    venv = Path(found["venv"])
    wanted |= {str(venv / "pyvenv.cfg")} | {str(venv / "bin" / c) for c in VENV_COMMANDS}
    wanted |= {str(link) for link in (venv / "bin").glob("python*")}
    if (repo / ".venv").is_symlink():  # a worktree sharing another checkout's venv
        wanted.add(str(repo / ".venv"))
    wanted |= {f for f in found["files"] if Path(f).exists()}
    # (In a venv, sysconfig's platstdlib is the venv's own lib/: only stdlib is the base.)
    wanted |= set(_stdlib_entries(Path(found["stdlib"])))
    binaries = [found["executable"]]
    binaries += [path for cmd in COMMANDS if (path := shutil.which(cmd))]
    wanted |= {str(Path(b).resolve()) for b in binaries} | set(binaries)
    for binary in binaries:
        wanted |= _libraries(binary)
    dynload = Path(found["stdlib"]) / "lib-dynload"
    for ext in dynload.glob("*.so") if dynload.is_dir() else ():
        wanted |= _libraries(str(ext))
    # A library or an interpreter is often a link (to a link) to a versioned file: copy
    # every hop (files only: /bin resolves to all of /usr/bin).
    wanted |= {hop for p in wanted if Path(p).is_file() for hop in _link_chain(p)}
    # Each path under its parent's real directory: ``cp --parents`` would otherwise meet
    # a copied link (/lib64 -> usr/lib64, a worktree's .venv) whose target is not there.
    real = {_under_real_parent(p) for p in wanted}
    present = sorted(p for p in real if Path(p).exists() or Path(p).is_symlink())
    return present


def _link_chain(path: str) -> list[str]:
    """``path`` and every link it leads through, to the file at the end."""
    hops = [path]
    while os.path.islink(hops[-1]) and len(hops) < 40:  # 40: the kernel's own limit
        target = os.readlink(hops[-1])
        hops.append(os.path.normpath(os.path.join(os.path.dirname(hops[-1]), target)))
    return hops


def _under_real_parent(path: str) -> str:
    """``path`` with its parent directory resolved (the entry itself kept as it is)."""
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name)


def write_ram_root_list(share: Path, venv_python: Path, repo: Path) -> Path:
    """Write the list into the share, where guest-init reads it; return its path."""
    path = share / RAM_ROOT_LIST
    path.write_text("\n".join(ram_root_paths(venv_python, repo)) + "\n")
    return path
