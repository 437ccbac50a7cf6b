# vmem_guest: every set-up step lives here or in scripts/.
#   make demo   run the main job (see README)
#   make test   lint, types, unit, fuzz and VM tests
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.bench-stamp

.PHONY: all venv test test-fast lint types unit fuzz-quick fuzz demo bench-sim \
        kernel vm-deps test-vm bench-kernel-driver bench bench-scale bench-subblock demo-sim \
        conformance chaos migrate faults pressure test-matrix qemu rootfs clean \
        test-debian-packages man hibernate faults-test

all: test

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(STAMP)

# The benchmarks draw PNGs: matplotlib, from the bench extra (not a runtime dependency).
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

lint: $(STAMP)
	$(VENV)/bin/ruff check vmem_guest tests scripts bench
	$(VENV)/bin/ruff format --check vmem_guest tests scripts bench

types: $(STAMP)
	$(VENV)/bin/mypy --strict vmem_guest

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit tests/fuzz

# The whole suite: lint and types run as tests too (tests/unit/test_quality.py).
# A serial run kept 1.05 of 2 cores busy (its QEMUs included): a VM test waits on its
# guest about half the time. So TEST_JOBS workers, each taking one test file at a time
# (--dist loadfile: a file's module fixtures boot its VMs once, on one worker), and
# the slowest tests listed at the end so the next cut is measured, not guessed.
TEST_JOBS ?= 2
test: $(STAMP) vm-deps test-debian-packages
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=30 -m "not long" tests

# The long VM runs kept out of make test (marker `long`), one target each.
hibernate: $(STAMP) vm-deps
	$(PY) -m pytest -q tests/vm/test_hibernate_vm.py
faults-test: $(STAMP) vm-deps
	$(PY) -m pytest -q tests/vm/test_kernel_faults_vm.py

# The CLI on Debian 12's own python3, click and pyudev, nothing from PyPI (docs/install.md).
test-debian-packages:
	bash scripts/test-debian-packages.sh .venv-debian

# docs/man/vmem-guest.1, from the click commands (tests/unit/test_manpage.py checks it).
man: $(STAMP)
	$(PY) -m vmem_guest.manpage docs/man/vmem-guest.1

# Everything that needs no VM.
test-fast: $(STAMP)
	$(PY) -m pytest -q tests/unit tests/fuzz

fuzz: $(STAMP)
	VMEM_FUZZ_PROFILE=deep $(PY) -m pytest -q tests/fuzz

# The main job: a real VM whose memory grows and shrinks under the agent.
demo: $(STAMP) vm-deps
	$(PY) scripts/demo.py

# The same story in the simulator (no VM needed).
demo-sim: $(STAMP)
	$(PY) -m vmem_guest.cli sim --region 4G --block-size 2M --memory-block-size 128M \
	    --resize 1G,3G,1000M,0

bench-sim: $(BENCH_STAMP)
	$(PY) bench/bench_sim.py

# The matrix's two axes: QEMU (the system's 7.2; 10.0 from backports into the cache)
# and the guest kernel (6.1; 6.12), each built or unpacked once and cached by version.
kernel:
	bash scripts/build-kernel.sh --linux 6.1
	bash scripts/build-kernel.sh --linux 6.12

qemu:
	bash scripts/install-qemu.sh system
	bash scripts/install-qemu.sh 10.0

# The systemd guest's Debian 12 root filesystem with the checkout installed (cached;
# tests/vm/test_systemd_guest_vm.py boots it).
rootfs:
	bash scripts/build-rootfs.sh

# The conformance image for any VMM (docs/image.md): the cached 6.1 kernel and an
# initramfs that fuzzes every virtio-mem device, or serves them; built once per content.
.PHONY: image
image: $(STAMP)
	$(PY) scripts/build-image.py

vm-deps: kernel qemu
	bash scripts/install-vm-deps.sh

test-vm: $(STAMP) vm-deps
	$(PY) -m pytest -q tests/vm

bench-kernel-driver: $(STAMP) vm-deps
	$(PY) scripts/bench_kernel_driver.py

bench: $(BENCH_STAMP) vm-deps
	$(PY) scripts/bench_agent.py

# The seed's example: 2 x 256 GiB regions, 4 MiB blocks, 2 NUMA nodes; both drivers.
bench-scale: $(BENCH_STAMP) vm-deps
	$(PY) scripts/bench_scale.py

# 64 MiB out of an online 128 MiB block and back: the agent's soft offline vs the in-kernel driver.
bench-subblock: $(BENCH_STAMP) vm-deps
	$(PY) scripts/bench_subblock.py

# QEMU's virtio-mem device against the model, in a VM (deep; tests/vm runs 30 examples).
CONFORMANCE_EXAMPLES ?= 500
conformance: $(STAMP) vm-deps
	$(PY) scripts/conformance.py --examples $(CONFORMANCE_EXAMPLES)

# SIGKILL the agent N times at random moments in a VM; check invariants, restart, converge.
N ?= 100
chaos: $(STAMP) vm-deps
	$(PY) scripts/chaos.py --kills $(N)

# Live-migrate the guest N times at random moments while the agent resizes; check, converge.
migrate: $(STAMP) vm-deps
	$(PY) scripts/migrate.py --migrations $(N)

# The kernel refuses the agent at random (fault injection) while the host resizes, N rounds.
faults: $(STAMP) vm-deps
	$(PY) scripts/kernel_faults.py --rounds $(N)

# Shrink under a guest workload (anon, mlocked, page cache): vmem_guest vs the in-kernel driver,
# with pinned pages and with movable pages only (a target off the 128 MiB block grid).
pressure: $(STAMP) vm-deps
	$(PY) scripts/pressure.py; a=$$?; $(PY) scripts/pressure.py --workload movable && exit $$a

# The agent VM tests, `make conformance` and `make chaos N=20` on all four pairs of
# QEMU {7.2, 10.0} x Linux {6.1, 6.12}; one table at the end (results/matrix/).
test-matrix: $(STAMP) vm-deps
	$(PY) scripts/matrix.py

clean:
	rm -rf $(VENV) .venv-debian build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
