"""The benchmarks' harness pieces that need no VM: QEMU arguments for the seed's scale
(``reserve=off``, ``phys-bits``), curves, and the /proc parsing of the idle agent."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_idle  # noqa: E402
import bench_scale  # noqa: E402
from vmharness import GiB, MemDevice, MiB, VMConfig  # noqa: E402
from vmharness.config import RunPaths, kernel_cmdline, parse_device, qemu_argv  # noqa: E402
from vmharness.watch import Curve  # noqa: E402

RUN = RunPaths(
    kernel=Path("bzImage"),
    run_dir=Path("run"),
    share=Path("share"),
    sock_dir=Path("socks"),
    guest_init=Path("init.sh"),
    guest_runner=Path("runner.py"),
)


def argv(cfg: VMConfig, accel: str = "tcg") -> list[str]:
    return qemu_argv(cfg, RUN, "qemu-system-x86_64", accel)


def option(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_reserve_off_reaches_the_ram_backend() -> None:
    cfg = VMConfig(devices=(MemDevice("vm0", size=256 * GiB, reserve=False), MemDevice("vm1")))
    objects = option(argv(cfg), "-object")
    assert "memory-backend-ram,id=mem-vm0,size=256G,reserve=off" in objects
    assert "memory-backend-ram,id=mem-vm1,size=4G" in objects
    assert not parse_device("id=vm0,size=8G,reserve=off").reserve
    assert parse_device("id=vm0,size=8G").reserve


def test_phys_bits_on_the_cpu_model() -> None:
    assert option(argv(VMConfig(phys_bits=41)), "-cpu") == ["max,phys-bits=41"]
    assert option(argv(VMConfig(phys_bits=41), "kvm"), "-cpu") == ["host,phys-bits=41"]
    assert option(argv(VMConfig()), "-cpu") == ["max"]


def test_the_seed_example_guest() -> None:
    """Two 256 GiB regions of 4 MiB blocks on two nodes, 2 GiB boot memory, maxmem for all,
    the same for both drivers but the driver's switches."""
    kernel, agent = (bench_scale.scale_config(d, bench_scale.REGION) for d in ("kernel", "agent"))
    for cfg in (kernel, agent):
        args = argv(cfg)
        assert option(args, "-m") == ["2G,maxmem=514G,slots=1"]
        devices = [d for d in option(args, "-device") if d.startswith("virtio-mem-pci")]
        assert len(devices) == 2
        assert all("block-size=4M" in d for d in devices)
        assert [d.split("node=")[1] for d in devices] == ["0", "1"]
        assert sum(o.endswith("size=256G,reserve=off") for o in option(args, "-object")) == 2
        assert len(option(args, "-numa")) == 2
    assert (kernel.in_kernel_driver, kernel.noiommu) == (True, False)
    assert (agent.in_kernel_driver, agent.noiommu) == (False, True)
    assert bench_scale.driver_targets("agent", {"vm0": 4160 * MiB}) == {"vm0": 4096 * MiB}
    assert bench_scale.driver_targets("kernel", {"vm0": 4160 * MiB}) == {"vm0": 4160 * MiB}


def test_the_seed_example_guests_boot_flags() -> None:
    """The tuned agent's guest gets the benchmark's flags, the README one neither."""

    def words(driver: str) -> list[str]:
        return kernel_cmdline(bench_scale.scale_config(driver, bench_scale.REGION), RUN).split()

    flags = ("memhp_default_state=online_movable", "secretmem.enable=1")
    assert all(f in words("kernel") for f in flags[:1]) and flags[1] not in words("kernel")
    assert all(f in words("agent") for f in flags)
    readme = words("readme")
    assert not any(f in readme for f in flags)
    assert "vfio.enable_unsafe_noiommu_mode=1" in readme
    assert "initcall_blacklist=virtio_mem_driver_init" in readme


def test_idle_vm_fits_its_region_in_the_address_space() -> None:
    assert bench_idle.phys_bits_for(1 * GiB, 256 * GiB) is None  # QEMU's 40 bits will do
    # QEMU 7.2 moves the region of a 1 TiB device above 1 TiB (AMD's HyperTransport hole):
    # "Address space limit 0x1ffffffffff < 0x2187fffffff phys-bits too low (41)".
    assert bench_idle.phys_bits_for(1 * GiB, 1 << 40) == 42
    assert bench_idle.idle_config(1 << 40).phys_bits == 42


