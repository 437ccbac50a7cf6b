"""pci and binding in a real guest: list (both readers), bind (no-IOMMU), unbind.

One boot: the in-kernel virtio-mem driver blacklisted, no vIOMMU, and no-IOMMU mode
left OFF on the command line so :func:`vmem_guest.binding.bind` has to refuse it
first and then turn it on itself. The guest runs the checkout's interpreter with
``python -c`` (the host's / is the guest's root); each step prints one JSON line.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
from vmharness import GiB, MemDevice, MiB, TestVM, VMConfig

REPO = Path(__file__).resolve().parents[2]
RESULT = "RESULT "

BootVM = Callable[[VMConfig], AbstractContextManager[TestVM]]

# Runs in the guest. Steps: list (both readers), refuse without allow_noiommu, bind,
# refuse to unbind an open group, unbind.
GUEST_SCRIPT = """
import json, logging, os, sys
from pathlib import Path
from vmem_guest import binding, pci
from vmem_guest.errors import TransportError, UsageError
logging.basicConfig(level=logging.INFO, stream=sys.stderr)

def emit(step, **kw):
    print("RESULT " + json.dumps({"step": step, **kw}, default=str), flush=True)

udev = pci.list_devices(use_udev=True)
direct = pci.list_devices(use_udev=False)
emit("list", devices=[x.as_dict() for x in udev], readers_agree=udev == direct,
     all_pci_agree=pci._pci_records(use_udev=True) == pci._pci_records(use_udev=False))
bdf = udev[0].bdf
short = bdf.split(":", 1)[1]
try:
    binding.bind(short, allow_noiommu=False)
    emit("refuse", refused=False)
except UsageError as e:
    emit("refuse", refused=True, message=str(e),
         param=Path("/sys/" + pci.NOIOMMU_PARAM).read_text().strip(),
         driver=pci.get_device(bdf).driver)
node = binding.bind(short, allow_noiommu=True)
dev = pci.get_device(bdf)
emit("bind", node=str(node), is_char=os.path.exists(node) and os.stat(node).st_mode >> 12 == 2,
     device=dev.as_dict(), param=Path("/sys/" + pci.NOIOMMU_PARAM).read_text().strip(),
     again=str(binding.bind(bdf, allow_noiommu=True)),
     group_name=Path(f"/sys/kernel/iommu_groups/{dev.iommu_group}/name").read_text().strip(),
     group_type=Path(f"/sys/kernel/iommu_groups/{dev.iommu_group}/type").read_text().strip())
fd = os.open(node, os.O_RDWR)
try:
    binding.unbind(bdf)
    emit("busy", refused=False)
except TransportError as e:
    emit("busy", refused=True, message=str(e))
finally:
    os.close(fd)
new = binding.unbind(bdf)
after = pci.get_device(bdf)
emit("unbind", driver=new, device=after.as_dict(), node_exists=os.path.exists(node),
     override=Path(f"/sys/bus/pci/devices/{bdf}/driver_override").read_text().strip())
"""


@pytest.fixture(scope="module")
def vm(boot_vm: BootVM) -> Iterator[TestVM]:
    cfg = VMConfig(
        name="discovery",
        in_kernel_driver=False,
        noiommu=False,  # bind() must turn no-IOMMU mode on itself
        devices=(MemDevice("vm0", size=4 * GiB, block_size=2 * MiB),),
    )
    with boot_vm(cfg) as v:
        yield v


def run_guest(vm: TestVM) -> dict[str, dict[str, Any]]:
    cmd = f"cd {REPO} && PYTHONPATH={REPO} {sys.executable} -c {shlex.quote(GUEST_SCRIPT)}"
    rc, out = vm.guest(cmd, timeout=120)
    print(out)
    assert rc == 0, out
    steps: dict[str, dict[str, Any]] = {}
    for line in out.splitlines():
        if line.startswith(RESULT):
            step = json.loads(line[len(RESULT) :])
            steps[step.pop("step")] = step
    return steps


def test_list_bind_unbind_in_guest(vm: TestVM) -> None:
    assert "initcall_blacklist=virtio_mem_driver_init" in vm.read("/proc/cmdline")
    assert vm.read("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode").strip() == "N"
    steps = run_guest(vm)

    listed = steps["list"]
    assert listed["readers_agree"] and listed["all_pci_agree"], listed
    (dev,) = listed["devices"]
    assert dev["driver"] == "virtio-pci"
    assert dev["iommu_group"] is None
    assert dev["iommu_kind"] == "noiommu"
    assert dev["sysfs_path"].startswith("/sys/devices/pci0000:00/")

    refuse = steps["refuse"]
    assert refuse["refused"], refuse
    assert refuse["param"] == "N" and refuse["driver"] == "virtio-pci", refuse

    bound = steps["bind"]
    assert bound["node"].startswith("/dev/vfio/noiommu-"), bound
    assert bound["is_char"], bound
    assert bound["again"] == bound["node"]
    assert bound["param"] == "Y"
    assert bound["device"]["driver"] == "vfio-pci"
    assert bound["device"]["iommu_kind"] == "noiommu"
    assert bound["group_name"] == "vfio-noiommu"

    assert steps["busy"]["refused"], steps["busy"]

    unbound = steps["unbind"]
    assert unbound["driver"] == "virtio-pci", unbound
    assert unbound["device"]["iommu_group"] is None
    assert not unbound["node_exists"]
    assert unbound["override"] == "(null)"

    # The host side agrees nothing was plugged along the way.
    assert vm.query()["vm0"]["size"] == 0
