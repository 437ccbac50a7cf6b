"""Lint, format and types run as tests, so ``make test`` covers them (issue 2, item 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
LINTED = [p for p in ("vmem_guest", "tests", "scripts", "bench") if (ROOT / p).exists()]


def run_tool(tool: str, *args: str) -> None:
    exe = BIN / tool
    if not exe.exists():
        pytest.fail(f"{tool} is not installed next to {sys.executable} (pip install -e '.[test]')")
    proc = subprocess.run(
        [str(exe), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{tool} {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}",
            pytrace=False,
        )


def test_ruff_check() -> None:
    run_tool("ruff", "check", *LINTED)


def test_ruff_format() -> None:
    run_tool("ruff", "format", "--check", *LINTED)


def test_mypy_strict() -> None:
    run_tool("mypy", "--strict", "vmem_guest")