def test_curve_keeps_changes_and_sums() -> None:
    a, b = Curve(), Curve()
    for t, v in ((0.0, 0), (0.1, 0), (0.2, 5), (0.3, 5), (0.4, 7)):
        a.record(t, v)
    for t, v in ((0.0, 1), (0.25, 2), (0.5, 2)):
        b.record(t, v)
    assert (a.times, a.values, a.end) == ([0.0, 0.2, 0.4], [0, 5, 7], 0.4)
    total = Curve.total([a, b])
    assert (total.times, total.values, total.end) == ([0.0, 0.2, 0.25, 0.4], [1, 6, 7, 9], 0.5)


def test_proc_parsing() -> None:
    stat = "4242 (vmem guest) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 37 0 0 20 0 1 0 99"
    assert bench_idle.cpu_ticks(stat) == 287
    status = bench_idle.status_fields(
        "Name:\tvmem-guest\nVmRSS:\t   31000 kB\nThreads:\t1\nvoluntary_ctxt_switches:\t12\n"
    )
    assert status == {"VmRSS": 31000 * 1024, "Threads": 1, "voluntary_ctxt_switches": 12}


def fake_run(driver: str, seconds: list[float]) -> dict[str, object]:
    steps = [
        {
            "step": step.name,
            "targets": bench_scale.driver_targets(driver, step.requested),
            "plugged_after": {},
            "memtotal_target": 0,
            "memtotal_final": 0,
            "memtotal_exact": True,
            "qemu_s": s,
            "memtotal_s": s + 0.1,
            "agent_cpu_s": None if driver == "kernel" else s / 2,
        }
        for step, s in zip(bench_scale.STEPS, seconds, strict=True)
    ]
    run: dict[str, object] = {
        "steps": steps,
        "base_memtotal": 0,
        "host_load_at_boot": (0.5, 0, 0),
        "host_load_at_end": (0.7, 0, 0),
    }
    if driver != "kernel":
        run.update(
            agent_start_s=0.8,
            online_paths=["auto-online online_movable via probe: one write per block"],
            agent_log_lines=10,
            agent_log_problems=[],
        )
    return run


def test_the_scale_table_puts_each_agent_against_the_same_kernel_run() -> None:
    result = {
        "region": bench_scale.REGION,
        "accel": "tcg",
        "drivers": {
            "kernel": fake_run("kernel", [0.5, 4.0, 5.0]),
            "agent": fake_run("agent", [0.25, 4.0, 10.0]),
            "readme": fake_run("readme", [1.0, 2.0, 2.5]),
        },
    }
    lines = bench_scale.scale_table(result)
    first = next(line for line in lines if line.startswith(bench_scale.STEPS[0].name))
    # in-kernel 0.5; tuned 0.25 (0.50), CPU 0.12; README 1.0 (2.00), CPU 0.50
    assert first.split()[-7:] == ["0.500", "0.250", "0.50", "0.12", "1.000", "2.00", "0.50"]
    assert "README s" in lines[1] and "tuned s" in lines[1]
    readme = [line for line in lines if line.startswith("vmem_guest (README set-up): run")]
    assert readme and "0.80 s" in readme[0] and "one write per block" in readme[0]


def test_a_tcg_guest_skips_the_io_apic_timer_check() -> None:
    """Under TCG on a loaded host the boot's timer check can miss and panic."""
    cfg = VMConfig(devices=(MemDevice("vm0"),))
    (tcg_cmdline,) = option(argv(cfg, "tcg"), "-append")
    (kvm_cmdline,) = option(argv(cfg, "kvm"), "-append")
    assert "no_timer_check" in tcg_cmdline.split()
    assert "no_timer_check" not in kvm_cmdline.split()


def test_tcg_runs_the_vcpus_in_one_thread_unless_asked() -> None:
    """Multi-threaded TCG crashed both QEMUs during PCI enumeration (docs/test-vm.md
    section 10): every VM is single-threaded under TCG by default."""
    assert option(argv(VMConfig()), "-accel") == ["tcg,thread=single"]
    assert option(argv(VMConfig(tcg_thread="multi")), "-accel") == ["tcg,thread=multi"]
    assert option(argv(VMConfig(), accel="kvm"), "-accel") == ["kvm"]
