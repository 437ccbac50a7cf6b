"""A virtio-mem function's device config read through sysfs, without taking the device.

``vmem-guest doctor`` needs each device's block size and region before the agent has
attached it, while virtio-pci (or nothing) holds the function. The config lies in a
BAR, at the window the DEVICE virtio capability names (spec 4.1.4.6); sysfs gives
both without a driver: the capability list in ``<device>/config`` and the BAR as
``<device>/resourceN``, which root can mmap (Linux
Documentation/PCI/sysfs-pci.rst). The window is mapped read-only and read with
exact-width 32-bit loads (virtio_pci.Mmio; a wider load is not a valid access of
QEMU's config region). Nothing is written: reading virtio-mem's device config has no
side effect. A function in a low-power state, or whose memory decoding is off (vfio-pci
holds it idle), reads all ones and fails validation: the caller then says it cannot
tell.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

from vmem_guest import spec
from vmem_guest._linux.mman import map_readonly, unmap
from vmem_guest.device import DeviceConfig
from vmem_guest.errors import VmemError
from vmem_guest.transport.virtio_pci import PCI_NUM_BARS, Mmio, parse_virtio_caps

CONFIG_SIZE = ctypes.sizeof(spec.VirtioMemConfig)


def bar_sizes(device_dir: Path) -> list[int]:
    """The size of each of the six BARs from ``<device>/resource`` (one ``start end
    flags`` line per resource, hex; an unused one reads all zero)."""
    sizes: list[int] = []
    lines = (device_dir / "resource").read_text().splitlines()
    for line in lines[:PCI_NUM_BARS]:
        start, end, _flags = (int(word, 16) for word in line.split())
        sizes.append(end - start + 1 if end else 0)
    return sizes


def read_config(device_dir: Path) -> DeviceConfig:
    """The validated device config of the function at ``device_dir``.

    OSError when sysfs refuses (not root, lockdown refuses the mmap); VmemError when
    the capabilities or the config do not check out (TransportError, ConfigError).
    """
    config = (device_dir / "config").read_bytes()
    caps = parse_virtio_caps(config, bar_sizes(device_dir), device_cfg_size=CONFIG_SIZE)
    window = caps.device
    page = mmap.PAGESIZE
    start = window.offset - window.offset % page
    length = window.offset + CONFIG_SIZE - start
    fd = os.open(device_dir / f"resource{window.bar}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        address = map_readonly(fd, length, start)
    finally:
        os.close(fd)
    try:
        raw = Mmio(address + window.offset - start, CONFIG_SIZE).read_bytes(0, CONFIG_SIZE)
    finally:
        unmap(address, length)
    return DeviceConfig.from_bytes(raw)


def read_config_or_reason(device_dir: Path) -> DeviceConfig | str:
    """:func:`read_config`, or one line saying why it could not be read."""
    try:
        return read_config(device_dir)
    except OSError as exc:
        return f"cannot read its config through sysfs: {exc.strerror or exc}"
    except VmemError as exc:
        return f"its config does not read as virtio-mem ({exc.message})"
    except ValueError as exc:
        return f"cannot read its BARs from sysfs: {exc}"
