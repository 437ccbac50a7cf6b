"""VM tests: boot real QEMU guests through scripts/vmharness.

Every test here is marked ``vm``. When the host cannot run the VM (no qemu-system and
no way to install it, or the guest kernel cannot be built) the tests of that pair are
skipped, the summary ends with one line per pair saying why, and the session FAILS
(exit status 1): a host that cannot boot the VM never passes ``make test``. Deselect
the VM tests (``-m "not vm"``, ``make test-fast``) to run without them.

Each module boots one VM per configuration (module-scoped fixtures built with
:func:`boot`); a failing test gets the console tail of every live VM attached to its
report.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from vmharness import HostUnavailable, Pair, TestVM, VMConfig  # noqa: E402
from vmharness import host as vmhost  # noqa: E402
from vmharness.vm import LIVE_VMS  # noqa: E402

#: Why a pair cannot run here, once found out (one probe per pair per session).
_SKIP_REASON: dict[Pair, str] = {}
#: The same, as reported by pytest-xdist workers (make test runs two): pair label ->
#: reason. Only the controller has a terminal and decides the exit status.
_WORKER_REASONS: dict[str, str] = {}
#: The key of a worker's ``workeroutput`` that carries its reasons to the controller.
WORKER_OUTPUT_KEY = "vm_unavailable"


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
        _SKIP_REASON[pair] = f"VM tests on {pair.label()} cannot run on this host: {e}"
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


def _unavailable() -> dict[str, str]:
    """Pair label -> why its VM tests could not run, from this process and the workers."""
    return {**{pair.label(): reason for pair, reason in _SKIP_REASON.items()}, **_WORKER_REASONS}


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist, on the controller: a worker finished; keep its reasons."""
    _WORKER_REASONS.update(getattr(node, "workeroutput", {}).get(WORKER_OUTPUT_KEY, {}))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """A pair that could not run fails the session, whatever else passed. A worker
    hands its reasons to the controller (``workeroutput``), which decides."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput[WORKER_OUTPUT_KEY] = _unavailable()
    if _unavailable() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One clear line per pair whose VM tests could not run on this host."""
    for reason in _unavailable().values():
        terminalreporter.write_line(f"FAILED: {reason}", red=True, bold=True)
