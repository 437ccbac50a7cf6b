"""Shell completion as docs/install.md tells a user to set it up, in a real bash.

click writes the script (``_VMEM_GUEST_COMPLETE=bash_source vmem-guest``) and answers
the script's questions; the variable's name comes from the program name that
``cli.main`` gives click, so the test runs the entry point under that name. ``make
test-debian-packages`` runs this file with Debian 12's click 8.1.3, ``make test``
with the newest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


@pytest.fixture(scope="module")
def path_with_vmem_guest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PATH whose ``vmem-guest`` is this checkout's entry point under this Python."""
    bin_dir = tmp_path_factory.mktemp("bin")
    script = bin_dir / "vmem-guest"
    script.write_text(
        f'#!/bin/sh\nPYTHONPATH="{ROOT}" exec "{sys.executable}" -m vmem_guest.cli "$@"\n'
    )
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def complete(path: str, *words: str) -> list[str]:
    """What bash offers after ``words`` (the last one being typed), set up with the
    line docs/install.md gives for ~/.bashrc."""
    program = f"""
        eval "$(_VMEM_GUEST_COMPLETE=bash_source vmem-guest)"
        complete -p vmem-guest >&2
        COMP_WORDS=({" ".join(f"'{w}'" for w in words)})
        COMP_CWORD={len(words) - 1}
        _vmem_guest_completion vmem-guest
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    proc = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        env={**os.environ, "PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "-F _vmem_guest_completion vmem-guest" in proc.stderr  # registered by the eval
    return proc.stdout.split()


def test_commands_complete(path_with_vmem_guest: str) -> None:
    assert complete(path_with_vmem_guest, "vmem-guest", "s") == ["sim", "state", "status"]
    assert complete(path_with_vmem_guest, "vmem-guest", "unp") == ["unplug", "unplug-all"]


def test_options_complete(path_with_vmem_guest: str) -> None:
    assert complete(path_with_vmem_guest, "vmem-guest", "sim", "--re") == [
        "--region",
        "--resize",
    ]


def test_choices_complete(path_with_vmem_guest: str) -> None:
    offered = complete(path_with_vmem_guest, "vmem-guest", "run", "--log-level", "")
    assert offered == ["debug", "info", "warning", "error"]
