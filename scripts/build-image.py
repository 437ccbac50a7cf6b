#!/usr/bin/env python3
"""``make image``: the conformance image, a guest kernel and an initramfs for any VMM.

    .venv/bin/python scripts/build-image.py [--linux 6.1]

Takes the cached guest kernel of the project's fragment (scripts/build-kernel.sh; it
is never built here: build it with ``make kernel`` first) and builds, or finds in the
cache, the initramfs of scripts/vmharness/image.py. Prints the kernel, the initrd,
the kernel command line and a QEMU command line that boots them (docs/image.md).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmharness.image import build_image
from vmharness.paths import BUILD_KERNEL


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--linux", default="6.1", help="guest kernel series (default 6.1)")
    args = parser.parse_args()
    found = subprocess.run(
        ["bash", str(BUILD_KERNEL), "--linux", args.linux, "--print-path"],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0:
        print(f"no cached {args.linux} guest kernel: run `make kernel` first", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    image = build_image(Path(found.stdout.strip()))
    print(f"image ({time.monotonic() - t0:.1f} s): {image.directory}")
    print(f"  kernel  {image.kernel}")
    print(f"  initrd  {image.initrd} ({image.initrd.stat().st_size / 2**20:.1f} MiB)")
    print(f"  cmdline console=ttyS0 {image.cmdline} vmem_guest.mode=fuzz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
