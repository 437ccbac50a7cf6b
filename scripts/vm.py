#!/usr/bin/env python3
"""Boot a test VM by hand, or run one guest command in a fresh VM.

    .venv/bin/python scripts/vm.py boot --devices 2          # interactive prompt
    .venv/bin/python scripts/vm.py boot --no-kernel-driver --noiommu
    .venv/bin/python scripts/vm.py run --devices 1 -- 'cat /proc/meminfo'

At the ``vm>`` prompt: a plain line runs in the guest (/bin/sh -c, as root);
``:resize vm0 1G``, ``:query``, ``:reset``, ``:log [N]``, ``:help``, ``:quit``.
The console log, qemu.log and the writable share are under results/vm/<run>/.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vmharness import MemDevice, TestVM, VMConfig, fmt_size, parse_size
from vmharness.config import parse_device


def build_config(a: argparse.Namespace) -> VMConfig:
    """VMConfig from the command-line options."""
    if a.device:
        devices = tuple(parse_device(s) for s in a.device)
    else:
        nodes = max(a.numa, 1)
        devices = tuple(
            MemDevice(
                f"vm{i}",
                size=parse_size(a.size),
                block_size=parse_size(a.block),
                node=(i % nodes) if a.numa else None,
            )
            for i in range(a.devices)
        )
    return VMConfig(
        name=a.name,
        cpus=a.cpus,
        memory=parse_size(a.memory),
        devices=devices,
        numa_nodes=a.numa,
        in_kernel_driver=not a.no_kernel_driver,
        noiommu=a.noiommu,
        viommu=a.viommu,
        extra_cmdline=tuple(a.append or ()),
    )


def repl(vm: TestVM) -> None:
    """The interactive prompt."""
    print(__doc__.split("At the", 1)[1].split("The console", 1)[0].strip())
    while True:
        try:
            line = input("vm> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        try:
            if not line.startswith(":"):
                rc, out = vm.guest(line, timeout=600)
                print(out, end="" if out.endswith("\n") or not out else "\n")
                if rc:
                    print(f"[rc={rc}]")
                continue
            words = shlex.split(line[1:])
            cmd, args = words[0], words[1:]
            if cmd in ("quit", "q", "exit"):
                return
            if cmd == "resize":
                vm.resize(args[0], parse_size(args[1]))
            elif cmd == "query":
                for dev, d in vm.query().items():
                    print(
                        f"{dev}: size={fmt_size(d['size'])} "
                        f"requested={fmt_size(d.get('requested-size', 0))} "
                        f"max={fmt_size(d.get('max-size', 0))} node={d.get('node')} "
                        f"addr={d.get('memaddr', 0):#x}"
                    )
            elif cmd == "reset":
                vm.reset()
                print(f"rebooted ({vm.boot_id})")
            elif cmd == "log":
                print(vm.log_tail(int(args[0]) if args else 40))
            else:
                print("commands: :resize ID SIZE  :query  :reset  :log [N]  :quit")
        except Exception as e:
            print(f"error: {e}")


def main() -> int:
    """Entry point."""
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
        usage="vm.py {boot,run} [options] [-- guest command]",
    )
    p.add_argument("action", choices=["boot", "run"])
    p.add_argument("--name", default="manual")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--memory", default="1G", help="boot memory")
    p.add_argument("--devices", type=int, default=1, help="number of virtio-mem devices")
    p.add_argument("--size", default="4G", help="region size of each device")
    p.add_argument("--block", default="2M", help="device block size")
    p.add_argument(
        "--device",
        action="append",
        help="full device spec, repeatable: id=vm0,size=4G,block=2M,requested=0,node=0,iommu=1",
    )
    p.add_argument("--numa", type=int, default=0, help="NUMA nodes (devices round-robin)")
    p.add_argument("--no-kernel-driver", action="store_true", help="blacklist virtio_mem")
    p.add_argument("--noiommu", action="store_true", help="vfio no-IOMMU mode")
    p.add_argument("--viommu", action="store_true", help="intel-iommu + iommu_platform")
    p.add_argument("--append", action="append", help="extra kernel command-line word")
    argv = sys.argv[1:]
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1 :]
    a = p.parse_args(argv)
    cfg = build_config(a)
    with TestVM(cfg) as vm:
        assert vm.paths is not None
        info = {
            "accel": vm.accel,
            "boot_seconds": round(vm.boot_seconds, 1),
            "run_dir": str(vm.paths.run_dir),
            "console_log": str(vm.paths.console_log),
            "share (same path in the guest)": str(vm.paths.share),
            "qmp_socket": str(vm.paths.qmp_sock),
        }
        print(json.dumps(info, indent=2), file=sys.stderr)
        if a.action == "run":
            if not command:
                p.error("run needs a guest command after --")
            rc, out = vm.guest(" ".join(command), timeout=3600)
            sys.stdout.write(out)
            return rc
        repl(vm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
