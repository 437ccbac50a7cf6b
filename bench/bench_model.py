"""Benchmark: virtio-mem requests per second through the device model.

Requests go through :class:`vmem_guest.device.VirtioMemDevice` (encode, submit,
parse and validate the response), as the driver core sends them. It prints
figures; it passes or fails nothing. Aim: 20,000 requests/s or more.

    .venv/bin/python bench/bench_model.py [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from vmem_guest import spec
from vmem_guest.device import VirtioMemDevice
from vmem_guest.sim import DeviceModel

MiB = 1 << 20
GiB = 1 << 30
BLOCK = 2 * MiB
MEMORY_BLOCK_BLOCKS = 64  # 128 MiB memory block of 2 MiB device blocks
ROUND = 256  # requests per timing round


def make_device() -> tuple[DeviceModel, VirtioMemDevice]:
    """A 64 GiB region at 4 GiB with everything requested (no NACKs)."""
    model = DeviceModel(addr=4 * GiB, region_size=64 * GiB, block_size=BLOCK)
    model.resize(64 * GiB)
    return model, VirtioMemDevice(model, "bench")


def workload(name: str) -> Callable[[], int]:
    """One round of a workload: returns how many requests it sent."""
    model, device = make_device()
    base = model.addr
    if name == "plug+unplug 1 block":
        addrs = [base + i * BLOCK for i in range(ROUND // 2)]

        def run() -> int:
            for addr in addrs:
                device.plug(addr, 1)
            for addr in addrs:
                device.unplug(addr, 1)
            return 2 * len(addrs)

    elif name == "plug+state+unplug 64 blocks":
        step = MEMORY_BLOCK_BLOCKS * BLOCK
        addrs = [base + i * step for i in range(ROUND // 3)]

        def run() -> int:
            for addr in addrs:
                device.plug(addr, MEMORY_BLOCK_BLOCKS)
                device.state(addr, MEMORY_BLOCK_BLOCKS)
                device.unplug(addr, MEMORY_BLOCK_BLOCKS)
            return 3 * len(addrs)

    elif name == "error (misaligned)":

        def run() -> int:
            for _ in range(ROUND):
                device.plug(base + 4096, 1)
            return ROUND

    elif name == "raw submit, no VirtioMemDevice":
        raws = [
            spec.encode_request(req_type, base + i * BLOCK, 1)
            for req_type in (spec.RequestType.PLUG, spec.RequestType.UNPLUG)
            for i in range(ROUND // 2)
        ]

        def run() -> int:
            for raw in raws:
                model.submit(raw)
            return len(raws)

    else:
        raise ValueError(name)
    return run


WORKLOADS = (
    "plug+unplug 1 block",
    "plug+state+unplug 64 blocks",
    "error (misaligned)",
    "raw submit, no VirtioMemDevice",
)


def requests_per_second(name: str, seconds: float = 1.0) -> float:
    """Run workload ``name`` for about ``seconds`` and return requests/s."""
    run = workload(name)
    run()  # warm up
    sent = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        sent += run()
        now = time.perf_counter()
        if now >= deadline:
            return sent / (now - start)


def main() -> None:
    parser = argparse.ArgumentParser(description="virtio-mem device model requests/s")
    parser.add_argument("--seconds", type=float, default=1.0, help="per workload")
    args = parser.parse_args()
    for name in WORKLOADS:
        rate = requests_per_second(name, args.seconds)
        print(f"device model  {name:<32} {rate:>12,.0f} requests/s")


if __name__ == "__main__":
    main()
