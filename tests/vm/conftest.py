"""VM tests: boot real QEMU guests through scripts/vmharness.

Every test here is marked ``vm``. When the host cannot run the VM (no qemu-system and
no way to install it, or the guest kernel cannot be built) the tests skip, and one line
in the summary says why. Each module boots one VM per configuration (module-scoped
fixtures built with :func:`boot`); a failing test gets the console tail of every live
VM attached to its report.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from vmharness import HostUnavailable, Pair, TestVM, VMConfig  # noqa: E402
from vmharness import host as vmhost  # noqa: E402
from vmharness.vm import LIVE_VMS  # noqa: E402

#: Why a pair cannot run here, once found out (one probe per pair per session).
_SKIP_REASON: dict[Pair, str] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark everything under tests/vm with ``vm``."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vm)


def _host_ready(pair: Pair) -> None:
    """Find the pair's QEMU (installing it if needed) and kernel (building it if needed)
    once; skip with one clear line when either is impossible."""
    if pair in _SKIP_REASON:
        pytest.skip(_SKIP_REASON[pair])
    try:
        vmhost.find_qemu(pair=pair)
        vmhost.find_kernel(pair=pair)
    except HostUnavailable as e:
        _SKIP_REASON[pair] = f"VM tests on {pair.label()} skipped: {e}"
        pytest.skip(_SKIP_REASON[pair])


@contextmanager
def boot(config: VMConfig, pair: Pair | None = None) -> Iterator[TestVM]:
    """Boot a VM for a module fixture (skips when the host cannot run the pair)."""
    pair = pair or Pair.from_env()
    _host_ready(pair)
    with TestVM(config, pair=pair) as vm:
        yield vm


@pytest.fixture(scope="session")
def boot_vm() -> Callable[..., AbstractContextManager[TestVM]]:
    """``with boot_vm(VMConfig(...)[, pair]) as vm:`` in a module-scoped fixture."""
    return boot


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Attach the console tail of every live VM to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for vm in list(LIVE_VMS):
            if vm.paths is not None:
                report.sections.append(
                    (
                        f"guest console tail: {vm.config.name} ({vm.paths.console_log})",
                        vm.log_tail(80),
                    )
                )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One clear line when the VM tests were skipped for a host reason."""
    if _SKIP_REASON:
        terminalreporter.write_line(_SKIP_REASON[0], yellow=True)
