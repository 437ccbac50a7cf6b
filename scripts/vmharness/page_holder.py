"""Guest side: hold memory with a known pattern, and say where it lives and whether it kept it.

    python page_holder.py MIB OUT

Maps MIB MiB of anonymous memory, writes a pattern (each 4 KiB page starts with its
own index), then writes ``OUT.pfns`` (one physical frame number per page, from
/proc/self/pagemap) and ``OUT.ready``. On SIGUSR1 it checks every page and writes
``OUT.check``: ``{"pages": N, "bad": M, "pfns": [...]}`` (the frame numbers again, so
the host can tell which pages moved). It runs until killed.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import struct
import sys
import time

PAGE = 4096
PFN_MASK = (1 << 55) - 1


def pfns(buf: mmap.mmap, pages: int) -> list[int]:
    address = ctypes_address(buf)
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(address // PAGE * 8)
        raw = pagemap.read(pages * 8)
    return [entry & PFN_MASK for (entry,) in struct.iter_unpack("<Q", raw)]


def ctypes_address(buf: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def main() -> None:
    mib, out = int(sys.argv[1]), sys.argv[2]
    pages = mib * (1 << 20) // PAGE
    buf = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for index in range(pages):
        buf[index * PAGE : index * PAGE + 8] = index.to_bytes(8, "little")
    with open(out + ".pfns", "w") as f:
        json.dump(pfns(buf, pages), f)

    def check(signum: int, frame: object) -> None:
        bad = sum(
            1
            for index in range(pages)
            if buf[index * PAGE : index * PAGE + 8] != index.to_bytes(8, "little")
        )
        with open(out + ".check.tmp", "w") as f:
            json.dump({"pages": pages, "bad": bad, "pfns": pfns(buf, pages)}, f)
        os.rename(out + ".check.tmp", out + ".check")

    signal.signal(signal.SIGUSR1, check)
    open(out + ".ready", "w").close()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
