"""The harness's QEMU arguments for a guest booted from a root filesystem image (the
systemd guest, scripts/build-rootfs.sh) against those for the 9p root: no VM needed."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

from vmharness.config import RunPaths, kernel_cmdline, qemu_argv  # noqa: E402
from vmharness.config import userspace_driver_config as userspace  # noqa: E402

RUN = RunPaths(
    kernel=Path("bzImage"),
    run_dir=Path("run"),
    share=Path("share"),
    sock_dir=Path("socks"),
    guest_init=Path("init.sh"),
    guest_runner=Path("runner.py"),
)
IMAGE = Path("cache/rootfs.ext4")


def option(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_an_image_root_boots_its_own_init_from_virtio_blk() -> None:
    cfg = dataclasses.replace(userspace("sd"), root_image=IMAGE)
    words = kernel_cmdline(cfg, RUN).split()
    assert {"root=/dev/vda", "rootfstype=ext4", "rw"} <= set(words)
    assert not [w for w in words if w.startswith(("init=", "VMH_", "rootflags="))]
    assert "ro" not in words
    # The harness's words for the driver under test stay.
    assert "vfio.enable_unsafe_noiommu_mode=1" in words
    assert "initcall_blacklist=virtio_mem_driver_init" in words
    args = qemu_argv(cfg, RUN, "qemu-system-x86_64", "tcg")
    assert option(args, "-drive") == [
        "file=cache/rootfs.ext4,if=virtio,format=raw,snapshot=on,cache=unsafe"
    ]
    assert not [v for v in option(args, "-virtfs") if "mount_tag=hostroot" in v]


def test_without_an_image_the_host_root_is_shared_over_9p() -> None:
    cfg = userspace("9p")
    words = kernel_cmdline(cfg, RUN).split()
    assert {"root=hostroot", "rootfstype=9p", "ro", "init=init.sh"} <= set(words)
    assert "VMH_RUNNER=runner.py" in words
    args = qemu_argv(cfg, RUN, "qemu-system-x86_64", "tcg")
    assert option(args, "-drive") == []
    assert [v for v in option(args, "-virtfs") if "mount_tag=hostroot" in v]


def test_a_persistent_root_writes_a_copy_in_place_and_a_swap_disk_follows() -> None:
    """A guest that hibernates needs its disks to outlive QEMU (TestVM.restart): the
    copy in the run directory without snapshot=on, then the swap disk, /dev/vdb."""
    cfg = dataclasses.replace(
        userspace("hib"), root_image=IMAGE, persistent_root=True, swap_disk=1 << 30
    )
    args = qemu_argv(cfg, RUN, "qemu-system-x86_64", "tcg")
    assert option(args, "-drive") == [
        "file=run/root.ext4,if=virtio,format=raw,cache=unsafe",
        "file=run/swap.img,if=virtio,format=raw,cache=unsafe",
    ]
    # A restarted QEMU appends to the console log instead of truncating it.
    assert option(args, "-chardev")[0] == "file,id=con0,path=run/console.log,append=on"


def test_a_persistent_root_needs_an_image() -> None:
    cfg = dataclasses.replace(userspace("hib"), persistent_root=True)
    with pytest.raises(ValueError, match="persistent_root needs a root_image"):
        qemu_argv(cfg, RUN, "qemu-system-x86_64", "tcg")
